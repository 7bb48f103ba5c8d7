"""Latent Perceptual Loss (LPL).

Berrada et al., "Boosting Latent Diffusion with Perceptual Objectives", ICLR 2025.
Read this file beside Section 3 of the paper; it follows the section top to bottom:

    ẑ0 from the model output                          Table 1, Section 3.3   z0_from_prediction
    δ(σ_t ≤ τ_σ): LPL only at low noise                Eq. 3, Section 4.1     lpl_mask
    ϕ_l = F^{d,l}(z0), ϕ̂_l = F^{d,l}(ẑ0)               Eq. 2                  LatentPerceptualLoss.features
    ρ_l: outlier mask                                  Algorithm 1, App. A.3  detect_outliers
    ϕ', ϕ̂': shared normalization; ω_l = 2^(-r_l)       Section 3.2            layer_distance, depth_weights
    L_LPL = δ Σ_l ω_l/C_l Σ_c ‖ρ ⊙ (ϕ' − ϕ̂')‖²         Eq. 3                  LatentPerceptualLoss.forward
    L_tot = L_Diff + w_LPL · L_LPL                     Section 3.2            (the trainer)
    E_batch[δ · L_LPL] from a host's diffusion step    Eq. 3                  LatentPerceptualLoss.batch_loss
    α_t, σ_t from a host's schedule                    (after the paper)      alpha_sigma_from_*
    latents to and from the diffusion model's scale    (each pipeline's)      latent_scale, encode_latents

It imports only torch and can be copied alone; the autoencoder is passed in (a diffusers one of
SUPPORTED, or any decoder given its blocks and a decode function). In a host trainer's step, with
latents in the diffusion model's scale:

    lpl = LatentPerceptualLoss(vae)                                   # frozen, features from hooks
    alpha_t, sigma_t = alpha_sigma_from_alphas_cumprod(scheduler.alphas_cumprod, t)   # or _from_flow_time
    loss = loss_diff + w_lpl * lpl.batch_loss(out, z_t, z0, alpha_t, sigma_t, "eps")  # or "v", "flow"

batch_loss is m = lpl_mask (δ), ẑ0 = z0_from_prediction of the m samples, lpl(ẑ0, z0[m]).sum() / B.
"""
import functools
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

PARAMETERIZATIONS = ("eps", "v", "flow")
PATHS = ("vp", "linear", "any")  # the schedule identity batch_loss checks: α² + σ² = 1, α + σ = 1, none


class LPLInputWarning(UserWarning):
    """An input batch_loss can use but that is almost surely wrong (given once per loss)."""


# ----------------------------------------------------------------------------------------------
# Table 1 (Section 3.3): the clean-latent estimate ẑ0, with z_t = α_t z0 + σ_t ε for all three.
# ----------------------------------------------------------------------------------------------
def z0_from_prediction(pred, z_t, alpha_t, sigma_t, parameterization):
    """ẑ0 from the model output D = D(z_t, t; Θ); alpha_t, sigma_t are scalars or (B,).

    eps  (DDPM-ε):  D ≈ ε                ẑ0 = (z_t − σ_t D) / α_t
    v    (DDPM-v):  D ≈ α_t ε − σ_t z0   ẑ0 = (α_t z_t − σ_t D) / (α_t² + σ_t²)
    flow (Flow-OT): D ≈ ε − z0           ẑ0 = z_t − σ_t D              (α_t = 1 − t, σ_t = t)

    Table 1 writes v as α_t z_t − σ_t D, which assumes α_t² + σ_t² = 1 (variance preserving); the
    division makes it exact for any α_t, σ_t (α z_t − σ v = (α² + σ²) z0) at no cost.
    """
    if pred.shape != z_t.shape:
        hint = (f": a learned-sigma model (DiT, ADM) outputs 2C channels, pass pred[:, :{z_t.shape[1]}]"
                if pred.dim() == z_t.dim() and pred.shape[1] == 2 * z_t.shape[1] else "")
        raise ValueError(f"the prediction {tuple(pred.shape)} and z_t {tuple(z_t.shape)} differ in shape{hint}")
    a, s = _per_sample(alpha_t, z_t), _per_sample(sigma_t, z_t)  # (B, 1, 1, 1) or scalars
    # At pure noise the division blows up; lpl_mask never selects it, this guards other callers.
    tiny = torch.finfo(z_t.dtype).tiny ** 0.5
    if parameterization == "eps":
        if (a <= tiny).any():
            raise ValueError("ẑ0 is undefined for eps at α_t = 0 (pure noise); select samples with lpl_mask first")
        return (z_t - s * pred) / a
    if parameterization == "v":
        if (a * a + s * s <= tiny).any():
            raise ValueError("ẑ0 is undefined for v at α_t = σ_t = 0")
        return (a * z_t - s * pred) / (a * a + s * s)
    if parameterization == "flow":
        return z_t - s * pred
    raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def _per_sample(x, ref):
    x = _schedule_value(x, ref.device).to(ref.dtype)
    if x.dim() and x.numel() not in (1, len(ref)):
        raise ValueError(f"α_t and σ_t must be one number or one per sample ({len(ref)}), got {x.numel()}")
    return x.reshape(-1, *[1] * (ref.dim() - 1)) if x.dim() else x


