"""Tests for lpl.py (and the trainer). CPU only, no network: every autoencoder here is a tiny random
one built from config in the test, every image a synthetic PNG. Run: python -m pytest -q test_lpl.py"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from lpl import (LatentPerceptualLoss, alpha_sigma_from_alphas_cumprod, alpha_sigma_from_flow_time, depth_weights,
                 detect_outliers, kth_smallest, layer_distance, lpl_mask, z0_from_prediction)


def tiny_vae(blocks=2, latent_channels=4, seed=0, **kw):
    """A random AutoencoderKL with `blocks` levels of 8 channels (factor 2^(blocks-1))."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1,
                         norm_num_groups=4, latent_channels=latent_channels, **kw).eval()


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


# ---------------------------------------------------------------- autoencoder families
def tiny_family(name):
    """(vae, to_vae_scale, taps): a tiny random autoencoder of each family, the map from the diffusion
    model's latent to the autoencoder's (written as each family's pipeline does it) and the blocks
    whose outputs should be ϕ_l, in decoding order. Normalisations are made non-trivial."""
    import diffusers
    cls = {"flux2": "AutoencoderKLFlux2", "qwen": "AutoencoderKLQwenImage", "wan": "AutoencoderKLWan"}.get(name)
    if cls and not hasattr(diffusers, cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls}")
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
    if name == "flux2":
        vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                           latent_channels=4, norm_num_groups=4)
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)

        def to_vae(z):  # FLUX.2's pipeline: patchify, de-standardise, unpatchify
            B, C, h, w = z.shape
            p = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, h // 2, w // 2)
            p = p * (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt() + vae.bn.running_mean.view(1, -1, 1, 1)
            return p.reshape(B, C, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(B, C, h, w)
        return vae.eval(), to_vae, [vae.decoder.mid_block, *vae.decoder.up_blocks]
    if name in ("qwen", "wan"):
        cls = diffusers.AutoencoderKLQwenImage if name == "qwen" else diffusers.AutoencoderKLWan
        vae = cls(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
                  latents_mean=mean, latents_std=std)
        m, inv_s = torch.tensor(mean).view(1, 4, 1, 1, 1), 1 / torch.tensor(std).view(1, 4, 1, 1, 1)
        to_vae = lambda z: (z if z.dim() == 5 else z[:, :, None]) / inv_s + m  # noqa: E731  (the pipelines')
        return vae.eval(), to_vae, [vae.decoder.mid_block, *vae.decoder.up_blocks]
    if name == "dc":
        vae = diffusers.AutoencoderDC(latent_channels=4, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                                      encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                                      encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(0, 1, 1),
                                      encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3,
                                      decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41)
        ups = vae.decoder.up_blocks  # run from last to first; the first stage has no layers here
        return vae.eval(), (lambda z: z / 0.41), [ups[2], ups[1]]
    if name == "tiny":
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 1, 1), latent_channels=4,
                                        scaling_factor=0.7)
        L = vae.decoder.layers  # conv, act, [block, block], up, conv, [block], up, conv, [block], conv
        return vae.eval(), (lambda z: z / 0.7), [L[3], L[6], L[9]]
    if name == "asym":  # the paper's main autoencoder: SD's encoder, a wider decoder
        vae = diffusers.AsymmetricAutoencoderKL(down_block_out_channels=(8, 8), up_block_out_channels=(8, 16),
                                                down_block_types=("DownEncoderBlock2D",) * 2,
                                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_down_block=1,
                                                layers_per_up_block=1, norm_num_groups=4, latent_channels=4,
                                                scaling_factor=0.5)
        return vae.eval(), (lambda z: z / 0.5), [vae.decoder.mid_block, *vae.decoder.up_blocks]
    if name == "sd3":  # SD3 / FLUX.1: (z − shift)·scale
        vae = tiny_vae(blocks=2, shift_factor=0.1159, scaling_factor=0.3611)
        return vae, (lambda z: z / 0.3611 + 0.1159), [vae.decoder.mid_block, *vae.decoder.up_blocks]
    if name == "playground":  # an AutoencoderKL config with latents_mean / latents_std (Playground v2.5)
        vae = tiny_vae(blocks=2, scaling_factor=0.5, latents_mean=mean, latents_std=std)
        m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
        # diffusers' SDXL pipelines: latents * latents_std / scaling_factor + latents_mean
        return vae, (lambda z: z * s / 0.5 + m), [vae.decoder.mid_block, *vae.decoder.up_blocks]
    if name == "vq":
        vae = diffusers.VQModel(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                latent_channels=4, num_vq_embeddings=16, vq_embed_dim=4, scaling_factor=0.3)
        return vae.eval(), (lambda z: z / 0.3), [vae.decoder.mid_block, *vae.decoder.up_blocks]
    raise KeyError(name)


FAMILIES = ["flux2", "qwen", "wan", "dc", "tiny", "vq", "asym", "sd3", "playground"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_features_equal_activations_of_its_own_decode(name):
    vae, to_vae, taps = tiny_family(name)
    lpl = LatentPerceptualLoss(vae)
    z = torch.randn(2, 4, 4, 4)
    acts = []
    hooks = [b.register_forward_hook(lambda m, a, o: acts.append(o)) for b in taps]
    with torch.no_grad():  # the ordinary decode, run to the end, with its input de-normalised as the pipelines do
        x = to_vae(z)
        vae.decode(x, force_not_quantize=True) if name == "vq" else vae.decode(x)
    for h in hooks:
        h.remove()
    feats = lpl.features(z)
    assert len(feats) == len(taps) == len(lpl.layer_weights)
    for f, a in zip(feats, acts):
        torch.testing.assert_close(f, a[:, :, 0] if a.dim() == 5 else a)  # float32 tolerance: z·s vs z/(1/s)
    widths = [f.shape[-1] for f in feats]
    assert lpl.layer_weights == [widths[0] / w for w in widths]  # 2^-r_l: halved at each doubling


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loss_zero_at_target_positive_otherwise_gradient_only_to_prediction(name):
    vae, _, _ = tiny_family(name)
    lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(3, 4, 4, 4)
    z0_hat = z0.clone().requires_grad_()
    loss = lpl(z0_hat, z0)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(z0_hat.grad, torch.zeros_like(z0))
    z0_hat = (z0 + 0.3 * torch.randn_like(z0)).requires_grad_()
    loss = lpl(z0_hat, z0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > 0).all() and z0_hat.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())


def test_family_latents_keep_the_shape_encode_returns():
    """Qwen-Image / Wan encode to (B, C, 1, h, w): the loss takes that shape, or the frame axis
    dropped, with the same value; FLUX.2 latents keep encode's unpatchified (B, C, h, w)."""
    vae, _, _ = tiny_family("qwen")
    lpl = LatentPerceptualLoss(vae)
    with torch.no_grad():
        z0 = vae.encode(torch.rand(2, 3, 1, 16, 16) * 2 - 1).latent_dist.mean  # (2, 4, 1, 8, 8)
    assert z0.shape == (2, 4, 1, 8, 8)
    z0_hat = z0 + 0.1
    torch.testing.assert_close(lpl(z0_hat, z0), lpl(z0_hat[:, :, 0], z0[:, :, 0]))
    with pytest.raises(ValueError, match="single-frame"):
        lpl(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4))
    vae, _, _ = tiny_family("flux2")
    with torch.no_grad():
        z0 = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist.mean
    assert LatentPerceptualLoss(vae)(z0 + 0.1, z0).shape == (2,)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        LatentPerceptualLoss(vae)(torch.randn(1, 4, 5, 4), torch.randn(1, 4, 5, 4))


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_side_is_the_exact_inverse_of_the_loss_decode(name):
    """lpl.latent_scale's two maps invert each other, to_vae is the pipeline's de-normalisation
    (written independently in tiny_family), and decoding encode_latents(x) through the loss's decode
    gives the autoencoder's own reconstruction of x, for every family."""
    from lpl import decoder_taps, encode_latents, latent_scale
    vae, to_vae, _ = tiny_family(name)
    to_diffusion, lpl_to_vae = latent_scale(vae)
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(lpl_to_vae(to_diffusion(z)), z, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_diffusion(lpl_to_vae(z)), z, rtol=0, atol=1e-12)
    torch.testing.assert_close(lpl_to_vae(z.float()), to_vae(z.float()).reshape(z.shape))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    video = name in ("qwen", "wan")
    with torch.no_grad():
        own = vae.decode(vae.encode(x[:, :, None] if video else x).latent_dist.mean).sample if name not in (
            "dc", "tiny", "vq") else None
        if name == "dc":
            own = vae.decode(vae.encode(x).latent).sample
        elif name in ("tiny", "vq"):
            kw = dict(force_not_quantize=True) if name == "vq" else {}
            own = vae.decode(vae.encode(x).latents, **kw).sample
        via_lpl = decoder_taps(vae)[1](encode_latents(vae, x))
    torch.testing.assert_close(via_lpl, own[:, :, 0] if video else own, rtol=1e-4, atol=1e-5)


def test_encode_latents_draws_from_the_posterior_when_asked():
    from lpl import encode_latents
    vae = tiny_vae(blocks=2)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = encode_latents(vae, x)
        d1 = encode_latents(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
        d2 = encode_latents(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
        post = vae.encode(x).latent_dist
    assert torch.equal(d1, d2) and not torch.allclose(d1, mean)
    torch.testing.assert_close(mean, post.mean * vae.config.scaling_factor)
    z = (d1 / vae.config.scaling_factor - post.mean) / post.std  # the draw's standard normal
    assert abs(z.std().item() - 1) < 0.2


def test_a_config_with_both_a_shift_and_latents_mean_is_refused():
    from lpl import latent_scale
    with pytest.raises(ValueError, match="both shift_factor and latents_mean"):
        latent_scale(tiny_vae(blocks=2, shift_factor=0.1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    with pytest.raises(ValueError, match="only one of latents_mean and latents_std"):
        latent_scale(tiny_vae(blocks=2, latents_mean=[0.0] * 4))


def test_gradient_checkpointing_of_the_asymmetric_decoder_stores_less_same_gradient():
    """AsymmetricAutoencoderKL (the paper's main decoder) refuses diffusers' enable_gradient_checkpointing,
    though its decoder checkpoints each block: the loss sets the decoder's own flag."""
    z0 = torch.randn(2, 4, 8, 8)
    sizes, grads = [], []
    for ckpt in (False, True):
        vae, _, _ = tiny_family("asym")
        lpl = LatentPerceptualLoss(vae, grad_checkpointing=ckpt)
        z0_hat = (z0 + 0.3).requires_grad_()
        n, loss = saved_bytes(lambda: lpl(z0_hat, z0))
        loss.sum().backward()
        sizes.append(n)
        grads.append(z0_hat.grad)
    assert sizes[1] < 0.6 * sizes[0], sizes
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="grad_checkpointing needs a decoder"):
        LatentPerceptualLoss(tiny_family("tiny")[0], grad_checkpointing=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_trainer_encodes_each_family_as_its_pipeline_and_trains_on_it(name, assets, tmp_path):
    """train.py takes every family: load_vae finds the class from the saved config, encode_latents is
    the inverse of the pipeline's de-normalisation (written independently in tiny_family), the latent
    geometry is read off the decoder, and a post-training with LPL runs and samples."""
    vae, to_vae, _ = tiny_family(name)
    vae.save_pretrained(tmp_path / "vae")
    loaded = data.load_vae(str(tmp_path / "vae"), "cpu")
    assert type(loaded) is type(vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = data.encode_latents(loaded, x)  # the diffusion model's scale
        if name in ("dc",):
            raw = vae.encode(x).latent
        elif name in ("tiny", "vq"):
            raw = vae.encode(x).latents
        else:
            raw = vae.encode(x[:, :, None] if name in ("qwen", "wan") else x).latent_dist.mean
    channels, factor = data.latent_geometry(loaded)
    assert z.shape == (2, 4, 16 // factor, 16 // factor) and channels == 4
    torch.testing.assert_close(to_vae(z), raw)
    assert not torch.allclose(z, raw.reshape(z.shape))  # (the normalisation is not the identity)
    run = tmp_path / "run"
    train.main(train_args(assets, run, "--vae", str(tmp_path / "vae"), "--steps", "2", "--loss", "lpl",
                          "--lpl-tau", "100"))
    assert all(r["loss_lpl"] > 0 and math.isfinite(r["loss_diff"]) for r in read_log(run))
    assert tuple(load(run / "ckpt.pt")["latent_shape"]) == (4, 16 // factor, 16 // factor)
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "grid.png"), "--steps", "2"])
    assert Image.open(tmp_path / "grid.png").size == (8 * 18 + 2, 3 * 18 + 2)


def test_bring_your_own_decoder():
    """A decoder diffusers does not know (a CompVis-style one: blocks stored last-first, its own
    latent scale): taps + decode + latent_channels give features equal to its activations."""
    class MyDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.up = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(),
                                                               torch.nn.Upsample(scale_factor=2)) for _ in range(3)])
            self.conv_out = torch.nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, z):
            h = self.conv_in(z)
            for block in reversed(self.up):  # like CompVis' decoder, the last block runs first
                h = block(h)
            return self.conv_out(h)
    torch.manual_seed(0)
    dec = MyDecoder()
    taps = list(reversed(dec.up))
    lpl = LatentPerceptualLoss(dec, taps=taps, decode=lambda z: dec(z / 0.25), latent_channels=4)
    z = torch.randn(2, 4, 4, 4)
    h, ref = dec.conv_in(z / 0.25), []
    for block in taps:
        h = block(h)
        ref.append(h)
    for f, r in zip(lpl.features(z), ref):
        torch.testing.assert_close(f, r, rtol=0, atol=0)
    assert lpl.layer_weights == [1.0, 0.5, 0.25]
    z0_hat = z.clone().requires_grad_()
    lpl(z0_hat, z).sum().backward()
    assert torch.equal(z0_hat.grad, torch.zeros_like(z))
    assert LatentPerceptualLoss(dec, num_blocks=2, taps=taps, decode=lambda z: dec(z), latent_channels=4).layer_weights == [1.0, 0.5]
    with pytest.raises(ValueError, match="together"):
        LatentPerceptualLoss(dec, taps=taps)
    with pytest.raises(ValueError, match="ran 2 of the 3 tapped modules"):  # (the last one never runs)  # a module the decoder never calls
        LatentPerceptualLoss(dec, taps=[taps[0], dec.conv_out, taps[1]], decode=dec, latent_channels=4)
    with pytest.raises(ValueError, match="ran 1 of the 2 tapped modules"):  # out of decoding order
        LatentPerceptualLoss(dec, taps=[taps[1], taps[0]], decode=dec, latent_channels=4)


