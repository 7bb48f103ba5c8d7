"""lpl.py against Section 3 of the paper, in its order: Table 1, δ, Algorithm 1, Eq. 2, Eq. 3 and
batch_loss. CPU only, offline: every autoencoder is a tiny random one built from config."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import saved_bytes, tiny_vae
from lpl import (LatentPerceptualLoss, depth_weights, detect_outliers, kth_smallest, layer_distance, lpl_mask,
                 z0_from_prediction)


def decode_activations(vae, z_vae):
    """Block outputs taken independently: hooks on a full, ordinary vae.decode."""
    acts = []
    blocks = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    hooks = [b.register_forward_hook(lambda m, a, o: acts.append(o)) for b in blocks]
    with torch.no_grad():
        vae.decode(z_vae)
    for h in hooks:
        h.remove()
    return acts


# ---------------------------------------------------------------- Table 1: ẑ0 for each paradigm
@pytest.mark.parametrize("param", ["eps", "v", "flow"])
def test_z0_from_true_target_is_exact(param):
    torch.manual_seed(0)
    z0, eps = torch.randn(5, 4, 8, 8, dtype=torch.float64), torch.randn(5, 4, 8, 8, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    if param == "flow":  # z_t = (1 − t) z0 + t ε, target ε − z0
        alpha, sigma = 1 - t, t
        target = eps - z0
    else:  # α² + σ² = 1
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        target = eps if param == "eps" else a * eps - s * z0
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(z0_from_prediction(target, z_t, alpha, sigma, param), z0, rtol=0, atol=1e-12)


def test_v_prediction_is_exact_off_the_variance_preserving_circle():
    """(α z_t − σ v) / (α² + σ²) = z0 for any α, σ; Table 1's α z_t − σ v only when α² + σ² = 1."""
    torch.manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    alpha, sigma = torch.tensor([0.9, 0.5, 1.2], dtype=torch.float64), torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z_t, v = a * z0 + s * eps, a * eps - s * z0
    torch.testing.assert_close(z0_from_prediction(v, z_t, alpha, sigma, "v"), z0, rtol=0, atol=1e-12)
    assert not torch.allclose(a * z_t - s * v, z0)  # the unnormalised formula is off here


def test_eps_at_zero_alpha_is_a_clear_error():
    with pytest.raises(ValueError, match="undefined for eps at α_t = 0"):
        z0_from_prediction(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0.5, 0.0]), torch.tensor([0.8, 1.0]), "eps")
    assert torch.isfinite(z0_from_prediction(torch.zeros(1), torch.ones(1), 0.0, 1.0, "flow")).all()


def test_unknown_parameterization_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown parameterization 'x0'"):
        z0_from_prediction(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "x0")


# ---------------------------------------------------------------- δ(σ_t ≤ τ_σ)
def test_noise_threshold_at_known_alpha_sigma():
    alpha, sigma = torch.tensor([0.8, 0.6, 0.0, 1.0]), torch.tensor([0.6, 0.8, 1.0, 0.0])  # σ/α = .75, 1.33, ∞, 0
    assert lpl_mask(alpha, sigma, tau=1.0, resolution_scale=1.0).tolist() == [True, False, False, True]
    assert lpl_mask(alpha, sigma, tau=0.5, resolution_scale=1.0).tolist() == [False, False, False, True]
    assert lpl_mask(alpha, sigma, tau=0.5, resolution_scale=2.0).tolist() == [True, False, False, True]
    assert lpl_mask(alpha, sigma, tau=0.7, resolution_scale=2.0).tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="tau must be >= 0"):
        lpl_mask(alpha, sigma, tau=-1.0, resolution_scale=1.0)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        lpl_mask(alpha, sigma, tau=float("nan"), resolution_scale=1.0)
    # a per-sample τ (B,): each sample against its own threshold
    assert lpl_mask(alpha, sigma, tau=torch.tensor([1.0, 2.0, 1e9, 0.0]), resolution_scale=1.0).tolist() == [True, True, False, True]


# ---------------------------------------------------------------- Algorithm 1
def test_outliers_gaussian_maps_are_untouched():
    torch.manual_seed(0)
    for size in (2, 3, 4, 8, 32, 64):
        feat = torch.randn(4, 16, size, size)
        mask = detect_outliers(feat)
        assert mask.shape == feat.shape and mask.dtype == torch.bool
        assert mask.all(), f"false positives on a Gaussian {size}x{size} map"