def _schedule_value(x, device=None, what="α_t and σ_t"):
    """α_t or σ_t (number, tensor or numpy array) as a float tensor, checked by every entry point before
    broadcasting or selection could hide a bad value: integers (almost always t itself), NaN, inf and
    negatives (z_t = α_t z0 + σ_t ε has α_t, σ_t ≥ 0 in every parameterization) are refused."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        if what != "α_t and σ_t":  # a flow time: integers are a scheduler's timesteps (0..1000)
            raise ValueError(f"a flow time t must be a float in [0, 1], got {x.dtype}: integer timesteps (SD3's "
                             f"FlowMatchEulerDiscreteScheduler: 1000 σ) are not it; pass the scheduler's sigmas "
                             f"at them, or timesteps / 1000")
        raise ValueError(f"α_t and σ_t must be floats, got {x.dtype}: pass the schedule's values at t, not t "
                         f"itself (alpha_sigma_from_alphas_cumprod / alpha_sigma_from_flow_time give them)")
    if not (torch.isfinite(x) & (x >= 0)).all():  # one host sync when all is well; NaN compares false
        if not torch.isfinite(x).all():  # everywhere: the sample would silently get no loss
            raise ValueError(f"{what} must be finite numbers, got NaN or inf")
        raise ValueError(f"{what} must be >= 0 (z_t = α_t z0 + σ_t ε), got {x.min().item():g}")
    return x if device is None else x.to(device)


# ----------------------------------------------------------------------------------------------
# δ(σ_t ≤ τ_σ) of Eq. 3: LPL only at high SNR, on the noise-to-signal ratio σ_t/α_t, which makes one
# τ (3–6 best, Fig. 6) mean the same for ε, v and flow. Section 4.1 scales τ_σ with the resolution as
# SD3 shifts its schedule (the shift multiplies σ/α by that factor: the same samples stay in).
# ----------------------------------------------------------------------------------------------
def lpl_mask(alpha_t, sigma_t, tau, resolution_scale):
    """(B,) bool: which samples get LPL. tau: a number or (B,); resolution_scale: √(h·w) / 64 of
    (batch_loss's default), with no default here so that no caller applies τ unscaled by accident."""
    tau = torch.as_tensor(tau)
    if tau.isnan().any() or (tau < 0).any():
        raise ValueError(f"the LPL noise threshold tau must be >= 0, got {tau.tolist()}")
    if not resolution_scale > 0:
        raise ValueError(f"resolution_scale must be > 0, got {resolution_scale}")
    alpha_t = _schedule_value(alpha_t)
    sigma_t = _schedule_value(sigma_t, alpha_t.device)
    return sigma_t <= tau.to(alpha_t.device) * resolution_scale * alpha_t  # σ/α ≤ τ, no division by α = 0


# ----------------------------------------------------------------------------------------------
# ρ_l: Algorithm 1 (Appendix A.3). Some decoder maps carry small patches of activations orders of
# magnitude above the rest (Fig. 13) that would dominate Eq. 3, so they are masked: threshold each
# map at its δ_o and 1 − δ_o quantiles widened by m = 2·std, then clean the outlier set with a
# morphological opening (erosion, then dilation).
# Fixes to the published pseudo-code: its argument `m` is unused (shadowed by 2·std), so it is gone;
# k = int(N·δ_o) is 0 on maps under 50 pixels, where kthvalue(0) crashes, so k is clamped to [1, N];
# one printed version negates a float mask with `~`, which fails (we use `-`, as the other does);
# even kernels with padding (k−1)//2 shrink the map, so kernels are made odd (the paper's own 2 → 3
# and 2 → 1, generalised: the dilation rounds up, so the margin never shrinks, the erosion down, so
# no real patch is eroded away); its comments "closing"/"opening" name the two pools the other way
# round from what they do to the outlier set. We compare with ≤, not <, so that a constant map
# (std 0) is not masked whole.
# ----------------------------------------------------------------------------------------------
def detect_outliers(feat, down_f=1, opening=5, closing=3, quant=0.02):
    """Algorithm 1 on feat (B, C, H, W) -> mask (B, C, H, W) bool, True = kept (the algorithm's
    remove_outliers returns feat * mask too; the loss needs the mask alone). down_f shrinks both
    kernels for maps narrower than the ones they were set for (Section 4.1: the kernels cover the
    same proportion of the image at every resolution)."""
    opening = math.ceil(opening / down_f) | 1  # dilation of the outlier set; even k rounds up to k + 1
    closing = (math.ceil(closing / down_f) - 1) | 1  # erosion of the outlier set; even k rounds down
    x = feat.detach().float().flatten(-2)  # (B, C, N), in feat's memory format (channels-last or not)
    N = x.shape[-1]
    k_lo = min(max(int(N * quant), 1), N)
    k_hi = min(max(int(N * (1 - quant)), 1), N)
    q_lo = kth_smallest(x, k_lo)  # (B, C, 1): the δ_o quantile, = x.kthvalue(k_lo) as in Algorithm 1
    q_hi = kth_smallest(x, k_hi)  # (B, C, 1): the 1 − δ_o quantile
    # m = 2·std (population std, so N = 1 is fine), as two plain reductions: torch.std's one-pass
    # (Welford) CPU kernel is ~5x slower than mean, subtract, mean of squares.
    m = 2 * (x - x.mean(-1, keepdim=True)).square().mean(-1, keepdim=True).sqrt()  # (B, C, 1): offset
    lo, hi = (q_lo - m).unsqueeze(-1), (q_hi + m).unsqueeze(-1)  # (B, C, 1, 1)
    mask = (lo <= feat) & (feat <= hi)  # (B, C, H, W), True = kept; in feat's memory format
    if closing > 1:  # erode the outliers = dilate the kept set: drops specks smaller than the kernel
        mask = F.max_pool2d(mask.float(), closing, stride=1, padding=closing // 2).bool()
    if opening > 1:  # dilate the outliers = erode the kept set: a margin around each surviving patch
        mask = -F.max_pool2d(-mask.float(), opening, stride=1, padding=opening // 2) > 0
    return mask


def kth_smallest(x, k):
    """x (R..., N) -> (R..., 1): the k-th smallest value along the last dim, = x.kthvalue(k, -1).

    A speed trick, fenced off here: a selection (topk) works through its whole row, so shrink it. Split
    each row into N/g groups of g: the k smallest values lie in the k groups with the smallest minima (a
    value among them that is not its group's minimum has that minimum below it, also among them), so
    one selection among those k·g candidates gives the same value from about N/g + k·g elements
    instead of N; g = 8 suits k ≈ 2% of N. Group j holds positions j, j + N/g, ..., j + (g − 1)·N/g.
    """
    N, g = x.shape[-1], 8
    if k <= N - k + 1:  # the low tail: select the k smallest
        pick, largest = k, False
    else:  # the high tail is the smaller selection: the (N − k + 1)-th largest
        pick, largest = N - k + 1, True
    if N % g == 0 and pick * g < N:
        cols = x.unflatten(-1, (g, N // g))  # (R..., g, N/g): column j is group j
        # the groups' minima (maxima) as an elementwise min (max) of g slices: .amin(-2) is as fast on
        # contiguous rows, but ~20x slower on channels-last maps, which diffusers' decoders produce
        ends = functools.reduce(torch.maximum if largest else torch.minimum, cols.unbind(-2))  # (R..., N/g)
        top = ends.topk(pick, -1, largest=largest, sorted=False).indices  # (R..., pick): the groups
        x = cols.gather(-1, top.unsqueeze(-2).expand(*cols.shape[:-1], pick)).flatten(-2)  # (R..., g·pick)
    vals = x.topk(pick, -1, largest=largest, sorted=False).values  # (R..., pick), unsorted
    return vals.amin(-1, keepdim=True) if largest else vals.amax(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Section 3.2, "Normalization", and the inner sum of Eq. 3, for one layer l. Each channel is
# standardised over space with the statistics of the *prediction's* features ϕ̂ (over the positions
# ρ keeps), applied to both ϕ and ϕ̂: with separate statistics a correct prediction can still receive
# gradients. Shared, the mean cancels in ϕ' − ϕ̂' = (ϕ − ϕ̂)/σ̂, so only σ̂ is needed; the squared
# error is averaged over the kept positions.
# Whether the gradient flows through σ̂ the paper does not say. If it does, the loss can also fall by
# widening ϕ̂, and its optimum is biased: with ϕ = s + u, u what the model cannot predict (variance
# N), and ϕ̂ = a·s (s of variance S), E[loss] ∝ ((1 − a)² S + N) / (a² S) is smallest at a = 1 + N/S:
# inflated features wherever ẑ0 is uncertain. With σ̂ constant the gradient vanishes at a = 1, the
# conditional mean, as for ℓ2 (test_lpl.py checks both). The authors' "shared" mode normalises by
# the target's norm, without gradient (their default mode divides the prediction by its own norm,
# with gradient). So detach_sigma=True by default; False differentiates σ̂ as written. It concerns
# the shared σ̂ only: "separate" (Section 4.3) standardises each map by its own statistics, with
# their gradients, as the paper describes it. "channel" is the authors' code's shared mode, after
# LPIPS: at each position the feature vector over channels is divided by the *target's* norm there
# (over the channels ρ keeps; a constant, no gradient), both maps alike.
# ----------------------------------------------------------------------------------------------
NORMALIZATIONS = ("shared", "separate", "channel")


def layer_distance(phi, phi_hat, rho, normalization="shared", detach_sigma=True, eps=1e-6):
    """Per-channel Eq. 3 term ‖ρ ⊙ (ϕ' − ϕ̂')‖² / |ρ| for ϕ, ϕ̂ (B, C, H, W), rho bool -> (B, C)."""
    phi, phi_hat = phi.float().flatten(2), phi_hat.float().flatten(2)  # (B, C, N): fp32 under autocast
    rho = rho.flatten(2).float()  # (B, C, N): 1 = kept, 0 = outlier
    n = rho.sum(-1).clamp(min=1)  # (B, C): kept positions, 0 -> 1
    mu_hat, var_hat = _masked_moments(phi_hat, rho, n, eps)  # (B, C, 1), (B, C)
    if detach_sigma and normalization == "shared":  # (separate: each map's own statistics, with gradient)
        var_hat = var_hat.detach()
    if normalization == "shared":  # ϕ' − ϕ̂' = (ϕ − ϕ̂)/σ̂: divide once per channel, after the sum
        return (rho * (phi - phi_hat)).square().sum(-1) / (n * var_hat)  # (B, C)
    if normalization == "separate":  # ablation of Section 4.3
        mu, var = _masked_moments(phi, rho, n, eps)  # (B, C, 1), (B, C)
        diff = (phi - mu) / var.unsqueeze(-1).sqrt() - (phi_hat - mu_hat) / var_hat.unsqueeze(-1).sqrt()
        return (rho * diff).square().sum(-1) / n  # (B, C)
    if normalization == "channel":  # the authors' code: ϕ' − ϕ̂' = (ϕ − ϕ̂)/‖ρ ⊙ ϕ‖_c at each position
        norm = (rho * phi.detach()).square().sum(1, keepdim=True).add(eps).sqrt()  # (B, 1, N)
        return (rho * (phi - phi_hat) / norm).square().sum(-1) / n  # (B, C)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _masked_moments(x, rho, n, eps):
    """Mean (B, C, 1) and variance + eps (B, C) of x (B, C, N) over the positions rho keeps. The
    mean is detached: its gradient would be exactly zero in both uses, as Σ ρ(x − μ) = 0."""
    mu = (rho * x.detach()).sum(-1, keepdim=True) / n.unsqueeze(-1)  # (B, C, 1)
    var = (rho * (x - mu)).square().sum(-1) / n  # (B, C)
    return mu, var + eps


# ----------------------------------------------------------------------------------------------
# Section 3.2, "Depth-specific weighting": the loss roughly doubles with each doubling of resolution,
# so layer l is weighted by ω_l = 2^(−r_l), r_l = number of doublings from the first tapped layer.
# For the SD VAE (mid 64², up blocks 128², 256², 512², 512² at 512 px) that is 1, ½, ¼, ⅛, ⅛.
# ----------------------------------------------------------------------------------------------
def depth_weights(widths, scheme="pow2"):
    """ω_l from the feature-map widths of the tapped layers."""
    if scheme == "uniform":  # ablation of Section 4.3
        return [1.0] * len(widths)
    if scheme == "pow2":
        return [2.0 ** -math.log2(w / widths[0]) for w in widths]
    raise ValueError(f"layer_weights must be 'pow2' or 'uniform', got {scheme!r}")


# ----------------------------------------------------------------------------------------------
# Eq. 2 needs F^{d,l}: the decoder up to block l, fed the latent as the autoencoder's own decode path
# is. Each family's pipeline normalises its latents in its own way, so each family gets (1) that
# normalisation both ways (latent_scale), (2) the blocks to tap, in decoding order, and (3) its raw
# decode call. Hooks on the tapped blocks grab ϕ_l; decoding stops after the last one.
# ----------------------------------------------------------------------------------------------
SUPPORTED = ("AutoencoderKL (SD 1/2, SDXL, SD3, FLUX.1, Playground v2.5, ...), AsymmetricAutoencoderKL, AutoencoderKLFlux2, "
             "AutoencoderKLQwenImage, AutoencoderKLWan (single frames), AutoencoderDC, AutoencoderTiny, VQModel")
_VIDEO = {"AutoencoderKLQwenImage", "AutoencoderKLWan"}  # causal 3-D autoencoders: an image is one frame


def _family(vae):
    names = {c.__name__ for c in type(vae).__mro__}
    for name in ("AutoencoderKLFlux2", *sorted(_VIDEO), "AutoencoderDC", "AutoencoderTiny", "VQModel"):
        if name in names:
            return name
    if names & {"AutoencoderKL", "AsymmetricAutoencoderKL"}:
        return "AutoencoderKL"
    return None


def latent_scale(vae):
    """(to_diffusion, to_vae): the family's pipeline normalisation from the autoencoder's latents to
    the diffusion model's scale and back, maps of (B, C, h, w) tensors, exact inverses of each other:
    (z − m) · k per channel, as each pipeline applies it, with m = latents_mean and k = scaling_factor
    (1 if unset) / latents_std where the config has them (Qwen-Image, Wan, Playground v2.5), else m =
    shift_factor, k = scaling_factor (SD 1/2, DC-AE, VQ-GAN: shift 0; SD3, FLUX.1, TAESD: both).
    FLUX.2 standardises with a BatchNorm's running statistics over the 2x2-patchified latent; latents
    here keep encode's unpatchified shape, so (c, y, x) uses patch channel (c, y mod p, x mod q)."""
    family, cfg = _family(vae), getattr(vae, "config", None)
    if family is None:
        raise ValueError(f"no latent scale known for a {type(vae).__name__}: built in are {SUPPORTED}")
    if family == "AutoencoderKLFlux2":
        p, q = cfg.patch_size

        def stats(z):  # (C, h, w) mean and std, tiled over the patch grid
            if z.shape[-2] % p or z.shape[-1] % q:
                raise ValueError(f"FLUX.2 latents must have a height and width divisible by the patch "
                                 f"size {p}x{q}, got {tuple(z.shape)}")
            reps = (1, z.shape[-2] // p, z.shape[-1] // q)
            mean = vae.bn.running_mean.view(-1, p, q).repeat(reps).to(z)
            return mean, (vae.bn.running_var.view(-1, p, q) + cfg.batch_norm_eps).sqrt().repeat(reps).to(z)

        def to_diffusion(z):
            mean, std = stats(z)
            return (z - mean) / std

        def to_vae(z):
            mean, std = stats(z)
            return z * std + mean
        return to_diffusion, to_vae
    scale = getattr(cfg, "scaling_factor", None) or 1.0
    shift = getattr(cfg, "shift_factor", None) or 0.0
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if (mean is None) != (std is None):
        raise ValueError(f"the {type(vae).__name__} config sets only one of latents_mean and latents_std")
    if mean is not None and shift:
        raise ValueError(f"the {type(vae).__name__} config sets both shift_factor and latents_mean: no pipeline "
                         f"uses both; remove the one its pipeline ignores")
    if mean is not None:
        p = next(vae.parameters())
        m = torch.tensor(mean, device=p.device, dtype=torch.float64).view(1, -1, 1, 1)  # (1, C, 1, 1)
        k = scale / torch.tensor(std, device=p.device, dtype=torch.float64).view(1, -1, 1, 1)  # (1, C, 1, 1)
        return (lambda z: (z - m.to(z)) * k.to(z)), (lambda z: z / k.to(z) + m.to(z))
    return (lambda z: (z - shift) * scale), (lambda z: z / scale + shift)


def encode_latents(vae, x, sample=False, generator=None, raw_latents=False):
    """Images x (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) in the diffusion model's scale, as the
    family's pipeline makes them (the inverse of what the loss decodes through): the posterior mean,
    or with sample=True a draw (KL autoencoders), as DiT's and diffusers' training scripts encode.
    raw_latents: the autoencoder's own latents, no normalisation (Kandinsky 2.2/3's movq)."""
    family = _family(vae)
    to_diffusion = (lambda z: z) if raw_latents else latent_scale(vae)[0]
    if family in ("AutoencoderDC", "AutoencoderTiny", "VQModel"):  # deterministic encoders
        out = vae.encode(x)
        z = out.latent if family == "AutoencoderDC" else out.latents  # VQ: before the codebook, as decoded
    else:
        frames = family in _VIDEO
        dist = vae.encode(x.unsqueeze(2) if frames else x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        z = z[:, :, 0] if frames else z  # (B, C, h, w)
    return to_diffusion(z)


def decoder_taps(vae, raw_latents=False):
    """(taps, decode, latent_channels) of a diffusers autoencoder: the blocks F^{d,l} ends at, in
    decoding order, and fn(z) running its own decode path on z in the diffusion model's scale (with
    raw_latents, on the autoencoder's own latents: no normalisation undone)."""
    family, cfg, dec = _family(vae), getattr(vae, "config", None), getattr(vae, "decoder", None)
    if family is None or (family != "AutoencoderTiny" and not hasattr(dec, "up_blocks")):
        raise ValueError(f"LatentPerceptualLoss cannot read a {type(vae).__name__}: built in are {SUPPORTED}. "
                         f"For any other decoder pass taps=[its blocks, in decoding order], "
                         f"decode=fn(latent) -> image and latent_channels=C (see the README, 'Your own decoder')")
    to_vae = (lambda z: z) if raw_latents else latent_scale(vae)[1]
    if family in _VIDEO:  # one frame in and out
        return ([dec.mid_block, *dec.up_blocks], lambda z: vae.decode(to_vae(z).unsqueeze(2)).sample[:, :, 0],
                cfg.z_dim)
    # VQ: no codebook lookup (as Kandinsky's pipelines decode): quantizing would make the loss piecewise constant
    kwargs = {"force_not_quantize": True} if family == "VQModel" else {}

    def decode(z):
        return vae.decode(to_vae(z), **kwargs).sample
    if family == "AutoencoderDC":  # DC-AE runs its up blocks from the last to the first; a stage may be empty
        return [b for b in reversed(dec.up_blocks) if len(b) > 0], decode, cfg.latent_channels
    if family == "AutoencoderTiny":  # TAESD's decoder is one Sequential: tap each resolution's last residual block
        layers = list(dec.layers)
        taps = [m for i, m in enumerate(layers) if type(m).__name__ == "AutoencoderTinyBlock"
                and (i + 1 == len(layers) or type(layers[i + 1]).__name__ != "AutoencoderTinyBlock")]
        return taps, decode, cfg.latent_channels
    # SD, SDXL, SD3, FLUX.1, FLUX.2, VQ-GAN and the asymmetric SD decoder of the paper's main runs (its
    # decode runs the same mid block and up blocks when no inpainting image and mask are given)
    return [dec.mid_block, *dec.up_blocks], decode, cfg.latent_channels


class _StopDecoding(Exception):
    pass



class LatentPerceptualLoss(nn.Module):
    """Eq. 3 on a frozen autoencoder; forward(ẑ0, z0) -> (B,) per-sample loss.

    vae:             a diffusers autoencoder of a family in SUPPORTED, or any nn.Module with
                     taps, decode and latent_channels given (bring your own decoder).
    num_blocks:      decoder blocks tapped, first block first (Fig. 7); None = all (5 for SD VAEs).
    normalization:   "shared" (prediction's statistics, the paper's) | "separate" (Section 4.3) |
                     "channel" (the authors' code: each position over channels, by the target's norm).
    detach_sigma:    the shared σ̂ as a constant (default; see layer_distance) or, False, differentiated.
    layer_weights:   "pow2" (ω_l = 2^(−r_l), the paper's) | "uniform" (Section 4.3).
    outliers:        mask outliers with Algorithm 1 (the paper's default) or not.
    kernel_ref_size: map width at which Algorithm 1's kernels (5, 3) apply as they are; narrower
                     maps get proportionally smaller kernels (Section 4.1). 512: the paper's images.
    grad_checkpointing: recompute the decoder blocks in backward instead of storing activations
                     (AutoencoderKL-type decoders; diffusers >= 0.32 checkpoints in eval mode too).
    taps, decode, latent_channels: the modules whose outputs are ϕ_l, in decoding order; fn(z) that
                     decodes a latent in the diffusion model's scale (undo your scaling inside it); C.
    raw_latents:     the diffusion model trains on the autoencoder's own latents, unnormalised (Kandinsky
                     2.2/3 on movq's, a VQModel); default: the family pipeline's scale (latent_scale).

    Latents are cast to the VAE's dtype; prefer fp32 (fp16 SD decoders overflow) or bf16. The VAE is
    held by reference, not as a submodule: the loss has an empty state_dict, lpl.train() leaves the
    VAE in eval, and moving it to a device is the caller's job.
    """

    def __init__(self, vae, num_blocks=None, normalization="shared", detach_sigma=True, layer_weights="pow2",
                 outliers=True, kernel_ref_size=512, grad_checkpointing=False, taps=None, decode=None,
                 latent_channels=None, raw_latents=False):
        super().__init__()
        if not (taps is None) == (decode is None) == (latent_channels is None):
            raise ValueError("bring-your-own decoder: pass taps, decode and latent_channels together")
        if raw_latents and taps is not None:
            raise ValueError("raw_latents picks a built-in family's decode path; your own decode function "
                             "decides the scale itself")
        if taps is None:
            taps, decode, latent_channels = decoder_taps(vae, raw_latents)
        elif not taps or not all(isinstance(m, nn.Module) for m in taps):
            raise ValueError("taps must be a non-empty list of the decoder's modules, in decoding order")
        n = len(taps) if num_blocks is None else num_blocks
        if not 1 <= n <= len(taps):
            raise ValueError(f"num_blocks must be in 1..{len(taps)} for this {type(vae).__name__} "
                             f"({len(taps)} decoder blocks), got {num_blocks}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if grad_checkpointing:
            dec = getattr(vae, "decoder", None)
            if type(dec).__name__ not in ("Decoder", "MaskConditionDecoder"):
                raise ValueError(f"grad_checkpointing needs a decoder that checkpoints each block (AutoencoderKL, "
                                 f"AsymmetricAutoencoderKL, AutoencoderKLFlux2); {type(vae).__name__} has none")
            # on the decoder: AsymmetricAutoencoderKL refuses enable_gradient_checkpointing, its decoder not
            dec.gradient_checkpointing = True
            dec._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        # plain attributes, not submodules (see above); frozen: gradients reach ẑ0, never the VAE
        self.__dict__.update(vae=vae.eval().requires_grad_(False), taps=list(taps)[:n], decode=decode)
        self.latent_channels = latent_channels
        self.normalization, self.detach_sigma = normalization, detach_sigma
        self.outliers, self.kernel_ref_size = outliers, kernel_ref_size
        p = next(vae.parameters())
        try:
            with torch.no_grad():  # one tiny dry run gives the tapped maps' widths, hence r_l and ω_l
                widths = [f.shape[-1] for f in self.features(p.new_zeros(1, latent_channels, 2, 2))]
        except (RuntimeError, TypeError, IndexError) as e:  # a 1-D (audio) decoder, wrong latent_channels, ...
            raise ValueError(f"the decoder cannot decode a (1, {latent_channels}, 2, 2) latent ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}): LPL needs an image decoder of (B, C, h, w) "
                             f"latents with C = latent_channels") from None
        self.layer_weights = depth_weights(widths, layer_weights)  # ω_1..ω_L

    def features(self, z):
        """Eq. 2: [ϕ_1, ..., ϕ_L] for z (B, C, h, w), or one frame (B, C, 1, h, w), in the diffusion scale."""
        z = z[:, :, 0] if z.dim() == 5 and z.shape[2] == 1 else z  # (B, C, h, w)
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent of shape {tuple(z.shape)} does not fit this VAE: expected (B, "
                             f"{self.latent_channels}, h, w) or a single-frame (B, {self.latent_channels}, 1, h, w); "
                             f"is it the same VAE that encoded the data?")
        if min(z.shape[-2:]) < 2:  # a 1x1 map has no spatial variance: σ̂ = √eps would blow the loss up
            raise ValueError(f"latent of shape {tuple(z.shape)} is too small: Section 3.2's standardisation needs at least 2x2")
        z = z.to(next(self.vae.parameters()).dtype)  # in the VAE's dtype (fp16/bf16/fp64 in)
        feats, last = [], self.taps[-1]

        def grab(module, args, out):
            feats.append(out[:, :, 0] if out.dim() == 5 else out)  # one frame of a video decoder
            if module is last:  # nothing after the last tapped block is used
                raise _StopDecoding

        hooks = [b.register_forward_hook(grab) for b in self.taps]
        try:
            self.decode(z)
        except _StopDecoding:
            pass
        finally:
            for h in hooks:
                h.remove()
        if len(feats) != len(self.taps):  # a tap the decoder never calls as a module, or calls twice
            raise ValueError(f"the decoder ran {len(feats)} of the {len(self.taps)} tapped modules, up to the "
                             f"last one: pass modules the decoder calls once each, in decoding order")
        return feats  # [(B, C_l, H_l, W_l)] for l = 1..L

    def forward(self, z0_hat, z0):
        """Eq. 3 without δ (the trainer selects the samples): (B,) per-sample loss."""
        if z0_hat.shape != z0.shape:
            raise ValueError(f"z0_hat {tuple(z0_hat.shape)} and z0 {tuple(z0.shape)} differ in shape")
        if z0.shape[0] == 0:  # no sample under the threshold: no decoder work at all
            return z0_hat.new_zeros(0, dtype=torch.float32)
        with torch.no_grad():
            phi = self.features(z0)  # target branch: no graph is built
        phi_hat = self.features(z0_hat)
        loss = 0.0
        for w, f, f_hat in zip(self.layer_weights, phi, phi_hat):  # (B, C_l, H_l, W_l) each
            rho = self.outlier_mask(f)  # (B, C_l, H_l, W_l) bool
            d = layer_distance(f, f_hat, rho, self.normalization, self.detach_sigma)  # (B, C_l)
            loss = loss + w * d.mean(1)  # ω_l / C_l Σ_c
        return loss  # (B,)

    def batch_loss(self, pred, z_t, z0, alpha_t, sigma_t, parameterization, tau=4.0, resolution_scale=None,
                   return_selected=False, path=None):
        """w_LPL's term: Eq. 3 with δ as the expectation over the batch, from the tensors of the host's
        diffusion step: Σ_selected L_LPL / B, a scalar (0 without decoder work when none is selected).

        pred:    the model output D (B, C, h, w): ε, v or ε − z0 (the ε half of a learned-sigma model).
        z_t, z0: the noised and clean latents (B, C, h, w), in the diffusion model's scale.
        alpha_t, sigma_t: (B,) floats with z_t = α_t z0 + σ_t ε (alpha_sigma_from_* below give them).
        tau:     τ on σ/α (3–6 best, Fig. 6) at 64×64 latents (this project's reading of the paper's
                 512 px at f8); resolution_scale defaults to √(h·w) / 64 of the latents (their
                 width when square), as SD3's resolution shift scales σ/α.
        return_selected: also return δ (B,) bool: at 8×8 latents LPL fires at σ/α ≤ 0.5 only, so a
                 host can log m.float().mean() to see that it runs.
        path:    the identity α_t, σ_t must satisfy, checked every call: "vp" (α² + σ² = 1, the default
                 for eps and v), "linear" (α + σ = 1, flow's only one) or "any" (EDM/VE schedules).
        A broken identity is an error, a statistic far from any correct hook-up's a one-time warning.
        """
        if parameterization not in PARAMETERIZATIONS:  # checked even when no sample is selected
            raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")
        alpha_t, sigma_t = _schedule_value(alpha_t, z_t.device), _schedule_value(sigma_t, z_t.device)
        a, s = (x.flatten().expand(len(z_t)) if x.numel() == 1 else x.flatten() for x in (alpha_t, sigma_t))
        if len(a) != len(z_t) or len(s) != len(z_t):
            raise ValueError(f"alpha_t and sigma_t must hold one value per sample ({len(z_t)}) or one for all, "
                             f"got {alpha_t.numel()} and {sigma_t.numel()}")
        if pred.shape != z_t.shape or z0.shape != z_t.shape:
            z0_from_prediction(pred, z_t, a, s, parameterization)  # raises the learned-sigma hint, if it is that
            raise ValueError(f"z0 {tuple(z0.shape)} and z_t {tuple(z_t.shape)} differ in shape")
        _check_path(a, s, parameterization, path)
        self.check_inputs(pred, z_t, z0, a, s, parameterization)
        if resolution_scale is None:
            resolution_scale = math.sqrt(z_t.shape[-2] * z_t.shape[-1]) / 64
        m = lpl_mask(a, s, tau, resolution_scale)  # (B,) bool
        if not m.any():  # (host syncs here and in the checks above; this one skips the decoder passes)
            loss = pred.new_zeros((), dtype=torch.float32)
        else:
            z0_hat = z0_from_prediction(pred[m], z_t[m], a[m], s[m], parameterization)  # (B_sel, C, h, w)
            loss = self(z0_hat, z0[m]).sum() / len(z_t)  # E_batch[δ · L_LPL]
        return (loss, m) if return_selected else loss

    # ------------------------------------------------------------------------------------------
    # Not in the paper: batch_loss's checks for inputs that give a finite but wrong loss (README,
    # "Traps"). Each statistic is what a correct hook-up gives whatever the model has learned, so a
    # value far from it is a wrong input, not a bad model; each threshold is set from the statistic's
    # sampling distribution at the batch's size, so that a correct hook-up warns with probability
    # below FALSE_ALARM per call (test_hosts.py measures it). One host sync; each warning given once.
    # ------------------------------------------------------------------------------------------
    def check_inputs(self, pred, z_t, z0, a, s, parameterization):
        if len(z0) == 0 or len(self.__dict__.get("_warned", ())) == 3:  # nothing left to warn about
            return
        shape = (-1,) + (1,) * (z_t.dim() - 1)
        a4, s4 = a.to(z_t).reshape(shape).float(), s.to(z_t).reshape(shape).float()
        z0f, z_tf, pf = z0.detach().float(), z_t.detach().float(), pred.detach().float()
        noisy = (s >= 0.1).reshape(shape).float()  # where ε = (z_t − α z0)/σ is well defined
        k, n_noisy = z_t[0].numel(), int((s >= 0.1).sum())  # values per sample; samples tested
        eps_hat = (z_tf - a4 * z0f) / s4.clamp_min(0.1)  # (B, C, h, w): the noise z_t implies
        # (1) the latents' scale: ~1 in the diffusion model's scale (that is what the factor is for)
        z0_std = z0f.std() if z0f.numel() > 1 else z0f.new_ones(())
        # (2) the noise the inputs imply, per sample: unit variance iff α_t, σ_t belong to this z_t
        var = eps_hat.square().flatten(1).mean(1)  # (B,)
        worst = torch.where(s >= 0.1, (var.log()).abs(), torch.zeros_like(var)).max()
        # (3) the prediction against its own target, from that noise: a sign or a quantity mixed up
        target = {"eps": eps_hat, "v": a4 * eps_hat - s4 * z0f, "flow": eps_hat - z0f}[parameterization]
        cos = (noisy * pf * target).sum() / ((noisy * pf).norm() * (noisy * target).norm()).clamp_min(1e-12)
        z0_std, worst, cos = torch.stack([z0_std, worst, cos]).tolist()
        warned = self.__dict__.setdefault("_warned", set())
        band = _noise_band(k, max(n_noisy, 1))  # |log var| beyond it: p < FALSE_ALARM over the batch
        c = max(0.5, math.sqrt(2 * math.log(1 / FALSE_ALARM) / max(n_noisy * k, 1)))  # an unrelated pred's cosine
        for kind, wrong, message in (
            ("scale", not 0.25 <= z0_std <= 4,
             f"z0 has a standard deviation of {z0_std:.3g}: latents in the diffusion model's scale have one near "
             f"1. Are they in the autoencoder's raw scale (SD: times scaling_factor 0.18215 missing)? "
             f"encode_latents(vae, x) gives the right scale"),
            ("noise", worst > band,
             "z_t − α_t z0 is not σ_t times a unit-variance noise for some samples: α_t, σ_t do not belong to this "
             "z_t. Flow code with t = 1 at the data (SiT, torchcfm) needs alpha_sigma_from_flow_time(t, data_at=1) "
             "and pred = −u; a scaled model input (EDM's c_in z_t) must be passed unscaled"),
            ("sign", cos < -c,
             f"the prediction points away from the {parameterization} target (cosine {cos:.2f}): a velocity u = "
             f"z0 − ε (t = 1 at the data) must be passed as −u; a preconditioned output (SD3's x0 estimate) must "
             f"be passed as the raw model output")):
            if wrong and kind not in warned:
                warned.add(kind)
                warnings.warn(message, LPLInputWarning, stacklevel=3)

    def outlier_mask(self, f):
        """ρ_l from the target's features ϕ, as in the authors' code (Eq. 3 writes ρ(ϕ̂)): a mask
        that depended on the prediction would let the model hide errors behind outliers it makes."""
        if not self.outliers:
            return torch.ones_like(f, dtype=torch.bool)
        return detect_outliers(f, down_f=self.kernel_ref_size / f.shape[-1])


FALSE_ALARM = 1e-6  # the chance a correct hook-up's batch sets off a warning of batch_loss
NOISE_FLOOR = math.log(1.5)  # and a noise variance within ×1.5 is never warned of: offset noise, input perturbation


def _noise_band(k, n, p=FALSE_ALARM):
    """u such that, for ε of k i.i.d. N(0, 1) values, P(|log mean(ε²)| > u) < p / n (so n samples together
    stay under p), from the Chernoff bounds of χ²_k / k: P(log ≤ −u) ≤ exp(−k/2·g(u)), g(u) = e^−u − 1 + u,
    and the upper tail is smaller still (e^u − 1 − u ≥ g(u)). g is increasing: bisection on g(u) = 2 ln(2n/p)/k."""
    target, lo, hi = 2 * math.log(2 * n / p) / k, 0.0, 1.0
    while math.exp(-hi) - 1 + hi < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.exp(-mid) - 1 + mid < target else (lo, mid)
    return max(hi, NOISE_FLOOR)


# ----------------------------------------------------------------------------------------------
# α_t and σ_t in a host trainer's own terms. DDPM codebases keep ᾱ_t (`alphas_cumprod`); α_t, σ_t
# are its square roots. Flow codebases differ in where the data sits:
#   t = 0 (minRF, SD3, FlowMatchEulerDiscreteScheduler): z_t = (1 − t) z0 + t ε, D = ε − z0 as it is.
#   t = 1 (SiT, torchcfm, flow_matching): x_t = t x1 + (1 − t) x0, x0 the noise, u = x1 − x0: pass −u.
# ----------------------------------------------------------------------------------------------
def alpha_sigma_from_alphas_cumprod(alphas_cumprod, t):
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) at integer timesteps t (B,) from a tensor or numpy array of ᾱ
    (diffusers' and OpenAI's alphas_cumprod, in any precision), rooted in float64, float32 on t's device."""
    t = torch.as_tensor(t)
    abar = torch.as_tensor(alphas_cumprod)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"t must hold integer timesteps, got {t.dtype} (for a flow time use alpha_sigma_from_flow_time)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(abar)):  # torch would read t = -1 as the last entry
        raise ValueError(f"timesteps must be in 0..{len(abar) - 1}, got {int(t.min())}..{int(t.max())}")
    abar = abar.to(t.device)[t].double()  # (B,): a bf16/fp16 table's values, exactly
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def _check_path(a, s, parameterization, path):
    """The path's identity (α² + σ² = 1 or α + σ = 1), with the mistake that breaks it named."""
    path = path or ("linear" if parameterization == "flow" else "vp")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} (or None: the parameterization's own), got {path!r}")
    if parameterization == "flow" and path != "linear":
        raise ValueError("flow's ẑ0 = z_t − σ_t D holds on the linear path α_t + σ_t = 1 only; leave path unset")
    # The identity holds to the precision α_t, σ_t were given in: a bf16 σ (SD3 under mixed precision)
    # and the host's own 1 − σ are each rounded to 2^-9, so the tolerance grows with the dtype's eps
    # (fp32: the fixed 1e-3 and 1e-2; bf16: 0.03 and 0.06: still far below the mistakes named below).
    e = max(torch.finfo(a.dtype).eps, torch.finfo(s.dtype).eps)
    tol_linear, tol_vp, exact = max(1e-3, 4 * e), max(1e-2, 8 * e), max(1e-6, 4 * e)
    a, s, one = a.double(), s.double(), torch.ones_like(a, dtype=torch.float64)
    if path == "linear" and not torch.allclose(a + s, one, atol=tol_linear):
        raise ValueError("α_t + σ_t must be 1 on the linear path (flow: α_t = 1 − t, σ_t = t); where t = 1 is the "
                         "data, use alpha_sigma_from_flow_time(t, data_at=1) and pass −u")
    if path == "vp" and not torch.allclose(a * a + s * s, one, atol=tol_vp):
        if torch.allclose(a + s, one, atol=exact):
            raise ValueError("α_t + σ_t = 1 for every sample: that is ᾱ_t and 1 − ᾱ_t, not DDPM's α_t = √ᾱ_t, σ_t = "
                             "√(1 − ᾱ_t) (alpha_sigma_from_alphas_cumprod gives them); for an ε/v model really "
                             "trained on the linear path, pass path='linear'")
        if torch.allclose(a + s * s, one, atol=exact):
            raise ValueError("α_t + σ_t² = 1 for every sample: α_t is ᾱ_t, not its root √ᾱ_t "
                             "(alpha_sigma_from_alphas_cumprod gives both)")
        raise ValueError(f"α_t² + σ_t² must be 1 for a DDPM {parameterization} model (the variance-preserving path), "
                         f"got up to {(a * a + s * s - 1).abs().max().item():.3g} off; for another schedule (EDM, VE) "
                         f"pass path='any'")


def alpha_sigma_from_flow_time(t, data_at=0):
    """(α_t, σ_t), float32, for a flow time t (B,) in [0, 1] of any precision; data_at: 0 if t = 0 is data
    (then D = ε − z0), 1 if t = 1 is data (SiT, torchcfm: pass D = −u, the negated velocity)."""
    if data_at not in (0, 1):
        raise ValueError(f"data_at must be 0 or 1 (the flow time at which z_t is the data), got {data_at}")
    t = _schedule_value(t, what="a flow time t")
    if (t > 1).any():
        hint = (": those are timesteps (1000 σ, diffusers' FlowMatchEulerDiscreteScheduler.timesteps); pass the "
                "scheduler's sigmas at them, or timesteps / 1000" if t.max() > 1.5 else "")
        raise ValueError(f"a flow time t must be in [0, 1], got {t.max().item():g}{hint}")
    t = t.double()  # 1 − t of a bf16/fp16 t is exact in float64, then rounded once: α + σ = 1 to fp32's precision
    return ((1 - t).float(), t.float()) if data_at == 0 else (t.float(), (1 - t).float())