def test_unsupported_autoencoder_is_one_clear_error():
    import diffusers
    vae = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                                 layers_per_block=1, latent_channels=4)
    with pytest.raises(ValueError, match=r"cannot read a AutoencoderKLTemporalDecoder: built in are AutoencoderKL.*taps="):
        LatentPerceptualLoss(vae)
    with pytest.raises(ValueError, match="cannot read a Linear"):
        LatentPerceptualLoss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="grad_checkpointing needs a decoder that checkpoints each block"):
        LatentPerceptualLoss(tiny_family("tiny")[0], grad_checkpointing=True)


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


def saved_bytes(fn):
    """Bytes autograd stores for backward while fn runs (outside checkpointed regions)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


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


# ================================================================ lpl.py in a host trainer (copy-paste)
def test_alphas_cumprod_of_a_ddpm_scheduler_give_its_noising():
    """diffusers' DDPMScheduler.add_noise is z_t = α_t z0 + σ_t ε with the (α_t, σ_t) read from its
    alphas_cumprod, whether the schedule is a torch tensor or OpenAI's numpy float64 array."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    z0, eps, t = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8), torch.tensor([0, 10, 200, 500, 999])
    for abar in (sched.alphas_cumprod, sched.alphas_cumprod.double().numpy()):
        alpha, sigma = alpha_sigma_from_alphas_cumprod(abar, t)
        assert alpha.dtype == torch.float32 and alpha.shape == (5,)
        torch.testing.assert_close(alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps, sched.add_noise(z0, eps, t))


def test_gaussian_diffusion_eps_to_x0_equals_z0_from_prediction():
    """OpenAI's gaussian_diffusion (DiT, ADM) predicts x0 as sqrt(1/ᾱ)·x_t − sqrt(1/ᾱ − 1)·ε, written
    here from its source; lpl.py's ẑ0 from its alphas_cumprod is the same."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # gaussian_diffusion's linear schedule
    abar = np.cumprod(1 - betas)
    t = torch.tensor([3, 100, 700])
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = torch.from_numpy(abar)[t].float().view(-1, 1, 1, 1)
    theirs = (1 / a).sqrt() * x_t - (1 / a - 1).sqrt() * eps
    alpha, sigma = alpha_sigma_from_alphas_cumprod(abar, t)
    torch.testing.assert_close(z0_from_prediction(eps, x_t, alpha, sigma, "eps"), theirs, rtol=1e-5, atol=1e-5)


def test_flow_conventions_equal_a_one_step_euler_to_the_data():
    """t = 0 data (minRF, SD3): ẑ0 = z_t + (0 − t)·D, one Euler step to t = 0. t = 1 data (SiT,
    torchcfm): x̂1 = x_t + (1 − t)·u, one step to t = 1; lpl.py takes α = t, σ = 1 − t and D = −u."""
    x, v, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(4)
    tt = t.view(-1, 1, 1, 1)
    alpha, sigma = alpha_sigma_from_flow_time(t)  # data at t = 0
    torch.testing.assert_close(z0_from_prediction(v, x, alpha, sigma, "flow"), x - tt * v)
    alpha, sigma = alpha_sigma_from_flow_time(t, data_at=1)
    torch.testing.assert_close(z0_from_prediction(-v, x, alpha, sigma, "flow"), x + (1 - tt) * v)
    with pytest.raises(ValueError, match="data_at must be 0 or 1"):
        alpha_sigma_from_flow_time(t, data_at=2)


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


def test_host_trainer_traps_are_clear_errors():
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    z0, z_t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    alpha = torch.tensor([0.9, 0.8])
    with pytest.raises(ValueError, match=r"learned-sigma model .* pass pred\[:, :4\]"):
        lpl.batch_loss(torch.randn(2, 8, 4, 4), z_t, z0, alpha, alpha, "eps")
    with pytest.raises(ValueError, match="must be floats, got torch.int64: pass the schedule's values at t"):
        lpl.batch_loss(z0, z_t, z0, torch.tensor([3, 500]), torch.tensor([3, 500]), "eps")
    with pytest.raises(ValueError, match="must be floats"):
        lpl_mask(torch.tensor([3, 500]), torch.tensor([3, 500]), 4.0, 1.0)
    abar = torch.tensor([0.9, 0.6])
    with pytest.raises(ValueError, match="that is ᾱ_t and 1 − ᾱ_t"):
        lpl.batch_loss(z0, z_t, z0, abar, 1 - abar, "eps")
    with pytest.raises(ValueError, match=r"α_t \+ σ_t must be 1 on the linear path"):
        lpl.batch_loss(z0, z_t, z0, alpha, alpha, "flow")
    with pytest.raises(ValueError, match=">= 0"):
        lpl_mask(torch.tensor([-0.5]), torch.tensor([0.5]), 4.0, 1.0)
    # ᾱ as α with √(1 − ᾱ) as σ: α² + σ² = ᾱ² + 1 − ᾱ, off by up to 1/4
    with pytest.raises(ValueError, match="α_t is ᾱ_t, not its root"):
        lpl.batch_loss(z0, z_t, z0, abar, (1 - abar).sqrt(), "v")
    with pytest.raises(ValueError, match="path='any'"):  # any other break of α² + σ² = 1 under eps/v
        lpl.batch_loss(z0, z_t, z0, torch.tensor([1.0, 1.0]), torch.tensor([0.5, 2.0]), "eps")
    with pytest.raises(ValueError, match="holds on the linear path"):
        lpl.batch_loss(z0, z_t, z0, alpha, 1 - alpha, "flow", path="vp")
    with pytest.raises(ValueError, match="path must be one of"):
        lpl.batch_loss(z0, z_t, z0, alpha, (1 - alpha ** 2).sqrt(), "eps", path="VP")
    # SD3-style loops keep timesteps = 1000 σ beside the sigmas; the timesteps are named as the cause
    with pytest.raises(ValueError, match="those are timesteps .* timesteps / 1000"):
        alpha_sigma_from_flow_time(torch.tensor([999.0, 250.0]))


def readme_recipes():
    """{name: code} of the README's recipes: the python block after each '<!-- recipe: name -->'."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    parts = text.split("<!-- recipe: ")[1:]
    return {p.split(" -->")[0]: p.split("```python\n")[1].split("```")[0] for p in parts}


class _GaussianDiffusion:
    """The part of OpenAI's gaussian_diffusion (DiT, ADM) the recipe touches, written from its source:
    alphas_cumprod a numpy float64 array; q_sample; training_losses calls model(x_t, t, **kwargs) once
    and, for a learned-sigma model, regresses the first C channels on the noise."""

    def __init__(self):
        self.num_timesteps = 1000
        self.alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))

    def q_sample(self, x, t, noise):
        a = torch.from_numpy(self.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def training_losses(self, model, x, t, model_kwargs, noise):
        out = model(self.q_sample(x, t, noise), t, **model_kwargs)
        return {"loss": (out[:, :x.shape[1]] - noise).square().mean((1, 2, 3))}


def test_readme_recipes_run_and_equal_the_host_s_own_x0():
    """Each recipe of "Using the loss in your own trainer", run as printed inside a host's step, adds
    exactly w·Σ_selected L_LPL(x̂0) / B, with x̂0 from the host's own formula (the DDPM scheduler's
    pred_original_sample, gaussian_diffusion's sqrt(1/ᾱ)·x_t − sqrt(1/ᾱ − 1)·ε, a flow's Euler step
    to t = 0) and the selection σ/α ≤ τ·(latent width / 64) written out."""
    from diffusers import DDPMScheduler
    recipes = readme_recipes()
    assert len(recipes) == 4 and all(len(code.strip().splitlines()) <= 10 for code in recipes.values())
    vae = tiny_vae(blocks=2)
    lpl = LatentPerceptualLoss(vae)
    B, w_lpl, tau = 16, 0.5, 4.0
    g = torch.Generator().manual_seed(0)
    z0, noise, y = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g), torch.arange(B) % 3
    t = torch.linspace(0, 999, B).long()
    dit = lambda out_channels: train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=out_channels,  # noqa: E731
                                                      sample_size=8, num_embeds_ada_norm=3))

    def expected(z0_hat_all, alpha, sigma):
        m = sigma <= tau * (8 / 64) * alpha
        assert 0 < m.sum() < B
        return w_lpl * lpl(z0_hat_all[m], z0[m]).sum() / B

    # diffusers DDPMScheduler
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ns = dict(torch=torch, F=F, lpl=lpl, B=B, w_lpl=w_lpl, y=y, z0=z0, noise=noise, t=t, scheduler=scheduler,
              model=dit(4), alpha_sigma_from_alphas_cumprod=alpha_sigma_from_alphas_cumprod,
              alpha_sigma_from_flow_time=alpha_sigma_from_flow_time, z_t=scheduler.add_noise(z0, noise, t))
    exec(recipes["diffusers DDPMScheduler"], ns)
    pred = ns["pred"].detach()
    x0 = torch.stack([scheduler.step(pred[i:i + 1], int(t[i]), ns["z_t"][i:i + 1]).pred_original_sample[0] for i in range(B)])
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(ns["loss"] - F.mse_loss(ns["pred"], noise), expected(x0, abar.sqrt(), (1 - abar).sqrt()))

    # OpenAI gaussian_diffusion with a learned-sigma DiT (2C output channels)
    diffusion = _GaussianDiffusion()
    ns = dict(torch=torch, lpl=lpl, w_lpl=w_lpl, x=z0, t=t, model=dit(8), model_kwargs=dict(class_labels=y),
              diffusion=diffusion, alpha_sigma_from_alphas_cumprod=alpha_sigma_from_alphas_cumprod)
    model = ns["model"]
    ns["model"] = lambda x_t, t, class_labels: model(x_t, timestep=t, class_labels=class_labels).sample  # DiT's call
    torch.manual_seed(1)
    exec(recipes["OpenAI gaussian_diffusion (DiT, ADM)"], ns)
    eps_hat, x_t = ns["out"][:, :4].detach(), ns["x_t"]
    a = torch.from_numpy(diffusion.alphas_cumprod)[t].float()
    x0 = (1 / a).sqrt().view(-1, 1, 1, 1) * x_t - (1 / a - 1).sqrt().view(-1, 1, 1, 1) * eps_hat
    l2 = (eps_hat - ns["noise"]).square().mean()
    torch.testing.assert_close(ns["loss"], l2 + expected(x0, a.sqrt(), (1 - a).sqrt()), rtol=1e-4, atol=1e-5)

    # rectified flow, t = 0 data
    flow_model = dit(4)
    ns = dict(torch=torch, F=F, lpl=lpl, B=B, w_lpl=w_lpl, y=y, z0=z0, noise=noise, alpha_sigma_from_flow_time=alpha_sigma_from_flow_time,
              model=lambda z_t, t, y: flow_model(z_t, timestep=1000 * t, class_labels=y).sample)
    torch.manual_seed(2)
    exec(recipes["rectified flow (minRF, SD3)"], ns)
    tt, pred = ns["t"], ns["pred"].detach()
    x0 = ns["z_t"] + (0 - tt).view(-1, 1, 1, 1) * pred  # one Euler step to t = 0
    torch.testing.assert_close(ns["loss"] - F.mse_loss(ns["pred"], noise - z0), expected(x0, 1 - tt, tt), rtol=1e-4, atol=1e-5)
    ns["loss"].backward()  # and the gradient reaches the host's model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow_model.parameters())

    # diffusers' SD3 loop (train_dreambooth_sd3.py): timesteps from the shifted scheduler's table, the
    # sigmas looked up as its get_sigmas does, outputs preconditioned to x0 after the recipe's call
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    indices = torch.linspace(0, 999, B).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == ts).nonzero().item() for ts in timesteps]
    sigmas = sched.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    transformer = dit(4)
    ns = dict(torch=torch, lpl=lpl, w_lpl=w_lpl, model_input=z0, noise=noise, sigmas=sigmas, timesteps=timesteps,
              noisy_model_input=(1 - sigmas) * z0 + sigmas * noise, cond=dict(class_labels=y),
              args=type("Args", (), dict(precondition_outputs=1)), alpha_sigma_from_flow_time=alpha_sigma_from_flow_time,
              transformer=lambda hidden_states, timestep, class_labels: (
                  transformer(hidden_states, timestep=timestep, class_labels=class_labels).sample,))
    exec(recipes["diffusers SD3 training loop (FlowMatchEulerDiscreteScheduler)"], ns)
    x0 = ns["model_pred"].detach()  # the script's own x0 estimate
    host = (ns["model_pred"].float() - z0).square().mean()
    sg = sigmas.flatten()
    torch.testing.assert_close(ns["loss"] - host, expected(x0, 1 - sg, sg), rtol=1e-4, atol=1e-5)


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


