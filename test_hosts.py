"""lpl.py inside host trainers: every autoencoder family read and normalised as its pipeline does,
the hosts' schedules, the README's recipes run inside each host's step, and the traps refused or
warned."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import sample
import train
from conftest import load, read_log, saved_bytes, tiny_vae, train_args
from lpl import (LatentPerceptualLoss, alpha_sigma_from_alphas_cumprod, alpha_sigma_from_flow_time, lpl_mask,
                 z0_from_prediction)


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


# ================================================================ lpl.py in a host trainer (copy-paste)
# ---------------------------------------------------------------- the hosts' schedules and the README's recipes
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
    assert len(recipes) == 5 and all(len(code.strip().splitlines()) <= 10 for code in recipes.values())
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

    # SiT's transport, t = 1 data: xt = t·x1 + (1 − t)·x0, the model predicts ut = x1 − x0; the host's
    # own estimate of the data is one Euler step to t = 1, xt + (1 − t)·u
    sit = dit(4)
    tt = torch.linspace(0.02, 0.98, B)
    xt = tt.view(-1, 1, 1, 1) * z0 + (1 - tt).view(-1, 1, 1, 1) * noise
    ns = dict(torch=torch, lpl=lpl, w_lpl=w_lpl, t=tt, xt=xt, x1=z0, ut=z0 - noise, model_kwargs=dict(y=y),
              alpha_sigma_from_flow_time=alpha_sigma_from_flow_time,
              model=lambda x, t, y: sit(x, timestep=1000 * (1 - t), class_labels=y).sample)
    exec(recipes["SiT transport (t = 1 is data)"], ns)
    u = ns["model_output"].detach()
    x1_hat = xt + (1 - tt).view(-1, 1, 1, 1) * u
    host = ((ns["model_output"] - (z0 - noise)) ** 2).mean()
    torch.testing.assert_close(ns["loss"] - host, expected(x1_hat, tt, 1 - tt), rtol=1e-4, atol=1e-5)


def test_decoders_that_cannot_decode_an_image_latent_are_one_clear_error():
    """A 1-D (audio) decoder, or a decoder given the wrong latent_channels, fails in the loss's own
    dry run with a ValueError that says so, not with a raw convolution error later."""
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.Conv1d(8, 2, 3, padding=1))
    with pytest.raises(ValueError, match="LPL needs an image decoder"):
        LatentPerceptualLoss(conv1d, taps=[conv1d[0]], decode=conv1d, latent_channels=4)
    vae = tiny_vae(blocks=2)
    with pytest.raises(ValueError, match=r"cannot decode a \(1, 16, 2, 2\) latent"):
        LatentPerceptualLoss(vae, taps=[vae.decoder.mid_block], decode=lambda z: vae.decode(z).sample, latent_channels=16)


# ---------------------------------------------------------------- other paths, and the one-time warnings
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


# ---------------------------------------------------------------- issue 38: any precision, any schedule
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _host_schedules(dtype, B, g):
    """{name: (alpha_t, sigma_t, parameterization, path)} as hosts hand them over in `dtype`, each from
    the helper and as the host's own arithmetic in that dtype (rooted, or 1 − t, in low precision)."""
    from diffusers import DDPMScheduler
    out = {}
    for beta in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        abar = DDPMScheduler(beta_schedule=beta, beta_start=0.00085, beta_end=0.012).alphas_cumprod.to(dtype)
        t = torch.randint(0, 1000, (B,), generator=g)
        out[f"DDPM {beta}"] = (*alpha_sigma_from_alphas_cumprod(abar, t), "eps", None)
        out[f"DDPM {beta}, rooted by the host"] = (abar[t].sqrt(), (1 - abar[t]).sqrt(), "v", None)
        kept = torch.arange(0, 1000, 20)  # ADM's timestep_respacing "50": a sub-table, indexed 0..49
        out[f"DDPM {beta}, respaced"] = (*alpha_sigma_from_alphas_cumprod(abar[kept], t % 50), "eps", None)
    t = torch.sigmoid(torch.randn(B, generator=g)).to(dtype)  # minRF's logit-normal
    out["flow logit-normal"] = (*alpha_sigma_from_flow_time(t), "flow", None)
    out["flow logit-normal, 1 − t by the host"] = (1 - t, t, "flow", None)
    u = torch.rand(B, generator=g)
    sig = (3 * u / (1 + 2 * u)).to(dtype)  # SD3's shift 3
    out["SD3 shifted"] = (*alpha_sigma_from_flow_time(sig), "flow", None)
    out["SiT, t = 1 data"] = (*alpha_sigma_from_flow_time(t, data_at=1), "flow", None)
    edm = (torch.randn(B, generator=g) * 1.2 - 1.2).exp().to(dtype)  # EDM's log-normal σ, α = 1
    out["EDM (VE), path='any'"] = (torch.ones(B, dtype=dtype), edm, "eps", "any")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_correct_hookups_in_any_precision_and_schedule_give_no_error_and_no_warning(dtype):
    """Issue 38: under bf16 mixed precision SD3's sigmas are bf16, and 1 − t rounded there broke
    α + σ = 1 by more than the old fixed tolerance, refusing the README's own recipe on every batch.
    Every schedule × precision × batch size × latent size, with z_t made in that precision as the host
    makes it, and an exact or an untrained prediction: no error, no LPLInputWarning."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    g = torch.Generator().manual_seed(0)
    for B, hw in ((1, 2), (7, 8), (64, 2)):
        for name, (a, s, param, path) in _host_schedules(dtype, B, g).items():
            z0, eps = torch.randn(B, 4, hw, hw, generator=g), torch.randn(B, 4, hw, hw, generator=g)
            a4, s4 = (x.to(dtype).view(-1, 1, 1, 1) for x in (a, s))
            # the host's own arithmetic, in its dtype (SiT's x_t = t x1 + (1 − t) x0 is this with α = t, σ = 1 − t)
            z_t = a4 * z0.to(dtype) + s4 * eps.to(dtype)
            target = {"eps": eps, "v": a4.float() * eps - s4.float() * z0, "flow": eps - z0}[param]
            for pred in (target.to(dtype), torch.randn(target.shape, generator=g).to(dtype)):
                got = _lpl_warnings(lambda: lpl.batch_loss(pred, z_t, z0.to(dtype), a, s, param, tau=16.0, path=path))
                assert got == [], (name, dtype, B, hw, got)
                lpl.__dict__.pop("_warned", None)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_the_traps_are_still_caught_in_low_precision(dtype):
    """The tolerances grew with the dtype's resolution; each mistake they exist for is still an error."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    z0, z_t = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    abar = torch.tensor([0.9, 0.6, 0.4, 0.2], dtype=dtype)
    with pytest.raises(ValueError, match="that is ᾱ_t and 1 − ᾱ_t"):
        lpl.batch_loss(z0, z_t, z0, abar, 1 - abar, "eps")
    with pytest.raises(ValueError, match="α_t is ᾱ_t, not its root"):
        lpl.batch_loss(z0, z_t, z0, abar, (1 - abar).sqrt(), "v")
    a = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=dtype)
    with pytest.raises(ValueError, match=r"α_t \+ σ_t must be 1 on the linear path"):  # VP α, σ given to flow
        lpl.batch_loss(z0, z_t, z0, a, (1 - a * a).sqrt(), "flow")
    with pytest.raises(ValueError, match="those are timesteps"):
        alpha_sigma_from_flow_time(torch.tensor([999.0, 250.0], dtype=dtype))
    with pytest.raises(ValueError, match="a flow time t must be a float in \\[0, 1\\], got torch.int64: integer timesteps"):
        alpha_sigma_from_flow_time(torch.tensor([999, 250]))