def test_outliers_planted_patch_is_masked():
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 32, 32)
    feat[:, 1, 10:14, 20:24] = 100.0  # 16 of 1024 positions, 100x the typical scale
    mask = detect_outliers(feat)
    assert not mask[:, 1, 10:14, 20:24].any()  # the patch is masked...
    # ...with a 1-pixel margin: the erosion (3) shrinks it to 2x2, the dilation (5) grows it to 6x6
    assert not mask[:, 1, 9:15, 19:25].any()
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[9:15, 19:25] = False
    assert mask[:, 1][:, keep].all()  # and nothing else
    assert mask[:, [0, 2]].all()  # other channels are untouched
    assert feat[:, 1][mask[:, 1]].abs().max() < 10  # what is kept holds no outlier


def test_outliers_tiny_maps_and_even_kernels():
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 4, 4)
    feat[0, 0, 1, 1] = 1e4
    for opening, closing in [(5, 3), (4, 2), (2, 2), (6, 4), (1, 1)]:
        for size in (2, 4):
            mask = detect_outliers(feat[..., :size, :size], opening=opening, closing=closing)
            assert mask.shape == (2, 3, size, size)
        mask = detect_outliers(feat, opening=opening, closing=closing, down_f=4)
        assert mask.shape == feat.shape
    # with down_f = 8 both kernels are 1: a single-pixel outlier is masked and only it
    mask = detect_outliers(feat, down_f=8)
    assert not mask[0, 0, 1, 1] and mask.sum() == mask.numel() - 1
    # a constant map has std 0 and must not be masked whole
    assert detect_outliers(torch.ones(1, 1, 4, 4)).all()


def test_outlier_thresholds_equal_a_kthvalue_algorithm_1():
    """With 1x1 kernels the mask is the published thresholding, written here with kthvalue."""
    torch.manual_seed(0)
    for size in (2, 5, 16, 40):
        x = torch.randn(2, 3, size, size) * torch.rand(2, 3, 1, 1) * 5
        x[0, 1, 0, 0], x[1, 2, -1, -1] = 80.0, -60.0
        flat, N = x.flatten(-2), size * size
        k1, k2 = max(int(N * 0.02), 1), max(int(N * 0.98), 1)
        q1, q2 = flat.kthvalue(k1, -1).values[..., None, None], flat.kthvalue(k2, -1).values[..., None, None]
        m = 2 * flat.std(-1, correction=0)[..., None, None]
        expected = (q1 - m <= x) & (x <= q2 + m)
        assert torch.equal(detect_outliers(x, down_f=1000), expected)
        assert not expected[0, 1, 0, 0] or size == 2


def test_kth_smallest_equals_kthvalue():
    """The group pre-selection must not change the quantile: ties, both tails, every N % 8, and
    channels-last maps (how diffusers' decoders return their features)."""
    torch.manual_seed(0)
    for N in (1, 7, 8, 49, 64, 100, 256, 1024):
        for k in sorted({1, max(int(N * 0.02), 1), (N + 1) // 2, max(int(N * 0.98), 1), N}):
            for x in (torch.randn(2, 3, N), torch.randint(0, 4, (2, 3, N)).float()):  # ties
                assert torch.equal(kth_smallest(x, k), x.kthvalue(k, -1, keepdim=True).values), (N, k)
    x = torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last).flatten(-2)
    assert torch.equal(kth_smallest(x, 1003), x.kthvalue(1003, -1, keepdim=True).values)
    mask = detect_outliers(x.unflatten(-1, (32, 32)), down_f=1000)
    assert torch.equal(mask, detect_outliers(x.unflatten(-1, (32, 32)).contiguous(), down_f=1000))


# ---------------------------------------------------------------- Eq. 2: decoder features
@pytest.mark.parametrize("kw", [{}, dict(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                                         use_post_quant_conv=False, use_quant_conv=False)])
def test_features_equal_activations_of_vae_decode(kw):
    vae = tiny_vae(blocks=3, **kw)
    lpl = LatentPerceptualLoss(vae)
    z = torch.randn(2, vae.config.latent_channels, 4, 4)
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    ref = decode_activations(vae, z / sf + shift)  # the diffusion-scale latent, back in VAE scale
    feats = lpl.features(z)
    assert len(feats) == 4  # mid block + 3 up blocks
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=0, atol=0)
    # and the loss runs on a 16-channel VAE with a shift factor
    z0_hat = (z + 0.1).requires_grad_()
    loss = lpl(z0_hat, z)
    assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert z0_hat.grad.abs().sum() > 0