def test_decoders_that_cannot_decode_an_image_latent_are_one_clear_error():
    """A 1-D (audio) decoder, or a decoder given the wrong latent_channels, fails in the loss's own
    dry run with a ValueError that says so, not with a raw convolution error later."""
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.Conv1d(8, 2, 3, padding=1))
    with pytest.raises(ValueError, match="LPL needs an image decoder"):
        LatentPerceptualLoss(conv1d, taps=[conv1d[0]], decode=conv1d, latent_channels=4)
    vae = tiny_vae(blocks=2)
    with pytest.raises(ValueError, match=r"cannot decode a \(1, 16, 2, 2\) latent"):
        LatentPerceptualLoss(vae, taps=[vae.decoder.mid_block], decode=lambda z: vae.decode(z).sample, latent_channels=16)


# ================================================================ train.py / sample.py end to end
import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import comparisons  # noqa: E402
import data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def write_pngs(folder, classes=("cat", "dog", "ship"), per_class=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(img).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny VAE saved with save_pretrained (and one with 8 latent channels), 3 classes x 8
    synthetic 16x16 PNGs, and a pre-trained run to post-train or resume from."""
    root = tmp_path_factory.mktemp("assets")
    tiny_vae(blocks=2).save_pretrained(root / "vae")
    tiny_vae(blocks=2, latent_channels=8).save_pretrained(root / "vae8")
    write_pngs(root / "data")
    (root / "empty").mkdir()
    train.main(train_args(root, root / "runs" / "pre", "--steps", "2"))
    return root


def train_args(assets, run_dir, *extra):
    return ["--data", str(assets / "data"), "--vae", str(assets / "vae"), "--image-size", "16",
            "--model", "DiT-T/2", "--batch-size", "8", "--run-dir", str(run_dir), "--log-every", "1",
            "--sample-every", "1000", *extra]


def read_log(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def load(path):
    return torch.load(path, weights_only=False)


def one_line_error(fn, *args):
    """fn must stop with exactly one line starting 'error:' (an exception would fail the test)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert "error:" in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_train_each_paradigm_with_lpl_then_sample(assets, tmp_path, paradigm):
    run = tmp_path / paradigm
    train.main(train_args(assets, run, "--paradigm", paradigm, "--steps", "3", "--loss", "lpl", "--lpl-weight", "3",
                          "--lpl-tau", "100", "--sample-every", "3"))
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss_lpl"]) and r["loss_lpl"] > 0 and r["lpl_frac"] > 0 for r in log)
    for r in log:  # the share of w·L_LPL in the total loss, as the paper's rule for w_LPL counts it
        assert r["lpl_share"] == pytest.approx(3 * r["loss_lpl"] / (r["loss_diff"] + 3 * r["loss_lpl"]))
    assert (run / "ckpt.pt").exists() and (run / "samples-0000003.png").exists()
    assert not (run / ".lock").exists()
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["paradigm"] == paradigm and "ema" in ckpt and "opt" in ckpt
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(out), "--steps", "2"])
    assert Image.open(out).size == (8 * 18 + 2, 3 * 18 + 2)  # 3 classes x 8, 16 px + 2 px padding
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out-dir", str(tmp_path / "pngs"), "--n", "5",
                 "--steps", "2", "--classes", "1"])
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(5)]


# ---------------------------------------------------------------- classifier-free guidance training
def test_labels_dropped_once_per_sample_in_every_block():
    """diffusers' DiT drops labels independently in each block's embedding (13 draws for DiT-S/2);
    here a sample must be conditional in every block or unconditional in every block, and the null
    class must come only from the trainer's single draw."""
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8,
                                   num_embeds_ada_norm=10)).train()
    seen = []
    tables = [m.embedding_table for m in model.modules() if isinstance(m, train_embedding_class())]
    assert len(tables) == 2 and all(t.num_embeddings == 11 for t in tables)  # the null row is kept
    for t in tables:
        t.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    torch.manual_seed(0)
    y = train.drop_labels(torch.randint(0, 10, (4000,)), 10, 0.1)
    assert 0.08 < (y == 10).float().mean() < 0.12
    for _ in range(3):
        seen.clear()
        model(torch.randn(4000, 4, 8, 8), timestep=torch.full((4000,), 500), class_labels=y)
        assert len(seen) == 3  # two blocks and the final layer
        assert all(torch.equal(s, y) for s in seen)
    assert torch.equal(train.drop_labels(y, 10, 0.0), y)


def train_embedding_class():
    from diffusers.models.embeddings import LabelEmbedding
    return LabelEmbedding


# ---------------------------------------------------------------- the latent cache
def test_lpl_off_logs_no_lpl_and_cache_is_reused(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "a", "--steps", "2"))
    caches = list(tmp_path.glob("latents-*.pt"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    train.main(train_args(assets, tmp_path / "b", "--steps", "1"))
    assert caches[0].stat().st_mtime_ns == mtime  # same data + VAE: encoded once
    assert all("loss_lpl" not in r and "lpl_share" not in r for r in read_log(tmp_path / "a"))  # not "measured: 0"
    z = torch.load(caches[0])["z"]
    assert z.shape == (48, 4, 8, 8)  # 24 images x 2 flips


def test_cache_key_follows_the_vae_weights_not_their_dates(assets, tmp_path):
    """The key reads the VAE's weights, not their dates (a model folder provisioned again keeps its
    latents, and its runs can resume); one changed bit changes it. A post-training in another folder,
    and its resume, reuse its pre-training's latents instead of encoding the data again."""
    vae_dir, files = tmp_path / "vae", [str(p) for p in sorted((assets / "data").rglob("*.png"))]
    shutil.copytree(assets / "vae", vae_dir)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    key = lambda: os.path.basename(data.cache_path(argparse.Namespace(  # noqa: E731
        vae=str(vae_dir), images_per_class=None, image_size=16, run_dir=str(tmp_path / "r")), vae, files))
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    before = key()
    os.utime(weights, (0, 0))  # copied without its dates
    assert key() == before
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the weights
    weights.write_bytes(bytes(raw))
    assert key() != before
    (pre_cache,) = (assets / "runs").glob("latents-*.pt")
    train.main(train_args(assets, tmp_path / "elsewhere" / "post", "--steps", "1",
                          "--init-from", str(assets / "runs" / "pre")))
    assert not list((tmp_path / "elsewhere").glob("latents-*.pt"))  # nothing encoded again
    assert load(tmp_path / "elsewhere" / "post" / "ckpt.pt")["args"]["latent_cache"] == str(pre_cache)
    train.main(["--resume", str(tmp_path / "elsewhere" / "post"), "--steps", "2"])  # and so does its resume
    assert not list((tmp_path / "elsewhere").glob("latents-*.pt"))


def test_images_per_class_takes_the_first_of_each_class(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "4", "--images-per-class", "2"))
    (cache,) = tmp_path.glob("latents-*.pt")
    data = torch.load(cache)
    assert data["y"].tolist() == [0, 0, 1, 1, 2, 2] * 2  # the 6 images, then their mirrors
    ref = torch.load(next(assets.glob("runs/latents-*.pt")))  # all 8 per class, in one batch
    torch.testing.assert_close(data["z"][:2], ref["z"][:2])  # images 0, 1 of class 0
    torch.testing.assert_close(data["z"][2:4], ref["z"][8:10])  # images 0, 1 of class 1


def test_imagenet_npz_batches_are_encoded_file_by_file(assets, tmp_path):
    """Two official-format batches (6 + 4 images): the latents are those of the area-resized images,
    in file order, with labels 1..3 mapped to 0..2."""
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (6, 12288), dtype=np.uint8), rng.integers(0, 256, (4, 12288), dtype=np.uint8)]
    labels = [np.array([1, 2, 3, 1, 2, 3]), np.array([3, 3, 1, 2])]
    (tmp_path / "npz").mkdir()
    for k in range(2):
        np.savez(tmp_path / "npz" / f"train_data_batch_{k + 1}.npz", data=data[k], labels=labels[k])
    argv = ["--data", str(tmp_path / "npz"), *train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "4")[2:]]
    train.main(argv)
    (cache,) = tmp_path.glob("latents-*.pt")
    got = torch.load(cache)
    x = torch.from_numpy(np.concatenate(data)).view(-1, 3, 64, 64).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="area")
    vae = AutoencoderKL.from_pretrained(str(assets / "vae"), low_cpu_mem_usage=False)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(got["z"][:10].float(), z, atol=2e-3, rtol=1e-2)  # cached in fp16
    torch.testing.assert_close(got["z"][10:].float(), vae.encode(x.flip(-1)).latent_dist.mean.detach()
                               * vae.config.scaling_factor, atol=2e-3, rtol=1e-2)
    assert got["y"].tolist() == (np.concatenate(labels) - 1).tolist() * 2 and got["classes"] == ["0", "1", "2"]
    train.main(["--data", str(tmp_path / "npz"), *train_args(assets, tmp_path / "r2", "--steps", "1",
                                                              "--batch-size", "2", "--images-per-class", "1")[2:]])
    (small,) = [c for c in tmp_path.glob("latents-*.pt") if c != cache]
    assert torch.load(small)["y"].tolist() == [0, 1, 2] * 2  # the first image of each class


def test_cache_follows_the_data_and_survives_truncation(assets, tmp_path, capsys):
    data = tmp_path / "data"
    write_pngs(data, classes=("a", "b"), per_class=4)
    args = lambda run, *x: ["--data", str(data), *train_args(assets, tmp_path / run, *x)[2:]]  # noqa: E731
    train.main(args("r1", "--steps", "1"))
    write_pngs(data, classes=("a", "b", "c", "d"), per_class=5, seed=1)  # the folder grows: 20 images, 4 classes
    train.main(args("r2", "--steps", "1"))
    caches = sorted(tmp_path.glob("latents-*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert len(caches) == 2
    new = torch.load(caches[-1])
    assert new["z"].shape[0] == 40 and new["classes"] == ["a", "b", "c", "d"]
    assert load(tmp_path / "r2" / "ckpt.pt")["model_config"]["num_embeds_ada_norm"] == 4
    caches[-1].write_bytes(caches[-1].read_bytes()[:100])  # a kill during the write of the cache
    train.main(["--resume", str(tmp_path / "r2"), "--steps", "2"])  # resume re-encodes, says so
    assert "is unreadable" in "".join(capsys.readouterr())
    assert torch.equal(torch.load(caches[-1])["z"], new["z"])


# ---------------------------------------------------------------- work is never lost
def test_resume_continues_exactly(assets, tmp_path):
    lpl = ["--loss", "lpl", "--lpl-tau", "20", "--ckpt-every", "2"]
    train.main(train_args(assets, tmp_path / "full", "--steps", "4", *lpl))
    train.main(train_args(assets, tmp_path / "cut", "--steps", "2", *lpl))
    assert load(tmp_path / "cut" / "ckpt.pt")["step"] == 2
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:  # rows a killed run wrote after its checkpoint
        f.write(json.dumps(dict(step=3, loss_diff=9.0, loss_lpl=9.0)) + "\n")
    train.main(["--resume", str(tmp_path / "cut"), "--steps", "4", "--log-every", "1"])
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert any(r["loss_lpl"] > 0 for r in full[2:])  # LPL is active after the resume
    for a, b in zip(full, cut):
        assert (a["loss_diff"], a["loss_lpl"]) == (b["loss_diff"], b["loss_lpl"])
    assert load(tmp_path / "cut" / "ckpt.pt")["step"] == 4


def test_resume_writes_into_the_directory_it_is_given(assets, tmp_path, monkeypatch):
    """A copy of a run resumes into the copy; a run made with a relative --run-dir resumes in place."""
    monkeypatch.chdir(tmp_path)
    train.main(train_args(assets, "orig", "--steps", "2", "--ckpt-every", "1"))  # relative --run-dir
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    monkeypatch.chdir(assets)  # elsewhere
    train.main(["--resume", str(tmp_path / "copy"), "--steps", "4"])
    assert load(tmp_path / "copy" / "ckpt.pt")["step"] == 4
    assert load(tmp_path / "orig" / "ckpt.pt")["step"] == 2  # the original is untouched
    assert not (assets / "orig").exists()
    train.main(["--resume", str(tmp_path / "orig"), "--steps", "3"])
    assert load(tmp_path / "orig" / "ckpt.pt")["step"] == 3


def test_resume_refuses_changed_settings_and_accepts_safe_ones(assets, tmp_path):
    run = tmp_path / "r"
    train.main(train_args(assets, run, "--steps", "2"))
    msg = one_line_error(train.main, ["--resume", str(run), "--steps", "4", "--lr", "1e-5", "--loss", "lpl"])
    assert "--loss, --lr would change them" in msg and "--init-from" in msg
    one_line_error(train.main, ["--resume", str(run), "--steps", "2"])  # already there
    assert load(run / "ckpt.pt")["step"] == 2
    # the run's own command again, plus --resume and safe overrides, is fine
    train.main(train_args(assets, run, "--steps", "3", "--resume", str(run), "--log-every", "5"))
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["log_every"] == 5 and ckpt["args"]["lr"] == 1e-4


def test_fresh_run_never_overwrites_a_run(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "r", "--steps", "1"))
    assert "already holds a run" in one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "1"))
    assert load(tmp_path / "r" / "ckpt.pt")["step"] == 1


