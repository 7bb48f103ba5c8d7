"""The denoiser and its schedules: a class-conditional DiT (diffusers' DiTTransformer2DModel, set up
as Peebles & Xie's), the paper's β schedule for ε and v, SD3's time sampling for flow, and the
sampler (DDIM for ε and v, Euler for flow, classifier-free guidance; Cas-DM's mixed step).

Time conventions. eps and v: discrete t in {0..999}, t = 0 is (almost) clean, t = 999 is noise;
z_t = α_t z0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t). flow: t in [0, 1], t = 0 is data,
t = 1 is noise (SD3's convention); z_t = (1 − t) z0 + t ε, so α_t = 1 − t, σ_t = t.
"""
import math

import torch

from comparisons import cas_step
from lpl import z0_from_prediction


# DiT sizes (Peebles & Xie, Table 1), plus two for CPUs: XS (6 layers, 256 wide, the CPU results'
# model) and T (tests and the one-minute smoke run). Name = size / patch size.
MODELS = {
    "DiT-T/2": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, patch_size=2),
    "DiT-XS/2": dict(num_layers=6, num_attention_heads=4, attention_head_dim=64, patch_size=2),
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),
    "DiT-S/4": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=4),
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),
}


def build_model(model_cfg):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding
    model = DiTTransformer2DModel(**model_cfg)
    for block in model.transformer_blocks:  # adaLN-Zero: each block starts as the identity
        torch.nn.init.zeros_(block.norm1.linear.weight), torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):  # and the output as zero (DiT, Section 3.2)
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    # diffusers gives every block (and the final layer) its own label embedding, each dropping labels
    # independently in training mode: a sample would be unconditional in some blocks only, and the
    # fully unconditional model that guidance samples from would almost never be trained. The tables
    # keep their null row (index num_classes); the trainer drops each label once (drop_labels).
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


def drop_labels(y, num_classes, p):
    """Classifier-free guidance training (Ho & Salimans): each label is replaced by the null class
    num_classes with probability p, once per sample, so every block sees the same label."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, num_classes, y)


def ddpm_scheduler(paradigm):
    """The paper's quadratic β schedule (SDXL's, 0.00085 -> 0.012); v with zero terminal SNR (Lin et al.)."""
    from diffusers import DDIMScheduler
    v = paradigm == "v"
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         prediction_type="v_prediction" if v else "epsilon",
                         rescale_betas_zero_snr=v, timestep_spacing="trailing" if v else "leading")


def sample_t(paradigm, n, device, scheduler=None):
    """Training times and their α_t, σ_t, and the time the model sees (0..1000)."""
    if paradigm == "flow":  # SD3's "mode sampling with heavy tails", s = 1.29 (Esser et al., Eq. 20)
        u, s = torch.rand(n, device=device), 1.29
        t = 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return 1 - t, t, t * 1000
    t = torch.randint(0, 1000, (n,), device=device)
    abar = scheduler.alphas_cumprod.to(device)[t]
    return abar.sqrt(), (1 - abar).sqrt(), t


def draw_noise(n, latent_shape, generator=None):
    """The sampler's starting latents, drawn on the CPU: the same samples on every device."""
    return torch.randn(n, *latent_shape, generator=generator, device="cpu")


@torch.inference_mode()
def generate(model, paradigm, y, num_classes, latent_shape, steps=50, cfg=1.5, generator=None, cas=None, cas_ema=True,
             noise=None, model_low=None, switch=0.0):
    """Latents for labels y from `noise` (drawn from `generator` when not given): DDIM (eta 0) for eps
    and v, Euler from t = 1 to 0 for flow. With `cas` (a Cas-DM run's ϕ), each DDIM step is mixed with
    the step from ϕ's x'0 (comparisons.cas_step). With `model_low`, the steps taken at σ_t/α_t <=
    `switch` call model_low instead of model (where along sampling a model's effect lies)."""
    dev = y.device
    z = (draw_noise(len(y), latent_shape, generator) if noise is None else noise).to(dev)
    y_in = torch.cat([y, torch.full_like(y, num_classes)])  # conditional, then the null class
    sched = None if paradigm == "flow" else ddpm_scheduler(paradigm)

    def ratio(t):  # σ_t/α_t of the model's time t (flow: t/1000 = σ, α = 1 − σ; ∞ at pure noise)
        if paradigm == "flow":
            s = float(t) / 1000
            return s / (1 - s) if s < 1 else math.inf
        abar = float(sched.alphas_cumprod[int(t)])
        return math.sqrt((1 - abar) / abar) if abar > 0 else math.inf

    def D(z, t):  # classifier-free guidance (Ho & Salimans)
        net = model_low if model_low is not None and ratio(t) <= switch else model
        out = net(torch.cat([z, z]), timestep=t.expand(2 * len(z)), class_labels=y_in).sample
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

    if paradigm == "flow":
        ts = torch.linspace(1, 0, steps + 1, device=dev)
        for t, t_next in zip(ts[:-1], ts[1:]):
            z = z + (t_next - t) * D(z, t * 1000)  # dz/dt = ε − z0
        return z
    sched.set_timesteps(steps)
    if cas is not None:
        # Cas-DM's Eq. 16 is a DDIM step from x'0: the same schedule, the output read as the clean sample
        x0_sched = type(sched).from_config(sched.config, prediction_type="sample")
        x0_sched.set_timesteps(steps)
    for t in sched.timesteps:
        out = D(z, t.to(dev))
        if cas is None:
            z = sched.step(out, t, z).prev_sample
            continue
        abar = sched.alphas_cumprod[t].to(dev)
        x0_star = z0_from_prediction(out, z, abar.sqrt(), (1 - abar).sqrt(), paradigm)  # Cas-DM's Eq. 8
        x0_prime, r = cas.refine(x0_star, t.to(dev).expand(len(z)), ema=cas_ema)
        z = cas_step(sched, x0_sched, out, x0_prime, r, t, z)
    return z