def test_post_quant_conv_is_applied():
    vae = tiny_vae(blocks=2)
    assert vae.post_quant_conv is not None
    lpl = LatentPerceptualLoss(vae)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(3.0)  # a post_quant_conv that is not near-identity
    ref = decode_activations(vae, z / vae.config.scaling_factor)
    torch.testing.assert_close(lpl.features(z)[0], ref[0], rtol=0, atol=0)
    skipped = decode_activations(vae, vae.post_quant_conv(z / vae.config.scaling_factor).detach())
    assert not torch.allclose(lpl.features(z)[0], skipped[0])  # applying it twice would differ


def test_decoder_stops_after_last_tapped_block():
    vae = tiny_vae(blocks=4)
    calls = []
    mods = {"up2": vae.decoder.up_blocks[2], "up3": vae.decoder.up_blocks[3], "out": vae.decoder.conv_out}
    for name, m in mods.items():
        m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    z, zh = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2, requires_grad=True)
    lpl = LatentPerceptualLoss(vae, num_blocks=2)  # mid + up0
    calls.clear()
    lpl(zh, z).sum().backward()
    assert calls == []
    LatentPerceptualLoss(vae)(zh, z)  # all 5 taps: every block runs, but not the output conv
    assert "out" not in calls and "up3" in calls


# ---------------------------------------------------------------- Eq. 3: the loss
def test_loss_of_exact_prediction_is_zero_with_zero_gradient():
    vae = tiny_vae(blocks=3)
    z0 = torch.randn(3, 4, 4, 4)
    for normalization in ("shared", "separate"):
        z0_hat = z0.clone().requires_grad_()
        loss = LatentPerceptualLoss(vae, normalization=normalization)(z0_hat, z0)
        assert torch.equal(loss, torch.zeros(3))
        loss.sum().backward()
        assert torch.equal(z0_hat.grad, torch.zeros_like(z0))


def test_gradients_reach_prediction_only():
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(2, 4, 4, 4, requires_grad=True)
    z0_hat = torch.randn(2, 4, 4, 4, requires_grad=True)
    lpl(z0_hat, z0).sum().backward()
    assert z0_hat.grad is not None and z0_hat.grad.abs().sum() > 0
    assert z0.grad is None  # the target branch has no graph
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())


