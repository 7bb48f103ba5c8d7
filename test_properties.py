"""lpl.py's public functions under property-based tests (hypothesis): over random shapes, dtypes,
batch sizes from 0, schedules, parameterizations and bad values, every call returns a finite result
of the documented shape or raises ValueError with a message, never another exception and never a
silent 0 for an input it cannot use."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpl
from conftest import tiny_vae

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PARAMS = st.sampled_from(["eps", "v", "flow", "x0", "", "EPS"])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
# schedule values: ordinary ones, the edges, and the bad kinds (NaN, inf, negative)
VALUES = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, -0.5, math.nan, math.inf, -math.inf, 2.0]))


@pytest.fixture(scope="module")
def loss():
    return lpl.LatentPerceptualLoss(tiny_vae(blocks=2), num_blocks=2)


def finite_or_value_error(fn, *args, **kw):
    """fn's result, or None when it raised ValueError; any other exception fails the test."""
    try:
        out = fn(*args, **kw)
    except ValueError as e:
        assert str(e), "a ValueError must say what is wrong"
        return None
    return out


@SETTINGS
@given(b=st.integers(0, 4), c=st.integers(1, 4), h=st.integers(1, 6), dtype=DTYPES, param=PARAMS,
       alpha=st.lists(VALUES, min_size=1, max_size=5), sigma=st.lists(VALUES, min_size=1, max_size=5))
def test_z0_from_prediction_is_finite_of_the_shape_or_a_value_error(b, c, h, dtype, param, alpha, sigma):
    g = torch.Generator().manual_seed(b * 100 + c * 10 + h)
    z_t = torch.randn(b, c, h, h, generator=g).to(dtype)
    pred = torch.randn(b, c, h, h, generator=g).to(dtype)
    a, s = torch.tensor(alpha[:1] * b if len(alpha) == 1 else alpha[:b]), torch.tensor(sigma[:1] * b if len(sigma) == 1 else sigma[:b])
    out = finite_or_value_error(lpl.z0_from_prediction, pred, z_t, a, s, param)
    if out is not None:
        assert param in lpl.PARAMETERIZATIONS, f"{param!r} must be refused"
        assert all(0 <= x < math.inf for x in a.tolist() + s.tolist()), "a NaN, inf or negative α, σ must be refused"
        assert out.shape == z_t.shape
        assert torch.isfinite(out.float()).all(), (param, alpha, sigma)


@SETTINGS
@given(alpha=st.lists(VALUES, min_size=0, max_size=6), tau=st.one_of(st.floats(0, 10), st.sampled_from([math.nan, -1.0])),
       scale=st.sampled_from([1.0, 0.125, 0.0, -1.0, math.nan]))
def test_lpl_mask_is_a_bool_per_sample_or_a_value_error(alpha, tau, scale):
    a = torch.tensor(alpha, dtype=torch.float64)
    s = (1 - a * a).clamp_min(0).sqrt() if len(alpha) else a
    m = finite_or_value_error(lpl.lpl_mask, a, s, tau, scale)
    if m is not None:
        assert m.dtype == torch.bool and m.shape == a.shape
        assert not any(math.isnan(x) or math.isinf(x) or x < 0 for x in alpha), "a bad α must be refused"


@SETTINGS
@given(b=st.integers(0, 3), param=PARAMS, dtype=st.sampled_from([torch.float32, torch.float64]),
       t=st.lists(st.floats(0, 1), min_size=1, max_size=3), scalar=st.booleans(),
       bad=st.sampled_from([None, math.nan, math.inf, -0.5]))
def test_batch_loss_is_a_finite_scalar_or_a_value_error(loss, b, param, dtype, t, scalar, bad):
    g = torch.Generator().manual_seed(b + len(t))
    z0 = torch.randn(b, 4, 4, 4, generator=g).to(dtype)
    eps = torch.randn(b, 4, 4, 4, generator=g).to(dtype)
    tt = torch.tensor((t * b)[:b] if not scalar else t[:1], dtype=dtype)
    if bad is not None and len(tt):
        tt[0] = bad
    if param == "flow":
        a, s = 1 - tt, tt
    else:
        a, s = (1 - tt * tt).clamp_min(0).sqrt(), tt
    shape = (-1, 1, 1, 1) if not scalar else ()
    z_t = a.reshape(shape) * z0 + s.reshape(shape) * eps if len(tt) else z0
    out = finite_or_value_error(loss.batch_loss, eps, z_t, z0, a, s, param, tau=4.0, resolution_scale=1.0)
    if out is not None:
        assert param in lpl.PARAMETERIZATIONS, f"{param!r} must be refused, even when no sample is selected"
        assert bad is None or len(tt) == 0, f"the bad value {bad} must be refused"
        assert out.shape == () and torch.isfinite(out)


@SETTINGS
@given(n=st.integers(1, 50), t=st.lists(st.integers(-3, 60), min_size=0, max_size=5),
       kind=st.sampled_from(["torch32", "numpy64"]))
def test_alpha_sigma_from_alphas_cumprod_in_range_or_a_value_error(n, t, kind):
    abar = np.linspace(0.999, 0.01, n)
    table = torch.tensor(abar, dtype=torch.float32) if kind == "torch32" else abar
    out = finite_or_value_error(lpl.alpha_sigma_from_alphas_cumprod, table, torch.tensor(t, dtype=torch.long))
    if out is not None:
        assert all(0 <= x < n for x in t), "a timestep outside the table must be refused"
        a, s = out
        assert a.shape == s.shape == (len(t),) and a.dtype == torch.float32
        assert torch.allclose(a * a + s * s, torch.ones_like(a), atol=1e-5)


def test_alphas_cumprod_roots_are_taken_in_the_table_s_precision():
    """σ_t at t = 0 of a float64 table (OpenAI's) is the float32 rounding of the float64 root, not the
    root of a float32-rounded ᾱ (8e-5 relative off at t = 0 before)."""
    abar = np.array([1 - 1e-7, 0.5])
    a, s = lpl.alpha_sigma_from_alphas_cumprod(abar, torch.tensor([0, 1]))
    exact = math.sqrt(1e-7)
    assert abs(s[0].item() - exact) / exact < 1e-6


@SETTINGS
@given(t=st.lists(VALUES, min_size=0, max_size=4), data_at=st.sampled_from([0, 1, 2, -1]))
def test_alpha_sigma_from_flow_time_or_a_value_error(t, data_at):
    out = finite_or_value_error(lpl.alpha_sigma_from_flow_time, torch.tensor(t, dtype=torch.float64), data_at)
    if out is not None:
        assert data_at in (0, 1) and all(0 <= x <= 1 for x in t), "a flow time outside [0, 1] must be refused"
        a, s = out
        assert torch.allclose(a + s, torch.ones_like(a))