def test_non_finite_weights_are_never_saved(assets, tmp_path, monkeypatch):
    """A finite loss can still give non-finite weights (7e28 did): the checkpoint must keep the last
    finite state, and the message must say which."""
    step = torch.optim.AdamW.step
    calls = [0]

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "5", "--ckpt-every", "1"))
    assert "not finite at step 3" in msg and "checkpoint of step 2 is kept" in msg
    ckpt = load(tmp_path / "r" / "ckpt.pt")
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_nan_loss_stops_before_the_update(assets, tmp_path, monkeypatch):
    calls, mse = [], F.mse_loss

    def diverging(*a, **k):  # the loss turns NaN at the fourth step (--lr is bounded now, so no 1e20)
        calls.append(1)
        return mse(*a, **k) * (float("nan") if len(calls) >= 4 else 1.0)
    monkeypatch.setattr(train.F, "mse_loss", diverging)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "nan", "--steps", "20", "--ckpt-every", "1"))
    assert "not finite" in msg
    ckpt = load(tmp_path / "nan" / "ckpt.pt")  # readable, not half-written, and finite
    assert ckpt["step"] >= 1 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert not (tmp_path / "nan" / "ckpt.pt.tmp").exists()


def test_interrupt_keeps_the_checkpoint_and_says_how_to_resume(assets, tmp_path, monkeypatch):
    step = torch.optim.AdamW.step
    calls = [0]

    def interrupted(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "5", "--ckpt-every", "1"))
    assert "interrupted" in msg and "(2 steps)" in msg and "--resume" in msg
    assert not (tmp_path / "r" / ".lock").exists()


def test_second_run_on_a_directory_is_refused(assets, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lock = train.lock_run_dir(str(run))  # a run in progress
    try:
        assert "another train.py" in one_line_error(train.main, train_args(assets, run, "--steps", "1"))
        assert (run / ".lock").exists()  # the other run's lock is left alone
    finally:
        lock.close()


def test_failed_run_leaves_no_empty_directory(assets, tmp_path):
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "1000"))
    assert "fewer than --batch-size" in msg and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- post-training
def test_init_from_starts_a_new_run_from_weights(assets, tmp_path, capsys):
    pre = load(assets / "runs" / "pre" / "ckpt.pt")
    train.main(train_args(assets, tmp_path / "post", "--steps", "1", "--init-from",
                          str(assets / "runs" / "pre" / "ckpt.pt"), "--loss", "lpl", "--lpl-tau", "100"))
    post = load(tmp_path / "post" / "ckpt.pt")
    assert post["step"] == 1 and post["args"]["init_from"]
    moved = [not torch.equal(pre["model"][k], post["model"][k]) for k in pre["model"]]
    assert any(moved)
    fresh = train.build_model(pre["model_config"]).state_dict()
    k = "transformer_blocks.0.attn1.to_q.weight"  # post-training started from pre's weights, not afresh
    assert (post["model"][k] - pre["model"][k]).abs().max() < (post["model"][k] - fresh[k]).abs().max()
    # EMA warm-up: the first step's decay is 1/10, so the EMA mostly follows this run, not pre's EMA
    for k in pre["ema"]:
        torch.testing.assert_close(post["ema"][k], 0.1 * pre["ema"][k] + 0.9 * post["model"][k])
    # the grid names both step counts: the post-training's own and the pre-training's before it
    sample.main(["--ckpt", str(tmp_path / "post" / "ckpt.pt"), "--out", str(tmp_path / "g.png"), "--steps", "1"])
    assert f"at step 1 after {pre['step']} of pre-training" in capsys.readouterr().out


def test_default_lpl_weight_gives_lpl_a_fifth_of_the_loss(assets, tmp_path):
    """The one-fifth rule (Section 4.3): without --lpl-weight, w_LPL is measured on the starting model
    so that w·L_LPL / (L_Diff + w·L_LPL) = 1/5. With a learning rate too small to move the model, the
    share over the run's own (other) batches must come out near 1/5; the weight is in the checkpoint."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    run = tmp_path / "auto"
    train.main(train_args(assets, run, "--init-from", pre, "--loss", "lpl", "--lpl-tau", "1000", "--lr", "1e-12",
                          "--steps", "40", "--log-every", "40", "--lpl-calibration-batches", "40"))
    w = load(run / "ckpt.pt")["args"]["lpl_weight"]
    (row,) = read_log(run)
    assert row["lpl_weight"] == w > 0
    assert abs(row["lpl_share"] - 0.2) < 0.03, row  # 1/4 or 1/2 (a rule written wrong) would fail


def test_lpl_weight_calibration_leaves_the_run_as_with_that_weight_given(assets, tmp_path):
    """The calibration batches are drawn from their own generator: a run with the measured weight
    given explicitly trains on the same batches, times and noise, and so logs the same losses."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    common = ("--init-from", pre, "--loss", "lpl", "--lpl-tau", "100", "--steps", "3")
    train.main(train_args(assets, tmp_path / "auto", *common))
    w = load(tmp_path / "auto" / "ckpt.pt")["args"]["lpl_weight"]
    train.main(train_args(assets, tmp_path / "given", *common, "--lpl-weight", repr(w)))
    for a, b in zip(read_log(tmp_path / "auto"), read_log(tmp_path / "given"), strict=True):
        assert a["loss_diff"] == b["loss_diff"] and a["loss_lpl"] == b["loss_lpl"]


def test_init_from_checks_what_the_checkpoint_was_trained_on(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    other = tmp_path / "two-classes"
    write_pngs(other, classes=("a", "b"))
    cases = {
        "latents (4, 8, 8)": ["--vae", str(assets / "vae8")],  # (another --image-size is a post-training at
        # that resolution now: test_post_training_at_a_higher_resolution_carries_every_weight_and_scales_tau)
        "trained on 3 classes": ["--data", str(other)],
        "does not match": ["--model", "DiT-S/2"],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(train.main, train_args(assets, tmp_path / "r", "--init-from", pre, *extra))
    train.main(train_args(assets, tmp_path / "ok", "--init-from", pre, "--steps", "1", "--model", "DiT-T/2"))
    # data, VAE and image size default to the pre-training's (the defaults would be CIFAR-10 and the SD VAE)
    train.main(["--init-from", pre, "--run-dir", str(tmp_path / "short"), "--steps", "1", "--batch-size", "8",
                "--sample-every", "1000"])
    args = load(tmp_path / "short" / "ckpt.pt")["args"]
    assert (args["data"], args["vae"], args["image_size"]) == (str(assets / "data"), str(assets / "vae"), 16)


# ---------------------------------------------------------------- bad input: one line, before the work
def test_bad_input_is_one_line(assets, tmp_path):
    bad = tmp_path / "bad"
    write_pngs(bad, classes=("a", "b"), per_class=2)
    (bad / "a" / "broken.png").write_bytes((bad / "a" / "0.png").read_bytes()[:60])  # truncated
    notimg = tmp_path / "notimg"
    write_pngs(notimg, classes=("a",), per_class=2)
    (notimg / "a" / "x.png").write_text("hello")
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "train_data_batch_1.npz", data=np.zeros((4, 100), np.uint8), labels=np.ones(4))
    (tmp_path / "file").write_text("")
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    from diffusers import UNet2DModel  # a diffusers model, but no autoencoder
    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, sample_size=8,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    (tmp_path / "notrun").mkdir()
    torch.save({"weights": 1}, tmp_path / "notrun" / "ckpt.pt")
    r = str(tmp_path / "run")
    cases = {
        "broken.png": ["--data", str(bad)],
        "x.png": ["--data", str(notimg)],
        "train_data_batch_1.npz is not an ImageNet": ["--data", str(npz)],
        "argument --image-size: '0' is not an integer >= 1": ["--image-size", "0"],
        "argument --image-size: '-16' is not an integer >= 1": ["--image-size", "-16"],
        "must be a multiple of 4": ["--image-size", "2"],  # f2 VAE x patch 2
        "argument --batch-size: '0' is not an integer >= 1": ["--batch-size", "0"],
        "argument --lr: '-1' is not a finite number > 0": ["--lr", "-1"],
        "argument --lr: 'nan' is not a finite number": ["--lr", "nan"],
        "argument --lpl-tau: 'nan' is not a finite number": ["--lpl-tau", "nan"],
        "argument --lpl-tau: '0' is not a finite number > 0": ["--lpl-tau", "0"],
        "argument --sp-layer: '0' is not an integer >= 1": ["--loss", "self-perceptual", "--init-from", str(assets / "runs" / "pre"),
                                    "--sp-layer", "0"],
        "argument --lr: '-1e-4' is not a finite number > 0": ["--lr", "-1e-4"],  # argparse reads -1e-4 as a number
        "num_blocks must be in 1..3": ["--loss", "lpl", "--lpl-blocks", "9"],
        "argument --log-every: '0' is not an integer >= 1": ["--log-every", "0"],
        "argument --ckpt-every: '0' is not an integer >= 1": ["--ckpt-every", "0"],
        "argument --steps: '0' is not an integer >= 1": ["--steps", "0"],
        "argument --steps: '-3' is not an integer >= 1": ["--steps", "-3"],
        "argument --lpl-weight: '-1' is not a finite number > 0": ["--lpl-weight", "-1"],
        "argument --lpl-weight: 'nan' is not a finite number": ["--lpl-weight", "nan"],
        "argument --ema-decay: '1.5' is not a finite number >= 0 and <= 1": ["--ema-decay", "1.5"],
        "argument --device: 'tpu9' is not a device": ["--device", "tpu9"],
        "cannot be written": ["--run-dir", str(tmp_path / "file" / "run")],
        "is missing, not an existing folder or 'cifar10'": ["--data", str(tmp_path / "nope")],
        "no images": ["--data", str(assets / "empty")],
        "is missing, not an existing folder or a Hugging Face id": ["--vae", str(tmp_path / "no-vae")],
        "cannot load the VAE": ["--vae", str(assets / "empty")],
        "is a UNet2DModel; the trainer takes the autoencoders lpl.py supports": ["--vae", str(tmp_path / "unet")],
        "corrupted or not a train.py checkpoint": ["--init-from", str(tmp_path / "junk.pt")],
        "is not a train.py checkpoint (no 'args'": ["--init-from", str(tmp_path / "other.pt")],
    }
    if not torch.cuda.is_available():
        cases["0 CUDA device(s) are visible"] = ["--device", "cuda"]
    if not torch.backends.mps.is_available():
        cases["MPS is not available"] = ["--device", "mps"]
    for expected, extra in cases.items():
        argv = train_args(assets, r, "--steps", "1", *extra)
        if "--run-dir" in extra:
            argv = train_args(assets, extra[1], "--steps", "1")
        assert expected in one_line_error(train.main, argv), expected
        assert not os.path.exists(r), expected  # nothing left behind
    assert "is not a train.py checkpoint" in one_line_error(train.main, ["--resume", str(tmp_path / "notrun")])


def test_bad_sample_input_is_one_line_before_sampling(assets, tmp_path):
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    nan = load(ckpt)
    nan["ema"] = {k: torch.full_like(v, float("nan")) for k, v in nan["ema"].items()}
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "dir.png").mkdir()
    cases = {
        "argument --n: '0' is not an integer >= 1": ["--n", "0"],
        "argument --n: '-2' is not an integer >= 1": ["--n", "-2"],
        "argument --batch-size: '0' is not an integer >= 1": ["--batch-size", "0"],
        "argument --steps: '0' is not an integer >= 1": ["--steps", "0"],
        "argument --cfg: 'nan' is not a finite number": ["--cfg", "nan"],
        "does not exist": ["--out", str(tmp_path / "missing" / "grid.png")],
        "does not end in .png": ["--out", str(tmp_path / "grid")],
        "is a folder, not a file name": ["--out", str(tmp_path / "dir.png")],  # an existing folder
        "8 latent channels": ["--vae", str(assets / "vae8")],
        "--classes must be in 0..2": ["--classes", "3"],
        "argument --per-class: '0' is not an integer >= 1": ["--per-class", "0"],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(sample.main, ["--ckpt", ckpt, *extra]), expected
    assert "non-finite weights" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "nan.pt")])
    # FID's inputs are checked before any sampling: nothing is written
    net = tmp_path / "net.pt"
    torch.jit.script(_ColourMeans()).save(str(net))
    metrics_inception = fid.inception_path
    fid.inception_path = lambda: str(net)
    try:
        write_pngs(tmp_path / "big", classes=("a",), per_class=2, size=32)
        np.savez(tmp_path / "wrong-dim.npz", mu=np.zeros(5), sigma=np.eye(5))
        np.savez(tmp_path / "no-sigma.npz", mu=np.zeros(3))
        (tmp_path / "used").mkdir()
        (tmp_path / "used" / "000000.png").write_bytes(b"old")
        out = str(tmp_path / "s")
        fid_cases = {
            "the samples 16x16": ["--fid-ref", str(tmp_path / "big")],
            "holds statistics of 5-d features, the FID network gives 3-d": ["--fid-ref", str(tmp_path / "wrong-dim.npz")],
            "is not an FID statistics file": ["--fid-ref", str(tmp_path / "no-sigma.npz")],
            "holds no images": ["--fid-ref", str(assets / "empty")],
            "--fid needs --n >= 2": ["--n", "1", "--fid-ref", str(assets / "data")],
        }
        for expected, extra in fid_cases.items():
            assert expected in one_line_error(sample.main, ["--ckpt", ckpt, "--fid", "--out-dir", out, *extra]), expected
            assert not os.path.exists(out), expected
        msg = one_line_error(sample.main, ["--ckpt", ckpt, "--out-dir", str(tmp_path / "used"), "--n", "2"])
        assert "is not empty" in msg and os.listdir(tmp_path / "used") == ["000000.png"]  # never mixed, never lost
    finally:
        fid.inception_path = metrics_inception


    huge = load(ckpt)  # finite weights whose output overflows (--cfg is bounded now, so no 1e30 guidance)
    huge["ema"] = {k: v * 1e30 if k.startswith("proj_out") else v for k, v in huge["ema"].items()}
    torch.save(huge, tmp_path / "huge.pt")
    assert "non-finite latents" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "huge.pt"), "--steps", "2",
                                                               "--out", str(tmp_path / "h.png")])