def test_shared_normalization_uses_prediction_statistics():
    """Eq. 3 recomputed independently from the hooked activations, per sample and channel."""
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae, outliers=False)
    torch.manual_seed(1)
    z0, z0_hat = torch.randn(2, 4, 4, 4), 3.0 * torch.randn(2, 4, 4, 4)  # very different statistics
    sf = vae.config.scaling_factor
    phi, phi_hat = decode_activations(vae, z0 / sf), decode_activations(vae, z0_hat / sf)

    def reference(stats_of):
        total = torch.zeros(2)
        for w, f, fh in zip([1.0, 0.5, 0.25, 0.25], phi, phi_hat):
            for b in range(2):
                terms = []
                for c in range(f.shape[1]):
                    s = (fh if stats_of == "prediction" else f)[b, c]
                    mu, sd = s.mean(), (s.var(correction=0) + 1e-6).sqrt()
                    terms.append((((f[b, c] - mu) / sd - (fh[b, c] - mu) / sd) ** 2).mean())
                total[b] += w * torch.stack(terms).mean()
        return total

    loss = lpl(z0_hat, z0)
    torch.testing.assert_close(loss, reference("prediction"), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(loss, reference("target"), rtol=1e-2)  # the test can tell the two apart


@pytest.mark.parametrize("detach_sigma", [False, True])
@pytest.mark.parametrize("normalization", ["shared", "separate"])
def test_layer_distance_value_and_gradient_equal_a_direct_computation(normalization, detach_sigma):
    """Per (sample, channel): standardise the kept positions (boolean indexing; only the shared σ̂
    detached when asked: the separate ablation keeps its statistics' gradients), take the mean squared
    difference; value and gradient must match, on channels-last maps."""
    torch.manual_seed(0)
    phi = torch.randn(2, 3, 6, 6) * 4 + 1
    phi_hat = (phi + torch.randn_like(phi)).contiguous(memory_format=torch.channels_last).requires_grad_()
    rho = torch.rand(2, 3, 6, 6) > 0.2
    ref = torch.zeros(2, 3)
    for b in range(2):
        for c in range(3):
            f, fh = phi[b, c][rho[b, c]], phi_hat[b, c][rho[b, c]]

            def standardise(x, s):
                var = s.var(correction=0)
                detach = detach_sigma and normalization == "shared"
                return (x - s.mean()) / ((var.detach() if detach else var) + 1e-6).sqrt()
            stats = fh if normalization == "shared" else f
            ref[b, c] = ((standardise(f, stats) - standardise(fh, fh)) ** 2).mean()
    (g_ref,) = torch.autograd.grad(ref.sum(), phi_hat)
    d = layer_distance(phi, phi_hat, rho, normalization, detach_sigma)
    (g,) = torch.autograd.grad(d.sum(), phi_hat)
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_channel_normalization_equals_a_direct_computation():
    """normalization="channel" (the authors' code, after LPIPS): at each position the kept features
    over channels are divided by the target's norm there; the mean over kept positions of each
    channel's squared difference. Value and gradient against a loop; no gradient reaches ϕ, and the
    prediction's own scale does not enter the divisor (unlike "shared")."""
    torch.manual_seed(0)
    phi = (torch.randn(2, 3, 5, 5) * 3 + 1).requires_grad_()
    phi_hat = (phi.detach() + torch.randn(2, 3, 5, 5)).contiguous(memory_format=torch.channels_last).requires_grad_()
    rho = torch.rand(2, 3, 5, 5) > 0.2
    ref = torch.zeros(2, 3)
    for b in range(2):
        for c in range(3):
            terms = []
            for i in range(5):
                for j in range(5):
                    if rho[b, c, i, j]:
                        kept = phi.detach()[b, :, i, j][rho[b, :, i, j]]  # the target's kept channels here
                        norm = (kept.square().sum() + 1e-6).sqrt()
                        terms.append(((phi[b, c, i, j] - phi_hat[b, c, i, j]) / norm) ** 2)
            ref[b, c] = torch.stack(terms).mean()
    (g_ref,) = torch.autograd.grad(ref.sum(), phi_hat)
    d = layer_distance(phi, phi_hat, rho, "channel")
    g, g_phi = torch.autograd.grad(d.sum(), [phi_hat, phi])
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)
    # ϕ's own gradient is that of the difference only: the divisor is a constant
    torch.testing.assert_close(g_phi, -g, rtol=1e-5, atol=1e-8)
    assert torch.equal(layer_distance(phi, phi.detach().clone(), rho, "channel"), torch.zeros(2, 3))


def test_channel_normalization_through_the_loss():
    """The constructor takes it, an exact prediction gives exact zeros, and it differs from "shared"."""
    vae = tiny_vae(blocks=3)
    torch.manual_seed(2)
    z0, z0_hat = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    lpl = LatentPerceptualLoss(vae, normalization="channel")
    exact = z0.clone().requires_grad_()
    loss = lpl(exact, z0)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(exact.grad, torch.zeros_like(z0))
    assert not torch.allclose(lpl(z0_hat, z0), LatentPerceptualLoss(vae)(z0_hat, z0), rtol=1e-2)


def test_layer_weights_of_sd_like_vae():
    lpl = LatentPerceptualLoss(tiny_vae(blocks=4))  # 4 levels like SD: mid, up0..up3
    assert lpl.layer_weights == [1.0, 0.5, 0.25, 0.125, 0.125]
    assert LatentPerceptualLoss(tiny_vae(blocks=4), layer_weights="uniform").layer_weights == [1.0] * 5
    assert LatentPerceptualLoss(tiny_vae(blocks=4), num_blocks=3).layer_weights == [1.0, 0.5, 0.25]
    assert depth_weights([32, 64, 128, 128]) == [1.0, 0.5, 0.25, 0.25]