@pytest.mark.parametrize("hw,B", [(2, 1), (2, 128), (8, 1), (8, 128)])
def test_warnings_have_a_false_alarm_rate_below_one_in_a_million(hw, B):
    """Issue 38: the implied-noise band was a fixed log 3, so at 2x2x4 latents a correct batch of 128
    warned about half the time. Now each threshold comes from its statistic's distribution at the
    batch's size: 1,000 correct batches (an untrained, random prediction: the cosine's worst case) give
    no warning, at the smallest latents and at a batch of one."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    g = torch.Generator().manual_seed(hw * 1000 + B)
    fired = 0
    for _ in range(1000):
        z0, eps = torch.randn(B, 4, hw, hw, generator=g), torch.randn(B, 4, hw, hw, generator=g)
        t = torch.rand(B, generator=g) * 0.9 + 0.1
        a, s = (1 - t * t).sqrt(), t
        z_t = a.view(-1, 1, 1, 1) * z0 + s.view(-1, 1, 1, 1) * eps
        lpl.__dict__.pop("_warned", None)
        fired += len(_lpl_warnings(lambda: lpl.check_inputs(torch.randn(z0.shape, generator=g), z_t, z0, a, s, "eps")))
    assert fired == 0
    import lpl as module  # and the band is what the bound says: wider for fewer values, never below the floor
    assert module._noise_band(16, 128) > module._noise_band(256, 128) >= module.NOISE_FLOOR


@pytest.mark.parametrize("precondition", [0, 1])
def test_the_readme_sd3_recipe_runs_under_bf16_mixed_precision(precondition):
    """The SD3 script under --mixed_precision bf16: latents, noise and sigmas in bf16, the transformer
    under autocast. The recipe as printed runs without an error or a warning, and its LPL term equals
    the loss of the script's own x0 estimate computed apart in fp32 (to bf16's resolution)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    recipe = readme_recipes()["diffusers SD3 training loop (FlowMatchEulerDiscreteScheduler)"]
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    B, g = 16, torch.Generator().manual_seed(3)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    indices = torch.linspace(0, 999, B).long()  # the table's whole range (some samples under τ)
    timesteps = sched.timesteps[indices]
    sigmas = sched.sigmas[indices].to(torch.bfloat16).view(-1, 1, 1, 1)  # get_sigmas(..., dtype=weight_dtype)
    z0 = torch.randn(B, 4, 8, 8, generator=g).to(torch.bfloat16)
    noise = torch.randn(B, 4, 8, 8, generator=g).to(torch.bfloat16)
    dit = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8,
                                 num_embeds_ada_norm=3))

    def transformer(hidden_states, timestep, class_labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (dit(hidden_states, timestep=timestep, class_labels=class_labels).sample,)
    ns = dict(torch=torch, lpl=lpl, w_lpl=0.5, model_input=z0, noise=noise, sigmas=sigmas, timesteps=timesteps,
              noisy_model_input=(1 - sigmas) * z0 + sigmas * noise, cond=dict(class_labels=torch.arange(B) % 3),
              args=type("Args", (), dict(precondition_outputs=precondition)), transformer=transformer,
              alpha_sigma_from_flow_time=alpha_sigma_from_flow_time)
    assert _lpl_warnings(lambda: exec(recipe, ns)) == []
    assert torch.isfinite(ns["loss"])
    raw = ns["model_pred"].detach() if not precondition else (ns["model_pred"].detach() - ns["noisy_model_input"]) / -sigmas
    sg = sigmas.flatten().float()
    x0 = ns["noisy_model_input"].float() - sg.view(-1, 1, 1, 1) * raw.float()
    m = sg <= 4.0 * (8 / 64) * (1 - sg)
    assert 0 < m.sum() < B
    torch.testing.assert_close(ns["lpl_term"], lpl(x0[m], z0.float()[m]).sum() / B, rtol=2e-2, atol=1e-3)


def test_tau_scales_with_the_latent_area_for_non_square_latents():
    """SD3's shift scales σ/α by √(h·w) / base: a 4x16 latent (an aspect bucket) gets the τ of the
    square 8x8 latent of the same area, not that of its width (16)."""
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    B = 64
    t = torch.linspace(0.01, 0.99, B)
    a, s = (1 - t * t).sqrt(), t
    sel = {}
    for h, w in ((8, 8), (4, 16)):
        z0, eps = torch.randn(B, 4, h, w), torch.randn(B, 4, h, w)
        z_t = a.view(-1, 1, 1, 1) * z0 + s.view(-1, 1, 1, 1) * eps
        _, sel[h, w] = lpl.batch_loss(eps, z_t, z0, a, s, "eps", return_selected=True)
    assert torch.equal(sel[4, 16], sel[8, 8]) and torch.equal(sel[8, 8], s <= 4.0 * (8 / 64) * a)
    assert not torch.equal(sel[4, 16], s <= 4.0 * (16 / 64) * a)  # (the width alone would select more)


@pytest.mark.parametrize("name", FAMILIES)
def test_raw_latents_decode_and_encode_without_the_pipeline_normalisation(name):
    """raw_latents=True (Kandinsky 2.2/3 train on movq's own latents): the loss's features are the
    decoder's activations on z itself, and encode_latents gives the encoder's own output; every
    family's normalisation is non-trivial here, so the default differs."""
    vae, to_vae, taps = tiny_family(name)
    z = torch.randn(2, 4, 4, 4)
    acts = []
    hooks = [b.register_forward_hook(lambda m, a, o: acts.append(o)) for b in taps]
    with torch.no_grad():
        vae.decode(z, force_not_quantize=True) if name == "vq" else vae.decode(z.unsqueeze(2) if name in ("qwen", "wan") else z)
    for h in hooks:
        h.remove()
    raw = LatentPerceptualLoss(vae, raw_latents=True).features(z)
    for f, a in zip(raw, acts):
        torch.testing.assert_close(f, a[:, :, 0] if a.dim() == 5 else a)
    assert not torch.allclose(LatentPerceptualLoss(vae).features(z)[0], raw[0])
    from lpl import encode_latents, latent_scale
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # the raw latents are the scaled ones de-normalised: the encoder's own output
        torch.testing.assert_close(encode_latents(vae, x, raw_latents=True),
                                   latent_scale(vae)[1](encode_latents(vae, x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="raw_latents"):
        LatentPerceptualLoss(vae, raw_latents=True, taps=taps, decode=lambda z: z, latent_channels=4)