class _ColourMeans(torch.nn.Module):  # a stand-in FID network: 3-d features
    def forward(self, x):
        return x.mean((2, 3))


def test_grid_has_a_row_per_class_and_is_reproducible(assets, tmp_path):
    """--per-class K: one row of K per class; the noise comes from --seed alone, so grids of two
    models (baseline, LPL) with one seed start from the same noise, image by image."""
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--per-class", "3", "--steps", "2"])
    assert Image.open(tmp_path / "g.png").size == (3 * 18 + 2, 3 * 18 + 2)  # 16 px images, 2 px padding
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "h.png"), "--per-class", "3", "--steps", "2"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "h.png")))
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "l.png"), "--per-class", "3", "--steps", "2", "--label-rows"])
    labelled = np.asarray(Image.open(tmp_path / "l.png"))
    w = labelled.shape[1] - (3 * 18 + 2)  # a column of names ("cat", "dog", "ship") left of the same grid
    assert w > 0 and np.array_equal(labelled[:, w:], np.asarray(Image.open(tmp_path / "g.png")))
    assert (labelled[:, :w] < 128).any() and (labelled[:, :w] == 255).mean() > 0.5  # dark text on white


def test_help_shows_every_default(capsys):
    """Every option of the three scripts has help text that ends with its default."""
    import re

    import bench
    for get_args in (train.get_args, sample.get_args, bench.get_args):
        with pytest.raises(SystemExit):
            get_args(["--help"])
        out = capsys.readouterr().out
        blocks = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]  # one per option
        assert len(blocks) > 5
        for block in blocks:
            assert block.startswith("-h") or "default" in block.lower() or "(required)" in block, block


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing data", "corrupted ckpt", "bad type"])
def test_cli_errors_are_one_line(assets, tmp_path, case):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    argv = {
        "missing data": ["train.py", *train_args(assets, tmp_path / "r", "--data", str(tmp_path / "nope"))],
        "corrupted ckpt": ["sample.py", "--ckpt", str(tmp_path / "bad.pt")],
        "bad type": ["train.py", "--batch-size", "many"],
    }[case]
    r = run_cli(*argv)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_runs_and_prints_the_ratios():
    r = run_cli("bench.py", "--batch-size", "4", "--image-size", "16", "--lpl-fraction", "0.5",
                "--model", "DiT-T/2", "--reps", "1", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("step-time ratio LPL / baseline", "efficiency (LPL - baseline) / limit",
                 "memory ratio LPL / baseline", "no sample under threshold / baseline",
                 "grad checkpointing: memory"):
        assert line in r.stdout
    assert "2/4 samples under the threshold" in r.stdout
    r = run_cli("bench.py", "--batch-size", "4", "--image-size", "16", "--lpl-fraction", "0.1", "--model", "DiT-T/2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("bench.py: error: --lpl-fraction 0.100 puts 0 of 4 samples under the threshold; "
                                "it must select 1 to 4: raise --lpl-fraction or --batch-size")
    r = run_cli("bench.py", "--vae", "/nonexistent/vae")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "is missing, not an existing folder" in r.stderr


# ================================================================ train_vae.py
def test_train_vae_writes_a_usable_autoencoder_with_measured_metrics(assets, tmp_path):
    import train_vae
    from diffusers import AutoencoderKL
    out = tmp_path / "vae"
    argv = ["--data", str(assets / "data"), "--test-data", str(assets / "data"), "--out", str(out),
            "--image-size", "16", "--batch-size", "4", "--warmup", "1", "--ckpt-every", "1"]
    train_vae.main([*argv, "--steps", "2"])
    assert "holds a training state" in one_line_error(train_vae.main, [*argv, "--steps", "3"])
    train_vae.main([*argv, "--steps", "3", "--resume"])  # continues from step 2
    assert torch.load(out / "train-state.pt", weights_only=False)["step"] == 3
    vae = AutoencoderKL.from_pretrained(str(out), low_cpu_mem_usage=False).eval()
    assert vae.config.latent_channels == 4 and 2.5e6 < sum(p.numel() for p in vae.parameters()) < 3e6
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in sorted((assets / "data").glob("*/*.png"))])  # ImageFolder's order
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
    assert z.shape == (24, 4, 4, 4)
    metrics_json = json.load(open(out / "metrics.json"))
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=1e-4)
    psnr = (10 * torch.log10(1 / ((rec - x) / 2).square().flatten(1).mean(1))).mean().item()
    assert metrics_json["test_psnr_db"] == pytest.approx(psnr, abs=0.01)
    assert (out / "reconstructions.png").exists()
    # and train.py takes it as --vae
    train.main(train_args(assets, tmp_path / "run", "--vae", str(out), "--steps", "1", "--loss", "lpl"))


# ================================================================ metrics.py: FID and spectrum, known answers
import fid  # noqa: E402
import metrics  # noqa: E402


def fid_of_features(f1, f2):
    return fid.frechet_distance(*fid.gaussian_stats(f1), *fid.gaussian_stats(f2))


def test_frechet_distance_of_known_gaussians():
    """N(0, I) vs N(a·1, s²I) in D dims: FID = D·(a² + (1 − s)²), and 0 for equal statistics."""
    D, a, s = 16, 0.3, 2.0
    mu1, mu2 = np.zeros(D), np.full(D, a)
    assert fid.frechet_distance(mu1, np.eye(D), mu2, s * s * np.eye(D)) == pytest.approx(D * (a * a + (1 - s) ** 2))
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D))
    sigma = A @ A.T
    assert abs(fid.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8
    feats = rng.normal(size=(500, D))
    mu, cov = fid.gaussian_stats(feats)
    torch.testing.assert_close(torch.from_numpy(cov), torch.from_numpy(np.cov(feats.T)))


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5  # rank-9 covariances
    v = fid_of_features(f1, f2)
    assert math.isfinite(v) and v > 0


def test_tf1_resize_matrix_equals_a_direct_loop():
    """TensorFlow 1 resize_bilinear (align_corners=False), written per output pixel."""
    for n_in, n_out in ((32, 299), (16, 299), (299, 299), (7, 3)):
        ref = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = i * n_in / n_out
            lo = math.floor(src)
            hi = min(lo + 1, n_in - 1)
            ref[i, lo] += 1 - (src - lo)
            ref[i, hi] += src - lo
        torch.testing.assert_close(fid.tf1_resize_matrix(n_in, n_out), ref)
    assert torch.equal(fid.tf1_resize_matrix(299, 299), torch.eye(299, dtype=torch.float64))


def test_inception_features_feed_the_network_299px_in_tf_range(tmp_path):
    """A stand-in TorchScript network (the channel means) shows what the FID network receives."""
    class Means(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-2:] == (299, 299)
            return x.mean((2, 3))
    torch.jit.script(Means()).save(str(tmp_path / "net.pt"))
    ext = fid.InceptionFeatures(str(tmp_path / "net.pt"))
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    x[0], x[1, 1] = 255, 128
    out = ext(x)
    torch.testing.assert_close(out, torch.tensor([[127 / 128] * 3, [-1.0, 0.0, -1.0]], dtype=torch.float64))
    # and end to end on folders: FID of a folder against itself is 0
    write_pngs(tmp_path / "imgs", classes=("a",), per_class=5)
    stats = fid.fid_stats(str(tmp_path / "imgs"), ext)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6


def test_spectrum_of_white_noise_is_flat_and_an_image_against_itself_is_zero():
    torch.manual_seed(0)
    noise = torch.randn(256, 3, 32, 32)
    p = metrics.radial_power_spectrum(noise)
    assert p.shape == (16,)
    assert (p / p.mean() - 1).abs().max() < 0.1  # flat: white noise has the same power at every frequency
    assert p.mean() == pytest.approx(1.0, rel=0.05)  # unit variance, orthonormal FFT
    smooth = torch.nn.functional.avg_pool2d(noise, 3, 1, 1)  # a low-pass filter removes high frequencies
    ps = metrics.radial_power_spectrum(smooth)
    assert ps[-1] < 0.1 * ps[0]
    assert metrics.spectrum_error(p, p) == 0
    assert metrics.spectrum_error(2 * p, p) == pytest.approx(math.log(2))


def test_sample_fid_offline_with_a_stand_in_network(assets, tmp_path, monkeypatch, capsys):
    """sample.py --fid end to end, with a stand-in network (colour means and stds): the FID it prints
    equals the FID computed independently from the PNGs it wrote."""
    class Moments(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    torch.jit.script(Moments()).save(str(tmp_path / "net.pt"))
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "net.pt"))
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    msg = one_line_error(sample.main, ["--ckpt", ckpt, "--fid", "--out-dir", str(tmp_path / "s"), "--fid-ref",
                                       str(tmp_path / "nope")])
    assert "does not exist" in msg and not (tmp_path / "s").exists()
    metrics.main(["stats", str(assets / "data"), str(tmp_path / "ref.npz")])
    for i, ref in enumerate((str(assets / "data"), str(tmp_path / "ref.npz"))):  # the data folder, or its statistics
        capsys.readouterr()
        sample.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / f"s{i}"), "--n", "12", "--steps", "2", "--fid",
                     "--fid-ref", ref])
        printed = float(capsys.readouterr().out.split("FID ")[1].split()[0])
        if i == 0:  # the data folder's statistics are kept next to the run directory, once
            (kept,) = [p for p in (assets / "runs").glob("fid-stats-*.npz") if p.stat().st_mtime > os.path.getmtime(tmp_path / "net.pt")]
            mtime = kept.stat().st_mtime_ns
            sample.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / "again"), "--n", "2", "--steps", "1", "--fid",
                         "--fid-ref", ref])
            assert kept.stat().st_mtime_ns == mtime
        ext = fid.InceptionFeatures(str(tmp_path / "net.pt"))
        feats = fid.features_of_files(fid.image_files(str(tmp_path / f"s{i}")), ext)
        ref_feats = fid.features_of_files(fid.image_files(str(assets / "data")), ext)
        assert printed == pytest.approx(fid_of_features(feats, ref_feats), abs=1e-4)


def test_toy_dataset_makes_the_offline_quick_start(tmp_path):
    import data
    data.main(["toy", str(tmp_path / "toy"), "--per-class", "4"])
    classes = sorted(os.listdir(tmp_path / "toy" / "images"))
    assert classes == ["circle", "square", "stripes"] and len(os.listdir(tmp_path / "toy" / "images" / "square")) == 4
    train.main(["--data", str(tmp_path / "toy" / "images"), "--vae", str(tmp_path / "toy" / "vae"), "--image-size", "16",
                "--model", "DiT-T/2", "--batch-size", "8", "--steps", "2", "--loss", "lpl", "--sample-every", "1000",
                "--run-dir", str(tmp_path / "runs" / "quick")])
    assert load(tmp_path / "runs" / "quick" / "ckpt.pt")["latent_shape"] == (4, 8, 8)
    assert "already holds a toy dataset" in one_line_error(data.main, ["toy", str(tmp_path / "toy")])