def test_fully_masked_channel_contributes_zero_not_nan():
    torch.manual_seed(0)
    phi, phi_hat = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    rho = torch.ones(2, 3, 8, 8, dtype=torch.bool)
    rho[:, 1] = False
    for normalization in ("shared", "separate"):
        d = layer_distance(phi, phi_hat, rho, normalization)  # (B, C)
        assert torch.isfinite(d).all() and (d[:, 1] == 0).all() and (d[:, [0, 2]] > 0).all()
        d.sum().backward()
        assert torch.isfinite(phi_hat.grad).all() and (phi_hat.grad[:, 1] == 0).all()
        phi_hat.grad = None


def test_outlier_mask_is_used_in_the_loss():
    vae = tiny_vae(blocks=2)
    lpl = LatentPerceptualLoss(vae, kernel_ref_size=32)  # 32-wide maps get the full kernels (5, 3)
    torch.manual_seed(0)
    f, fh = torch.randn(1, 8, 32, 32), torch.randn(1, 8, 32, 32)
    f[0, 0, 4:8, 4:8] = 1e3  # an outlier patch in the target only
    rho = lpl.outlier_mask(f)  # from the target's features
    assert not rho[0, 0, 4:8, 4:8].any() and rho[0, 1:].all()
    assert torch.equal(rho, detect_outliers(f))
    assert layer_distance(f, fh, rho)[0, 0] < 10  # without the mask it would be ~1e5
    assert layer_distance(f, fh, torch.ones_like(rho))[0, 0] > 1e3


def test_bf16_autocast_gives_finite_loss():
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(2, 4, 4, 4)
    z0_hat = (z0 + 0.5 * torch.randn_like(z0)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lpl(z0_hat, z0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert torch.isfinite(z0_hat.grad).all()


def test_detach_sigma_changes_the_gradient_not_the_value():
    vae = tiny_vae(blocks=3)
    z0 = torch.randn(2, 4, 4, 4)
    grads, values = [], []
    for detach in (False, True):
        z0_hat = (z0 + 0.5 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss = LatentPerceptualLoss(vae, detach_sigma=detach)(z0_hat, z0)
        loss.sum().backward()
        values.append(loss.detach()), grads.append(z0_hat.grad)
    torch.testing.assert_close(values[0], values[1])
    cos = F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cos < 0.9999  # σ̂'s own gradient is there by default and gone when detached


@pytest.mark.parametrize("noise_ratio", [0.1, 0.25, 0.5])
def test_gradient_through_sigma_hat_biases_the_optimum_by_the_unpredictable_share(noise_ratio):
    """The toy model behind the detach_sigma default. The target feature is ϕ = s + u: s is what
    the model can predict (variance S), u what it cannot (variance N, independent). A prediction
    ϕ̂ = a·s with shared normalization has E[loss] ∝ ((1 − a)² S + N) / (a² S): with the gradient
    through σ̂ (σ̂ = a·√S) it is stationary at a = 1 + N/S, an inflated prediction; with σ̂ a
    constant, at a = 1, the conditional mean, as for an ℓ2 loss. The root of the mean gradient in a
    is found by bisection over many draws of u."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 16, 256, generator=g, dtype=torch.float64)  # (B, C, N): S = 1
    u = noise_ratio ** 0.5 * torch.randn(64, 16, 256, generator=g, dtype=torch.float64)  # N = noise_ratio
    rho = torch.ones_like(s, dtype=torch.bool)

    def grad_at(a, detach):
        a = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        layer_distance((s + u).unsqueeze(-1), (a * s).unsqueeze(-1), rho.unsqueeze(-1),
                       detach_sigma=detach).mean().backward()
        return a.grad.item()

    def root(detach, lo=0.5, hi=3.0):
        assert grad_at(lo, detach) < 0 < grad_at(hi, detach)  # one stationary point, a minimum
        for _ in range(20):  # to 2.5e-6
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if grad_at(mid, detach) < 0 else (lo, mid)
        return (lo + hi) / 2

    assert abs(root(detach=False) - (1 + noise_ratio)) < 0.02  # biased: ϕ̂ inflated by N/S
    assert abs(root(detach=True) - 1.0) < 0.02  # unbiased


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_vae_in_another_dtype_without_autocast(dtype):
    """Latents are cast to the VAE's dtype (fp32 latents into an fp16 VAE crashed before)."""
    vae = tiny_vae(blocks=3)
    ref_lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(2, 4, 4, 4)
    z0_hat = (z0 + 0.5 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
    ref = ref_lpl(z0_hat, z0).detach()
    lpl = LatentPerceptualLoss(tiny_vae(blocks=3).to(dtype))
    loss = lpl(z0_hat, z0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert z0_hat.grad.dtype == torch.float32 and torch.isfinite(z0_hat.grad).all() and z0_hat.grad.abs().sum() > 0
    torch.testing.assert_close(loss.detach(), ref, rtol=0.1 if dtype != torch.float64 else 1e-5, atol=1e-3)
    lpl64 = LatentPerceptualLoss(vae)  # fp64 latents into the fp32 VAE
    assert torch.isfinite(lpl64(z0_hat.detach().double(), z0.double())).all()


def test_loss_holds_no_state_and_keeps_the_vae_frozen():
    vae = tiny_vae(blocks=2)
    lpl = LatentPerceptualLoss(vae)
    assert lpl.state_dict() == {} and list(lpl.parameters()) == [] and list(lpl.children()) == []
    lpl.train()
    assert not vae.training and not any(m.training for m in vae.modules())
    assert all(not p.requires_grad for p in vae.parameters())
    assert lpl.vae is vae  # still reachable by reference


def test_gradient_checkpointing_stores_less():
    """diffusers < 0.32 checkpoints only in training mode, which the frozen VAE never is: there this
    test fails, because the same activations are stored with and without checkpointing."""
    z0 = torch.randn(2, 4, 8, 8)
    sizes = []
    for ckpt in (False, True):
        lpl = LatentPerceptualLoss(tiny_vae(blocks=3), grad_checkpointing=ckpt)
        z0_hat = (z0 + 0.3).requires_grad_()
        n, loss = saved_bytes(lambda: lpl(z0_hat, z0))
        loss.sum().backward()
        sizes.append(n)
    assert sizes[1] < 0.6 * sizes[0], sizes


def test_gradient_checkpointing_gives_same_loss_and_gradient():
    z0 = torch.randn(2, 4, 4, 4)
    results = []
    for ckpt in (False, True):
        for n in (2, 4):  # the stop falls inside a checkpointed block (2) or after the last (4)
            z0_hat = (z0 + 0.3).requires_grad_()
            loss = LatentPerceptualLoss(tiny_vae(blocks=3), num_blocks=n, grad_checkpointing=ckpt)(z0_hat, z0)
            loss.sum().backward()
            results.append((loss.detach(), z0_hat.grad))
    for (l1, g1), (l2, g2) in zip(results[:2], results[2:]):
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(g1, g2)


def test_empty_batch_costs_nothing():
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    calls = []
    lpl.vae.decoder.mid_block.register_forward_hook(lambda *a: calls.append(1))
    out = lpl(torch.zeros(0, 4, 4, 4), torch.zeros(0, 4, 4, 4))
    assert out.shape == (0,) and calls == []


def test_bad_inputs_are_clear_errors():
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    with pytest.raises(ValueError, match=r"expected \(B, 4, h, w\)"):
        lpl(torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        lpl(torch.zeros(1, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 2x2"):
        lpl(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1))
    with pytest.raises(ValueError, match="num_blocks must be in 1..3"):
        LatentPerceptualLoss(tiny_vae(blocks=2), num_blocks=5)
    with pytest.raises(ValueError, match="normalization"):
        LatentPerceptualLoss(tiny_vae(blocks=2), normalization="batch")
    with pytest.raises(ValueError, match="layer_weights"):
        LatentPerceptualLoss(tiny_vae(blocks=2), layer_weights="linear")


def test_batch_loss_is_the_selected_samples_losses_over_the_batch():
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae)
    z0, eps = torch.randn(6, 4, 4, 4), torch.randn(6, 4, 4, 4)
    alpha = torch.tensor([0.99, 0.9, 0.75, 0.5, 0.3, 0.1])
    sigma = (1 - alpha ** 2).sqrt()
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    pred = (eps + 0.3 * torch.randn_like(eps)).requires_grad_()
    got = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=1.0, resolution_scale=1.0)
    m = sigma / alpha <= 1.0  # the first three samples
    assert m.tolist() == [True, True, True, False, False, False]
    z0_hat = (z_t[m] - sigma[m].view(-1, 1, 1, 1) * pred[m]) / alpha[m].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, lpl(z0_hat, z0[m]).sum() / 6)
    got.backward()
    assert (pred.grad[3:] == 0).all() and (pred.grad[:3] != 0).any()  # gradients only where δ = 1
    calls = []
    vae.decoder.mid_block.register_forward_hook(lambda *a: calls.append(1))
    zero = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=0.01, resolution_scale=1.0)
    assert zero.item() == 0 and calls == []  # nothing selected: no decoder pass
    # the default resolution scale: τ is given at 64x64 latents, so 4x4 latents scale it by 1/16
    torch.testing.assert_close(lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=16.0), got)


def test_readme_paper_to_code_map_points_at_the_code():
    """Each `name`, lines a–b of the README's equation map holds the whole definition of `name`."""
    import ast
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "README.md")).read()
    table = text.split("## The paper, equation by equation")[1].split("\n## ")[0]
    spans = {}
    for node in ast.walk(ast.parse(open(os.path.join(here, "lpl.py")).read())):
        if isinstance(node, ast.ClassDef):
            spans.update({f"{node.name}.{f.name}": (f.lineno, f.end_lineno) for f in node.body if isinstance(f, ast.FunctionDef)})
        elif isinstance(node, ast.FunctionDef):
            spans.setdefault(node.name, (node.lineno, node.end_lineno))
    refs = re.findall(r"((?:`\w[\w.]*`(?: / |, )?)+), lines (\d+)–(\d+)", table)
    assert len(refs) >= 9
    for names, a, b in refs:
        for name in re.findall(r"`([\w.]+)`", names):
            lo, hi = spans[name]
            assert int(a) <= lo and hi <= int(b), (name, (lo, hi), (a, b))