def test_curves_plot_from_train_logs(assets, tmp_path):
    run = tmp_path / "lplrun"
    train.main(train_args(assets, run, "--steps", "3", "--loss", "lpl", "--lpl-tau", "100", "--init-from",
                          str(assets / "runs" / "pre" / "ckpt.pt")))
    # a post-training run's curves continue its pre-training's (2 steps)
    assert metrics.run_start(str(run / "ckpt.pt")) == 2 and metrics.run_start(str(tmp_path / "none.pt")) == 0
    metrics.main(["curves", str(run / "log.jsonl"), str(assets / "runs" / "pre" / "log.jsonl"),
                  "--out", str(tmp_path / "c.png")])
    w, h = Image.open(tmp_path / "c.png").size
    assert w > h > 100  # two panels side by side
    (tmp_path / "bad.jsonl").write_text("{not json")
    assert "cannot read" in one_line_error(metrics.main, ["curves", str(tmp_path / "bad.jsonl")])


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_inflation_measures_the_scale_of_z0_hat_on_lpl_samples_only(c):
    from types import SimpleNamespace
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(6, 4, 4, 4)
    abar = train.ddpm_scheduler("eps").alphas_cumprod
    tau, scale = 4.0, 4 / 64

    def oracle(z_t, timestep, class_labels):  # an ε prediction whose ẑ0 is exactly c·z0
        a, s = abar[timestep].sqrt().view(-1, 1, 1, 1), (1 - abar[timestep]).sqrt().view(-1, 1, 1, 1)
        assert (s / a <= tau * scale).all()  # only LPL's samples are measured
        return SimpleNamespace(sample=(z_t - a * c * z0) / s)

    slope, ratio = metrics.inflation(oracle, "eps", lpl, z0, torch.zeros(6, dtype=torch.long), tau, scale)
    assert slope == pytest.approx(c, abs=1e-4)
    assert ratio == pytest.approx(1.0, abs=1e-4) if c == 1 else ratio > 1.05  # features grow with ẑ0


def test_inflation_cli_measures_each_checkpoint_on_the_same_draws(assets, tmp_path, capsys):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    metrics.main(["inflation", str(assets / "data"), pre, pre, "--n", "5"])
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and "5 samples under τ 4" in first
    write_pngs(tmp_path / "other", classes=("zebra",), per_class=2)
    assert "classes the checkpoints do not know (zebra)" in one_line_error(
        metrics.main, ["inflation", str(tmp_path / "other"), pre])


def test_seed_table_is_mean_and_sample_std_per_arm_and_paired_by_seed(tmp_path, capsys):
    def run(name, score, spectrum, s_per_step, share=None, loss_diff=0.2, more=()):
        (tmp_path / name).mkdir()
        extra = {} if share is None else {"lpl_share": share}
        rows = [{"step": 50 * i, "loss_diff": loss_diff, "s_per_step": s, **extra}  # the first interval is warm-up,
                for i, s in enumerate((99.0, s_per_step, 40.0, s_per_step), 1)]  # the third was paused
        rows += [{"step": 50 * i, "loss_diff": 1.0, "s_per_step": s_per_step} for i in more]  # a longer log
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "score.txt").write_text(  # sample.py's lines, then metrics.py spectrum's
            f"wrote 100 samples to x\nFID {score} (100 samples against ref)\nspectrum error 9.0 (sample.py)\n"
            f"spectrum error {spectrum}  x against ref\n")
    for seed, score in enumerate((10.0, 12.0, 14.0)):  # L_Diff 1% and 3% above l2's at seeds 0 and 1
        run(f"lpl-s{seed}", score, 0.5 + 0.1 * seed, 3.0, share=0.2, loss_diff=0.2 * (1.01 + 0.02 * seed))
    run("l2-s0", 11.0, 0.6, 2.0)
    run("l2-s1", 11.0, 0.6, 2.0, more=(5, 6))  # steps lpl-s1 has not logged: not compared
    (tmp_path / "l2-s2").mkdir()  # still training: no score.txt yet
    metrics.main(["table", *(str(p) for p in sorted(tmp_path.iterdir())), "--baseline", "l2",
                  "--plot", str(tmp_path / "seeds.png")])
    assert Image.open(tmp_path / "seeds.png").size[0] > 300  # every run, joined by seed (one seed only in lpl)
    *rows, note = capsys.readouterr().out.splitlines()
    assert note == "(not scored yet, left out: l2-s2)"
    cells = {c[0]: c for c in ([c.strip() for c in r.split("|")[1:-1]] for r in rows[2:])}
    # lpl: FID 12 ± 2 (sample std of 10, 12, 14); against l2 at seeds 0 and 1: -1 and +1, so 0 ± √2
    assert cells["lpl"] == ["lpl", "0, 1, 2", "12.00 ± 2.00", "10.00, 12.00, 14.00", "0.600 ± 0.100", "3.00",
                            "0.200", "+0.00 ± 1.41", "-0.050 ± 0.071", "+2.00 ± 1.41%"]
    assert cells["l2"] == ["l2", "0, 1", "11.00 ± 0.00", "11.00, 11.00", "0.600 ± 0.000", "2.00", "", "", "", ""]
    assert "not named ARM-sSEED" in one_line_error(metrics.main, ["table", str(tmp_path)])
    assert "is a file, not an existing folder" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0" / "log.jsonl")])
    assert "none of the arms" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0"), "--baseline", "x"])
    (tmp_path / "l2-s1" / "score.txt").write_text("FID 11.0 (100 samples against ref)\n")  # no spectrum line
    metrics.main(["table", str(tmp_path / "l2-s0"), str(tmp_path / "l2-s1"), "--plot", str(tmp_path / "s2.png")])
    assert capsys.readouterr().out.splitlines()[-1].split("|")[5].strip() == "0.600"  # the one spectrum error
    assert Image.open(tmp_path / "s2.png").size[0] > 300  # plotted without the missing spectrum
    (tmp_path / "l2-s0" / "score.txt").write_text("spectrum error 0.5\n")
    assert "no 'FID ...' line" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0")])


def test_metrics_cli(tmp_path, capsys):
    write_pngs(tmp_path / "a", classes=("x",), per_class=6)
    write_pngs(tmp_path / "b", classes=("y",), per_class=6, seed=1)
    metrics.main(["spectrum", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a"), "--plot", str(tmp_path / "s.png")])
    errors = [float(line.split()[2]) for line in capsys.readouterr().out.splitlines() if line.startswith("spectrum error")]
    assert errors[0] == 0 and errors[1] > 0  # each folder against the last one: a against itself is 0
    assert Image.open(tmp_path / "s.png").size[0] > 100
    a, b = (tmp_path / "a" / "x" / "0.png"), (tmp_path / "a" / "x" / "1.png")
    metrics.main(["diff", str(a), str(b), "--gain", "2", "--zoom", "3", "--out", str(tmp_path / "d.png")])
    d = np.asarray(Image.open(tmp_path / "d.png")).astype(int)  # a | b | 128 + 2 (b - a), each 3x upscaled
    xa, xb = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
    assert d.shape == (48, 144, 3) and (d[::3, :48:3] == xa).all() and (d[::3, 48:96:3] == xb).all()
    assert (d[::3, 96::3] == np.clip(128 + 2 * (xb - xa), 0, 255)).all()
    assert "must share one size" in one_line_error(metrics.main, ["spectrum", str(tmp_path), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "empty"), str(tmp_path / "b")])
    assert "asked for 9 images" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "a"), str(tmp_path / "b"), "--n", "9"])


# ================================================================ the paper's comparisons (--loss rgb / self-perceptual, --reweight, Fig. 13)
@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_min_snr_weights_are_min_snr_gamma_in_x0_space(paradigm):
    """Hang et al.: ε-prediction weights are min(SNR, γ)/SNR on known timesteps; for every paradigm
    the weighted MSE of its target equals min(SNR, γ)·‖ẑ0 − z0‖² for the same error in x0."""
    sched = train.ddpm_scheduler(paradigm if paradigm != "flow" else "eps")
    if paradigm == "flow":
        t = torch.tensor([0.02, 0.1, 0.5, 0.9, 1.0])
        alpha, sigma = 1 - t, t
    else:
        t = torch.tensor([0, 10, 200, 500, 999])
        abar = sched.alphas_cumprod[t]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    snr = alpha.double() ** 2 / sigma.double() ** 2
    w = comparisons.min_snr_weights(alpha, sigma, paradigm, gamma=5.0)
    if paradigm == "eps":
        torch.testing.assert_close(w, (snr.clamp(max=5) / snr).float())
        assert w[0] < 0.01 and w[-1] == 1  # t = 0: SNR ≈ 1000, weight 5/1000; t = 999: SNR < 5, weight 1
    torch.manual_seed(0)
    z0, eps, err = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2), 0.1 * torch.randn(5, 4, 2, 2)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z_t = a * z0 + s * eps
    z0_hat = z0 + err
    eps_hat = (z_t - a * z0_hat) / s  # the same z_t, explained by ẑ0
    target, pred = {"eps": (eps, eps_hat), "v": (a * eps - s * z0, a * eps_hat - s * z0_hat),
                    "flow": (eps - z0, eps_hat - z0_hat)}[paradigm]
    weighted = w * (pred - target).square().flatten(1).sum(1)
    x0_space = (snr.clamp(max=5) * err.double().square().flatten(1).sum(1)).float()
    keep = alpha > 0  # α = 0 (flow at t = 1): the model's output says nothing of z0, weight 0
    torch.testing.assert_close(weighted[keep], x0_space[keep], rtol=1e-4, atol=1e-6)
    assert (w[~keep] == 0).all()


@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_eps_from_prediction_recovers_the_noise(paradigm):
    torch.manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alpha, sigma = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.2, 0.5, 0.9])
    if paradigm != "flow":  # variance preserving
        sigma = (1 - alpha ** 2).sqrt()
    else:
        sigma = 1 - alpha
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z_t = a * z0 + s * eps
    out = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[paradigm]
    torch.testing.assert_close(comparisons.eps_from_prediction(out, z_t, alpha, sigma, paradigm), eps)


def test_rgb_loss_equals_a_direct_pixel_mse():
    vae = tiny_vae(blocks=2).requires_grad_(False)  # as train.py's load_vae returns it
    vae.config.scaling_factor, vae.config.shift_factor = 0.7, 0.1
    torch.manual_seed(0)
    z0 = torch.randn(3, 4, 4, 4)
    z0_hat = (z0 + 0.2 * torch.randn_like(z0)).requires_grad_()
    loss = comparisons.rgb_loss(vae, z0_hat, z0)
    with torch.no_grad():
        x, x_hat = vae.decode(z0 / 0.7 + 0.1).sample, vae.decode(z0_hat / 0.7 + 0.1).sample
    torch.testing.assert_close(loss, ((x_hat - x) ** 2).mean((1, 2, 3)))
    loss.sum().backward()
    assert z0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in vae.parameters())
    assert torch.equal(comparisons.rgb_loss(vae, z0, z0), torch.zeros(3))


def test_self_perceptual_is_zero_at_the_target_and_never_updates_its_frozen_copy():
    torch.manual_seed(0)
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=4,
                                   num_embeds_ada_norm=3))
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: make them do something
        torch.nn.init.normal_(p, std=0.05)
    for paradigm in ("eps", "v", "flow"):
        sched = None if paradigm == "flow" else train.ddpm_scheduler(paradigm)
        sp = comparisons.SelfPerceptual(model, 1, paradigm, sched)
        z0, eps, y = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
        alpha, sigma, _ = train.sample_t(paradigm, 4, "cpu", sched)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        z_t = a * z0 + s * eps
        out = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[paradigm].clone().requires_grad_()
        loss = sp(out, z_t, z0, eps, alpha, sigma, y)
        loss.sum().backward()
        assert loss.shape == (4,) and loss.abs().max() < 1e-8 and out.grad.abs().max() < 1e-6, paradigm
        out2 = (out.detach() + 0.3 * torch.randn_like(out)).requires_grad_()
        loss = sp(out2, z_t, z0, eps, alpha, sigma, y)
        loss.sum().backward()
        assert (loss > 0).all() and out2.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in sp.net.parameters())


def test_self_perceptual_and_rgb_and_min_snr_train_and_resume(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    assert "needs --init-from" in one_line_error(train.main, train_args(assets, tmp_path / "x", "--loss", "self-perceptual"))
    assert "--sp-layer must be in 1..2" in one_line_error(
        train.main, train_args(assets, tmp_path / "x", "--loss", "self-perceptual", "--init-from", pre, "--sp-layer", "3"))
    run = tmp_path / "sp"
    train.main(train_args(assets, run, "--loss", "self-perceptual", "--init-from", pre, "--steps", "2",
                          "--ckpt-every", "1", "--sp-layer", "1"))
    ck, init = load(run / "ckpt.pt"), load(pre)
    for k, v in ck["sp_net"].items():  # the frozen network is the --init-from model, untouched by training
        assert torch.equal(v, init["model"][k]), k
    assert any(not torch.equal(ck["model"][k], init["model"][k]) for k in init["model"])
    assert all("loss_sp" in r for r in read_log(run))
    train.main(["--resume", str(run), "--steps", "3"])
    assert all(torch.equal(v, init["model"][k]) for k, v in load(run / "ckpt.pt")["sp_net"].items())
    run = tmp_path / "rgb"
    train.main(train_args(assets, run, "--loss", "rgb", "--init-from", pre, "--steps", "2", "--lpl-tau", "100",
                          "--reweight", "min-snr"))
    log = read_log(run)
    assert all(r["loss_rgb"] > 0 and 0 < r["aux_share"] < 1 and r["lpl_frac"] == 1 for r in log)


# ---------------------------------------------------------------- Cas-DM (comparisons.CasDM)
def _cas_batch(paradigm, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = train.ddpm_scheduler(paradigm)
    cas = comparisons.CasDM((4, 8, 8), paradigm, sched, width=8)
    for p in cas.phi.parameters():  # a ϕ that does something (its output layer starts at zero)
        torch.nn.init.normal_(p, std=0.05, generator=g)
    t = torch.tensor([0, 1, 10, 200, 600, 999])[:B]
    abar = sched.alphas_cumprod[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z0, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    return cas, sched, t, alpha, sigma, z0, eps, z_t


@pytest.mark.parametrize("paradigm", ["eps", "v"])
def test_cas_dm_losses_reach_phi_only_and_l_mu_only_r(paradigm):
    """No gradient of ϕ's losses reaches θ's output (exactly zero); L^μ's reaches r_t's channel only
    (μ's stop-gradients); L^x0 and the metric reach ϕ's x'0 channels."""
    cas, sched, t, alpha, sigma, z0, eps, z_t = _cas_batch(paradigm)
    out = torch.randn_like(z0).requires_grad_()  # θ's output
    phi_out = []
    cas.phi.conv_out.register_forward_hook(lambda m, a, o: o.retain_grad() or phi_out.append(o))
    loss_x0, loss_mu, x0_prime, r = cas.losses(out, z_t, z0, alpha, sigma, t)
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    (loss_x0 + loss_mu + lpl(x0_prime, z0).mean()).backward()
    assert out.grad is None or torch.equal(out.grad, torch.zeros_like(out))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cas.phi.conv_out.parameters())
    out.grad, phi_out = None, []
    cas.phi.zero_grad()
    loss_x0, loss_mu, x0_prime, r = cas.losses(out, z_t, z0, alpha, sigma, t)
    loss_mu.backward()
    g = phi_out[0].grad  # (B, C + 1, h, w)
    assert torch.equal(g[:, :4], torch.zeros_like(g[:, :4])) and g[:, 4].abs().sum() > 0
    # L^μ is Eq. 12 with Eq. 7's posterior mean, written here from DDPM's β_t directly
    abar = sched.alphas_cumprod.double()
    beta = sched.betas.double()[t]
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar])[t]  # ᾱ_{t-1}, ᾱ_{-1} = 1
    c0 = (a_prev.sqrt() * beta / (1 - abar[t])).float().view(-1, 1, 1, 1)
    ct = ((1 - beta).sqrt() * (1 - a_prev) / (1 - abar[t])).float().view(-1, 1, 1, 1)
    x0_star = z0_from_prediction(out.detach(), z_t, alpha, sigma, paradigm)
    mix = r.detach() * (c0 * x0_prime.detach() + ct * z_t) + (1 - r.detach()) * (c0 * x0_star + ct * z_t)
    torch.testing.assert_close(loss_mu.detach(), ((c0 * z0 + ct * z_t) - mix).square().mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss_x0.detach(), (x0_prime.detach() - z0).square().mean())


@pytest.mark.parametrize("paradigm", ["eps", "v"])
def test_cas_dm_sampler_is_ddim_at_r_0_bit_for_bit_and_at_r_1_with_the_identity(paradigm):
    cas, sched, t, alpha, sigma, z0, eps, z_t = _cas_batch(paradigm)
    sched.set_timesteps(25)
    x0_sched = type(sched).from_config(sched.config, prediction_type="sample")
    x0_sched.set_timesteps(25)
    D, z = torch.randn_like(z0), torch.randn_like(z0)
    for ts in sched.timesteps[[0, 5, 24]]:
        ddim = sched.step(D, ts, z).prev_sample
        x0_prime, _ = cas.refine(torch.randn_like(z0), ts.expand(len(z)))
        assert torch.equal(comparisons.cas_step(sched, x0_sched, D, x0_prime, torch.zeros(len(z), 1, 8, 8), ts, z), ddim)
        abar = sched.alphas_cumprod[ts]
        x0_star = z0_from_prediction(D, z, abar.sqrt(), (1 - abar).sqrt(), paradigm)  # ϕ the identity on x0*
        got = comparisons.cas_step(sched, x0_sched, D, x0_star, torch.ones(len(z), 1, 8, 8), ts, z)
        torch.testing.assert_close(got, ddim, rtol=1e-4, atol=1e-4)
    # a fresh ϕ (zero output layer) is the identity on x0* at r = 1/2: generate() equals plain DDIM
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8,
                                   num_embeds_ada_norm=3))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh = comparisons.CasDM((4, 8, 8), paradigm, train.ddpm_scheduler(paradigm), width=8)
    y = torch.tensor([0, 1, 2])
    plain = train.generate(model, paradigm, y, 3, (4, 8, 8), steps=5, generator=torch.Generator().manual_seed(0))
    cascaded = train.generate(model, paradigm, y, 3, (4, 8, 8), steps=5, generator=torch.Generator().manual_seed(0),
                              cas=fresh)
    torch.testing.assert_close(cascaded, plain, rtol=1e-4, atol=1e-4)


def test_cas_dm_post_trains_resumes_samples_and_refuses_what_it_cannot_do(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    run = tmp_path / "cas"
    train.main(train_args(assets, run, "--loss", "cas-dm", "--init-from", pre, "--steps", "2", "--ckpt-every", "1",
                          "--lpl-tau", "100", "--cas-width", "8"))
    ck, init = load(run / "ckpt.pt"), load(pre)
    assert set(ck["cas"]) == {"config", "phi", "ema"} and ck["args"]["lpl_weight"] > 0  # λ^metric by the rule
    log = read_log(run)
    assert all(r["loss_lpl"] > 0 and r["loss_x0"] > 0 and r["loss_mu"] >= 0 and 0 < r["lpl_share"] < 1 for r in log)
    assert any(not torch.equal(ck["model"][k], init["model"][k]) for k in init["model"])  # θ trains (L_Diff)
    train.main(["--resume", str(run), "--steps", "3"])
    ck3 = load(run / "ckpt.pt")
    assert ck3["step"] == 3 and any(not torch.equal(ck3["cas"]["phi"][k], ck["cas"]["phi"][k]) for k in ck["cas"]["phi"])
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "grid.png"), "--steps", "2"])
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    run = tmp_path / "cas-none"
    train.main(train_args(assets, run, "--loss", "cas-dm", "--cas-metric", "none", "--init-from", pre, "--steps", "1"))
    assert "loss_lpl" not in read_log(run)[0] and "loss_x0" in read_log(run)[0]
    assert "only with --loss lpl, rgb or cas-dm (--cas-metric lpl); this run has --loss cas-dm --cas-metric none" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--loss", "cas-dm", "--cas-metric", "none", "--lpl-tau", "2", "--init-from", pre))
    assert "--cas-width acts only with --loss cas-dm" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--cas-width", "8"))
    flow = tmp_path / "flow-pre"
    train.main(train_args(assets, flow, "--paradigm", "flow", "--steps", "1"))
    assert "use a --paradigm eps or v model" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--loss", "cas-dm", "--init-from", str(flow / "ckpt.pt")))