# ================================================================ issue 28: one rule, told to the host
def _eps_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 4, 4, 4, generator=g)
    alpha = torch.linspace(0.99, 0.1, B)
    sigma = (1 - alpha ** 2).sqrt()
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    return z0, eps, z_t, alpha, sigma


def test_batch_loss_tells_the_host_which_samples_got_lpl_by_the_one_rule_of_the_scale():
    """return_selected gives δ without a second call, and it is lpl_mask at latent width / 64, the
    rule lpl_mask now has to be given (it had a default of 1: τ unscaled)."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=3))
    z0, eps, z_t, alpha, sigma = _eps_batch()
    pred = eps + 0.2 * torch.randn_like(eps)
    loss, m = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=16.0, return_selected=True)
    assert m.dtype == torch.bool and m.tolist() == lpl_mask(alpha, sigma, 16.0, z_t.shape[-1] / 64).tolist()
    assert 0 < m.sum() < len(m)
    torch.testing.assert_close(loss, lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=16.0))
    none, m0 = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=1e-3, return_selected=True)
    assert none.item() == 0 and not m0.any()
    import inspect
    assert inspect.signature(lpl_mask).parameters["resolution_scale"].default is inspect.Parameter.empty


def test_detach_sigma_concerns_the_shared_sigma_only():
    """In the 'separate' ablation each map is standardised by its own statistics, with gradient, as
    Section 4.3 describes it; detach_sigma (about the shared σ̂) leaves it unchanged. Before, it
    detached the prediction's σ̂ there too."""
    vae = tiny_vae(blocks=3)
    z0 = torch.randn(2, 4, 4, 4)
    grads = {}
    for norm in ("shared", "separate"):
        for detach in (False, True):
            z0_hat = (z0 + 0.5 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
            LatentPerceptualLoss(vae, normalization=norm, detach_sigma=detach)(z0_hat, z0).sum().backward()
            grads[norm, detach] = z0_hat.grad
    assert not torch.allclose(grads["shared", False], grads["shared", True])
    torch.testing.assert_close(grads["separate", False], grads["separate", True], rtol=0, atol=0)