def test_outlier_map_command_reports_what_detect_outliers_masks(assets, tmp_path, capsys):
    from diffusers import AutoencoderKL
    metrics.main(["outliers", str(assets / "data"), "--index", "3", "--vae", str(assets / "vae"),
                  "--image-size", "32", "--out", str(tmp_path / "maps.png"), "--channels", "2"])
    printed = [float(line.split()[2].rstrip("%")) / 100 for line in capsys.readouterr().out.splitlines()
               if line.startswith("block")]
    assert Image.open(tmp_path / "maps.png").size[0] > 100
    vae = AutoencoderKL.from_pretrained(str(assets / "vae")).eval()
    x = torch.from_numpy(np.asarray(Image.open(fid.image_files(str(assets / "data"))[3]).convert("RGB")
                                    .resize((32, 32), resample=3)).copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z = vae.encode(x / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
        lpl = LatentPerceptualLoss(vae)
        expected = [1 - detect_outliers(f, down_f=512 / f.shape[-1]).float().mean().item() for f in lpl.features(z)]
    assert printed == pytest.approx(expected, abs=1e-5) and len(printed) == 3
    assert "argument --image-size: '0' is not an integer >= 8" in one_line_error(metrics.main, [
        "outliers", str(assets / "data"), "--image-size", "0"])
    assert "--index must be in 0..23" in one_line_error(metrics.main, ["outliers", str(assets / "data"), "--index", "99",
                                                                       "--vae", str(assets / "vae")])


# ================================================================ torchrun: DistributedDataParallel on CPU (gloo)
def torchrun(args, nproc=2):
    """train.py under torchrun, as a user runs it; returns the finished process."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_ranks_equal_one_rank_and_resume_exactly(assets, tmp_path):
    """2 ranks x 4 samples follow 1 rank x 8 sample for sample (loss after N steps and weights, to
    float tolerance, LPL's batch expectation included); resume under 2 ranks is exact; rank 0 alone
    writes."""
    extra = ("--steps", "3", "--loss", "lpl", "--lpl-tau", "2", "--device", "cpu", "--ckpt-every", "1")
    train.main(train_args(assets, tmp_path / "one", *extra))
    p = torchrun(train_args(assets, tmp_path / "two", *extra))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 ranks x 4 samples" in p.stdout and p.stdout.count("done: 3 steps") == 1
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert any(0 < r["lpl_frac"] < 1 for r in one)  # some samples under τ, not all: the ranks select differently
    for a, b in zip(one, two):
        for k in ("loss_diff", "loss_lpl", "lpl_frac", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    w1, w2 = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    for k in w1["model"]:
        torch.testing.assert_close(w2["model"][k], w1["model"][k], rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "log.jsonl", "samples-0000003.png"]
    # stopped after 2 steps and resumed under 2 ranks = the uninterrupted 2-rank run
    p = torchrun(train_args(assets, tmp_path / "res", *extra[:-2], "--steps", "2"))
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(["--resume", str(tmp_path / "res"), "--steps", "3"])
    assert p.returncode == 0, p.stderr[-2000:]
    keys = ("step", "loss_diff", "loss_lpl", "lpl_frac", "grad_norm", "ema_decay")
    assert [[r[k] for k in keys] for r in read_log(tmp_path / "res")] == [[r[k] for k in keys] for r in two]
    w3 = load(tmp_path / "res" / "ckpt.pt")
    assert all(torch.equal(w3["model"][k], w2["model"][k]) for k in w2["model"])
    # a global batch the ranks cannot share is refused before any work, in one line from rank 0
    p = torchrun(train_args(assets, tmp_path / "odd", "--batch-size", "7", "--device", "cpu"))
    assert p.returncode != 0 and "error: --batch-size 7 (the global batch) must be a multiple of the 2 ranks" in p.stderr
    assert not (tmp_path / "odd").exists()



def test_fail_on_a_rank_other_than_0_waits_for_rank_0_to_say_why(monkeypatch, capsys):
    """torchrun stops every rank once one exits: a rank that left at once could cut rank 0 off before
    it printed the error (seen in CI). Rank 0 exits with the message; the others wait, then exit 1."""
    import cli
    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setattr(cli, "RANK", 1)
    with pytest.raises(SystemExit) as e:
        cli.fail("--batch-size 7 is bad")
    assert e.value.code == 1 and waits and waits[0] >= 10
    monkeypatch.setattr(cli, "RANK", 0)
    waits.clear()
    with pytest.raises(SystemExit) as e:
        cli.fail("--batch-size 7 is bad")
    assert e.value.code == "error: --batch-size 7 is bad" and not waits

# ---------------------------------------------------------------- no silent wrong answer, no lost work, no hang
def _png16_rgb(path, arr):
    """A 16-bit RGB PNG written by hand (PIL cannot write one): arr (H, W, 3) uint16."""
    import struct
    import zlib
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_images_of_any_depth_and_mode_read_as_what_they_show(tmp_path):
    """16-bit grayscale became white (every pixel 255) through PIL's convert("RGB"); 16-bit RGB,
    palette, grayscale and transparent images must all read as the picture they show."""
    ramp = np.arange(16 * 16, dtype=np.float64).reshape(16, 16) / 255  # 0..1
    gray8 = np.round(ramp * 255).astype(np.uint8)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    rgb16 = np.stack([np.round(ramp * 65535)] * 3, -1).astype(np.uint16)
    rgb16[..., 2] = 65535 - rgb16[..., 2]
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    pal = Image.fromarray(gray8, "P")  # palette indices 0..255 into a gray palette
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(tmp_path / "p.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3], rgba[8:, :, 3] = 200, 255, 0  # red on top; below, invisible red
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected_gray = np.stack([gray8] * 3, -1)
    for name in ("g16", "g8", "p"):
        np.testing.assert_array_equal(np.asarray(data.load_rgb(tmp_path / f"{name}.png")), expected_gray, err_msg=name)
    got = np.asarray(data.load_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got[..., 0] - gray8).max() <= 1 and np.abs(got[..., 2] - (255 - gray8)).max() <= 1
    got = np.asarray(data.load_rgb(tmp_path / "rgba.png"))
    assert (got[:8] == [200, 0, 0]).all() and (got[8:] == 255).all()  # transparent = the white page
    # and the trainer's loader and metrics.py read them the same way
    assert np.array_equal(np.asarray(data.read_rgb(str(tmp_path / "g16.png"))), expected_gray)
    batch = next(fid.read_images([str(tmp_path / "g16.png")]))
    assert batch.shape == (1, 3, 16, 16) and np.array_equal(batch[0].permute(1, 2, 0).numpy(), expected_gray)


def test_fid_of_one_image_is_an_error_not_a_hang(tmp_path):
    net = tmp_path / "net.pt"
    torch.jit.script(_ColourMeans()).save(str(net))
    ext = fid.InceptionFeatures(str(net))
    write_pngs(tmp_path / "one", classes=("a",), per_class=1)
    write_pngs(tmp_path / "many", classes=("a",), per_class=4)
    assert "at least 2 images" in one_line_error(fid.fid_stats, str(tmp_path / "one"), ext)
    mu, sigma = fid.fid_stats(str(tmp_path / "many"), ext)
    assert "not finite" in one_line_error(fid.frechet_distance, mu, sigma * np.nan, mu, sigma)
    assert "differ in dimension" in one_line_error(fid.frechet_distance, mu, sigma, mu[:2], sigma[:2, :2])


def test_metrics_cli_checks_its_inputs(tmp_path):
    write_pngs(tmp_path / "a16", classes=("a",), per_class=2, size=16)
    write_pngs(tmp_path / "a32", classes=("a",), per_class=2, size=32)
    assert ".npz" in one_line_error(metrics.main, ["stats", str(tmp_path / "a16"), str(tmp_path / "ref")])
    assert "different sizes" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "a16"), str(tmp_path / "a32")])


def test_resume_from_another_folder_trains_on_its_own_data_or_refuses(assets, tmp_path, monkeypatch):
    """Paths given relative to where a run started are stored absolute, so --resume from any folder
    finds the same data, VAE and latent cache; data that changed since is refused, never trained on."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(assets / "data", start / "data")
    shutil.copytree(assets / "vae", start / "vae")
    write_pngs(elsewhere / "data", classes=("x", "y", "z"), seed=7)  # other images under the same relative name
    monkeypatch.chdir(start)
    common = ["--data", "data", "--vae", "vae", "--image-size", "16", "--model", "DiT-T/2", "--batch-size", "8",
              "--sample-every", "1000", "--log-every", "1", "--loss", "lpl", "--lpl-tau", "20"]
    train.main([*common, "--run-dir", "runs/full", "--steps", "3"])  # uninterrupted, for comparison
    train.main([*common, "--run-dir", "runs/r", "--steps", "1"])
    saved = load(start / "runs" / "r" / "ckpt.pt")["args"]
    assert saved["data"] == str(start / "data") and saved["vae"] == str(start / "vae")
    monkeypatch.chdir(elsewhere)
    train.main(["--resume", str(start / "runs" / "r"), "--steps", "3"])
    assert len(list((start / "runs").glob("latents-*.pt"))) == 1  # the run's own latents, not new ones
    assert not list(elsewhere.rglob("*.pt"))  # nothing written where it was resumed from
    assert read_log(start / "runs" / "r") == [{**row, "s_per_step": r["s_per_step"]} for row, r in
                                              zip(read_log(start / "runs" / "full"), read_log(start / "runs" / "r"))]
    resumed, full = load(start / "runs" / "r" / "ckpt.pt"), load(start / "runs" / "full" / "ckpt.pt")
    assert resumed["step"] == 3 and all(torch.equal(resumed["model"][k], full["model"][k]) for k in full["model"])
    write_pngs(start / "data", classes=("cat",), per_class=1, seed=9)  # the data changed since (a date alone would not)
    msg = one_line_error(train.main, ["--resume", str(start / "runs" / "r"), "--steps", "4"])
    assert "are not those" in msg and "resumes only on its own data" in msg
    shutil.rmtree(start / "vae")
    msg = one_line_error(train.main, ["--resume", str(start / "runs" / "r"), "--steps", "4"])
    assert "does not exist" in msg and "--vae" in msg and load(start / "runs" / "r" / "ckpt.pt")["step"] == 3


def test_first_runs_side_by_side_share_one_encoding(assets, tmp_path):
    """Two first runs in one parent folder: the second waits for the first one's latent cache
    instead of racing it on one temporary file; both train."""
    data = tmp_path / "data"
    write_pngs(data, per_class=24)
    argv = lambda run: [sys.executable, "train.py", *train_args(assets, tmp_path / "runs" / run, "--steps", "1")[:1],  # noqa: E731
                        str(data), *train_args(assets, tmp_path / "runs" / run, "--steps", "1")[2:]]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv(r), cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ("a", "b")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list((tmp_path / "runs").glob("latents-*.pt"))) == 1
    assert not list((tmp_path / "runs").glob("*.tmp"))


def test_bad_caches_and_half_written_logs_are_recovered(assets, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    train.main(train_args(assets, run, "--steps", "2", "--ckpt-every", "1"))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss_d')  # a kill in the middle of a log row
    (cache,) = (tmp_path / "runs").glob("latents-*.pt")
    good = torch.load(cache)
    bad = dict(good, z=good["z"][:, :, :2])  # latents of another shape
    torch.save(bad, cache)
    train.main(["--resume", str(run), "--steps", "3"])
    assert "encoding the data again" in capsys.readouterr().out
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert torch.equal(torch.load(cache)["z"], good["z"])
    torch.save(dict(good, y=good["y"] + 10), cache)  # labels out of range
    train.main(["--resume", str(run), "--steps", "4"])
    assert "labelled with other classes" in capsys.readouterr().out


def test_init_from_is_checked_before_the_work(assets, tmp_path):
    pre = assets / "runs" / "pre"
    bad = load(pre / "ckpt.pt")
    bad["model"] = {k: v * float("inf") if v.is_floating_point() else v for k, v in bad["model"].items()}
    torch.save(bad, tmp_path / "inf.pt")
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--init-from", str(tmp_path / "inf.pt")))
    assert "non-finite model weights" in msg and not (tmp_path / "r").exists()
    train.main(train_args(assets, tmp_path / "r", "--init-from", str(pre), "--steps", "1"))  # a run directory
    assert load(tmp_path / "r" / "ckpt.pt")["args"]["init_from"] == str(pre / "ckpt.pt")


def test_bench_checks_its_inputs():
    import bench
    for argv, expected in ((["--reps", "0"], "argument --reps: '0' is not an integer >= 1"),
                           (["--image-size", "0"], "argument --image-size: '0' is not an integer >= 8"),
                           (["--image-size", "20"], "must be a multiple of 16"),
                           (["--lpl-fraction", "0"], "argument --lpl-fraction: '0' is not a finite number > 0")):
        assert expected in one_line_error(bench.main, argv), argv


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


def test_an_eps_model_on_the_linear_path_or_an_edm_schedule_is_expressible():
    """α_t + σ_t = 1 under eps is refused by default (it is nearly always ᾱ_t passed as α_t), and
    path='linear' lets a model really trained that way through, equal to the building blocks; an EDM
    (VE) schedule, α = 1 and σ free, goes through with path='any'."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=3))
    z0, eps = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    t = torch.tensor([0.02, 0.05, 0.3, 0.9])
    alpha, sigma = 1 - t, t
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    pred = eps + 0.1 * torch.randn_like(eps)
    with pytest.raises(ValueError, match="path='linear'"):
        lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps")
    got = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=16.0, path="linear")
    m = lpl_mask(alpha, sigma, 16.0, 4 / 64)
    expected = lpl(z0_from_prediction(pred[m], z_t[m], alpha[m], sigma[m], "eps"), z0[m]).sum() / 4
    assert m.any() and torch.allclose(got, expected)
    alpha, sigma = torch.ones(4), torch.tensor([0.002, 0.1, 0.5, 8.0])  # EDM's σ range
    z_t = z0 + sigma.view(-1, 1, 1, 1) * eps
    with pytest.raises(ValueError, match="path='any'"):
        lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps")
    got = lpl.batch_loss(pred, z_t, z0, alpha, sigma, "eps", tau=16.0, path="any")
    m = lpl_mask(alpha, sigma, 16.0, 4 / 64)
    expected = lpl(z0_from_prediction(pred[m], z_t[m], alpha[m], sigma[m], "eps"), z0[m]).sum() / 4
    assert 0 < m.sum() < 4 and torch.allclose(got, expected)


def _trap_batch(B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g)


def _lpl_warnings(fn):
    import warnings
    from lpl import LPLInputWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, LPLInputWarning)]


def test_correct_hookups_give_no_warning_trained_or_not():
    """The checks of batch_loss measure what a correct hook-up gives whatever the model has learned:
    a perfect prediction, a noisy one and an untrained one (random) are all silent, for each path."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    z0, eps, t = _trap_batch()
    t = t.clamp(0.02, 0.98)
    for param in ("eps", "v", "flow"):
        a, s = (1 - t, t) if param == "flow" else ((1 - t * t).sqrt(), t)
        a4, s4 = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        z_t = a4 * z0 + s4 * eps
        target = {"eps": eps, "v": a4 * eps - s4 * z0, "flow": eps - z0}[param]
        for pred in (target, target + 0.5 * torch.randn_like(target), torch.randn_like(target)):
            assert _lpl_warnings(lambda: lpl.batch_loss(pred, z_t, z0, a, s, param, tau=16.0)) == [], param


def test_silently_wrong_hookups_are_warned_once():
    """Issue 28's traps that pass every identity yet give a finite, wrong loss, each as a host makes it,
    with a model that has learned its own target (post-training, the paper's case)."""
    z0, eps, t = _trap_batch()
    t = t.clamp(0.02, 0.98)
    fresh = lambda: LatentPerceptualLoss(tiny_vae(blocks=2))  # noqa: E731  (warnings are once per loss)
    v4 = lambda x: x.view(-1, 1, 1, 1)  # noqa: E731
    # SD's latents in the autoencoder's raw scale (× 0.18215 forgotten): the decoder would see × 5.5
    raw, (a, s) = z0 / 0.18215, alpha_sigma_from_flow_time(t)
    got = _lpl_warnings(lambda: fresh().batch_loss(eps - raw, v4(a) * raw + v4(s) * eps, raw, a, s, "flow"))
    assert len(got) == 1 and "raw scale" in got[0]
    # SiT (t = 1 at the data) passed as minRF: x_t = t x1 + (1 − t) x0, with data_at=0 α, σ and u negated
    x_t = v4(t) * z0 + v4(1 - t) * eps
    a, s = alpha_sigma_from_flow_time(t)
    got = _lpl_warnings(lambda: fresh().batch_loss(-(z0 - eps), x_t, z0, a, s, "flow"))
    assert len(got) >= 1 and "data_at=1" in got[0]
    # data_at=1 right, but the velocity u = x1 − x0 passed as it is (ẑ0 error 1.34 in the issue)
    a, s = alpha_sigma_from_flow_time(t, data_at=1)
    got = _lpl_warnings(lambda: fresh().batch_loss(z0 - eps, x_t, z0, a, s, "flow"))
    assert len(got) == 1 and "−u" in got[0]
    # SD3's preconditioned output (its x0 estimate, model_pred · (−σ) + z_t) passed as "flow"
    a, s = alpha_sigma_from_flow_time(t)
    z_t = v4(a) * z0 + v4(s) * eps
    got = _lpl_warnings(lambda: fresh().batch_loss(z0 + 0.1 * eps, z_t, z0, a, s, "flow"))
    assert len(got) == 1 and "preconditioned" in got[0]
    # once per loss: the same trap again on the same loss says nothing more
    lpl = fresh()
    assert len(_lpl_warnings(lambda: lpl.batch_loss(z0 + 0.1 * eps, z_t, z0, a, s, "flow"))) == 1
    assert _lpl_warnings(lambda: lpl.batch_loss(z0 + 0.1 * eps, z_t, z0, a, s, "flow")) == []


def test_post_training_at_a_higher_resolution_carries_every_weight_and_scales_tau(assets, tmp_path, monkeypatch):
    """--init-from with a larger --image-size (the paper's 256 -> 512 px post-training): the model is
    built at the new latent width, every learned weight comes over (one step at lr 1e-4 moves none by
    more than ~lr), τ scales by the new width / 64, and the checkpoint samples at the new size."""
    pre = load(assets / "runs" / "pre" / "ckpt.pt")
    scales = []
    real_mask = train.lpl_mask
    monkeypatch.setattr(train, "lpl_mask", lambda a, s, tau, r: scales.append(r) or real_mask(a, s, tau, r))
    run = tmp_path / "big"
    train.main(["--init-from", str(assets / "runs" / "pre" / "ckpt.pt"), "--image-size", "32", "--steps", "1",
                "--loss", "lpl", "--lpl-weight", "1", "--run-dir", str(run), "--batch-size", "8", "--sample-every", "1000"])
    ck = load(run / "ckpt.pt")
    assert tuple(ck["latent_shape"]) == (4, 16, 16) and ck["model_config"]["sample_size"] == 16
    assert tuple(pre["latent_shape"]) == (4, 8, 8)
    assert ck["model"].keys() == pre["model"].keys()
    for k, v in pre["model"].items():
        assert (ck["model"][k] - v).abs().max() <= 2e-4, k  # carried over, then one small step
    assert scales and set(scales) == {16 / 64}
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "g.png"), "--per-class", "1", "--steps", "2"])
    assert Image.open(tmp_path / "g.png").size == (1 * 34 + 2, 3 * 34 + 2)  # 32 px images, one per class
    msg = one_line_error(train.main, ["--init-from", str(assets / "runs" / "pre" / "ckpt.pt"), "--vae",
                                      str(assets / "vae8"), "--run-dir", str(tmp_path / "c8"), "--steps", "1"])
    assert "use the same VAE" in msg
