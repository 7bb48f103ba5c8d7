"""The paper's comparisons, as switches of train.py: min-SNR weighting (Table 6), Lin & Yang's
Self-Perceptual objective (Table 5), the RGB-space loss (Fig. 7) and An et al.'s Cas-DM (a second
network that takes the metric, so that its gradient never reaches the denoiser)."""
import copy
import math

import torch

from data import decode_raw
from lpl import z0_from_prediction


def min_snr_weights(alpha, sigma, paradigm, gamma=5.0):
    """Min-SNR-γ (Hang et al.): each sample's x0-space loss weighted by min(SNR, γ), SNR = α²/σ²,
    written for the target the model regresses. Its MSE is the x0 error times SNR (ε), SNR + 1 (v,
    variance preserving) or (√SNR + 1)² (flow, ε − z0: Hang et al. give no flow form; this is the
    same x0-space weight), so the weights are min(SNR, γ) divided by that. (B,) in, (B,) out."""
    snr = alpha.double().square() / sigma.double().square()  # (B,); inf where σ = 0
    scale = {"eps": snr, "v": snr + 1, "flow": (snr.sqrt() + 1).square()}[paradigm]
    return torch.where(snr > 0, snr.clamp(max=gamma) / scale, 0.0).float()  # α = 0: no x0 information


def eps_from_prediction(pred, z_t, alpha_t, sigma_t, paradigm):
    """ε̂ from the model output (Lin & Yang's Eq. 9, for each paradigm); z_t = α z0 + σ ε."""
    a, s = alpha_t.view(-1, 1, 1, 1), sigma_t.view(-1, 1, 1, 1)
    if paradigm == "eps":
        return pred
    if paradigm == "v":  # α v + σ z_t = (α² + σ²) ε
        return (a * pred + s * z_t) / (a * a + s * s)
    return z_t + a * pred  # flow: v = ε − z0 and z_t = (1 − t) z0 + t ε give ε = z_t + (1 − t) v


class SelfPerceptual:
    """Lin & Yang's Self-Perceptual objective (their Eq. 10–12, Algorithm 1) for a DiT: a frozen copy
    of the pre-trained denoiser is the feature network; both x0 (with ε) and x̂0 (with ε̂) are
    noised again at a fresh t' ~ U, and the MSE is taken on the output of one transformer block
    (theirs: the UNet's mid block; here the middle block by default, the paper's Table 5 varies it)."""

    def __init__(self, model, layer, paradigm, scheduler):
        self.net = copy.deepcopy(model).eval().requires_grad_(False)
        self.block = self.net.transformer_blocks[layer - 1]
        self.paradigm, self.scheduler = paradigm, scheduler

    def features(self, z, t_model, y):
        out = []

        def grab(module, args, output):
            out.append(output)
            raise _StopForward  # later blocks are not needed

        hook = self.block.register_forward_hook(grab)
        try:
            self.net(z, timestep=t_model, class_labels=y)
        except _StopForward:
            pass
        finally:
            hook.remove()
        return out[0]  # (B, tokens, width)

    def draw(self, n, device, generator=None):
        """t' for n samples: (α', σ', the time the model sees)."""
        if self.paradigm == "flow":  # t' ~ U(0, 1)
            t2 = torch.rand(n, generator=generator).to(device)
            return 1 - t2, t2, t2 * 1000
        t2 = torch.randint(0, 1000, (n,), generator=generator).to(device)  # t' ~ U{0, ..., 999}
        abar = self.scheduler.alphas_cumprod.to(device)[t2]
        return abar.sqrt(), (1 - abar).sqrt(), t2

    def __call__(self, out, z_t, z0, eps, alpha, sigma, y, t2=None):
        """(B,) per-sample loss; gradients reach `out` only. t2: draw()'s t', or drawn here."""
        z0_hat = z0_from_prediction(out, z_t, alpha, sigma, self.paradigm)  # Eq. 8
        eps_hat = eps_from_prediction(out, z_t, alpha, sigma, self.paradigm)  # Eq. 9
        a2, s2, t2_model = t2 or self.draw(len(z0), z0.device)
        a2, s2 = a2.view(-1, 1, 1, 1), s2.view(-1, 1, 1, 1)
        with torch.no_grad():
            f = self.features(a2 * z0 + s2 * eps, t2_model, y)  # Eq. 10
        f_hat = self.features(a2 * z0_hat + s2 * eps_hat, t2_model, y)  # Eq. 11
        return (f_hat.float() - f.float()).square().flatten(1).mean(1)  # Eq. 12


class _StopForward(Exception):
    pass


def rgb_loss(vae, z0_hat, z0):
    """The paper's Fig. 7 ablation: the pixel MSE between the fully decoded ẑ0 and z0. (B,)."""
    with torch.no_grad():
        x = decode_raw(vae, z0)
    return (decode_raw(vae, z0_hat).float() - x.float()).square().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------- Cas-DM
# An et al., "Bring Metric Functions into Diffusion Models" (Section 4). θ, the DiT, predicts ε (or
# v) and is trained by its diffusion loss alone (Eq. 14): no gradient of ϕ's losses reaches it. ϕ
# takes x0* (Eq. 8, θ's own clean estimate, detached) and t and returns x'0 and a mixing weight r_t
# per pixel; it is trained by λ^x0 L^x0 + λ^μ L^μ + λ^metric L^metric (Eq. 12, 15), the metric on
# x'0 alone. Sampling mixes the DDIM steps of the two estimates by r_t (Eq. 11, 16, 17).
# ---------------------------------------------------------------------------------------------
class CasDM:
    """ϕ, its EMA, its losses and its sampling step, beside a train.py DiT (θ).

    ϕ is the paper's ϕ_UNet, here diffusers' UNet2DModel at the latent's size (two levels, `width`
    and 2·`width` channels: the paper's ϕ is θ's own UNet; at CPU scale a small one). Its output
    has the latent's C channels plus one; x'0 = x0* + out[:C] and r_t = sigmoid(out[C]), with the
    output layer zero at the start, so a fresh ϕ is the identity on x0* and sampling starts as
    plain DDIM on θ (this project's choices: the paper gives ϕ's output as x'0 itself and no range
    for r_t)."""

    def __init__(self, latent_shape, paradigm, scheduler, width=32, config=None):
        from diffusers import UNet2DModel
        if paradigm not in ("eps", "v"):
            raise ValueError(f"Cas-DM's L^μ is the DDPM posterior mean (Eq. 7, 12): it takes --paradigm eps or v, "
                             f"got {paradigm}")
        C, h, _ = latent_shape
        self.config = config or dict(sample_size=h, in_channels=C, out_channels=C + 1, layers_per_block=1,
                                     block_out_channels=(width, 2 * width), norm_num_groups=math.gcd(32, width),
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"))
        self.phi = UNet2DModel(**self.config)
        torch.nn.init.zeros_(self.phi.conv_out.weight), torch.nn.init.zeros_(self.phi.conv_out.bias)
        self.ema = copy.deepcopy(self.phi).requires_grad_(False)
        self.paradigm, self.scheduler = paradigm, scheduler

    def to(self, device):
        self.phi.to(device), self.ema.to(device)
        return self

    def refine(self, x0_star, t, ema=False):
        """ϕ(x0*, t) -> x'0 (B, C, h, w), r_t (B, 1, h, w) in (0, 1)."""
        out = (self.ema if ema else self.phi)(x0_star, t).sample.float()  # (B, C + 1, h, w)
        return x0_star + out[:, :-1], torch.sigmoid(out[:, -1:])

    def posterior(self, t, device):
        """Eq. 7's coefficients of q(x_{t-1} | x_t, x0), μ̃ = c0·x0 + ct·x_t, for integer t (B,)."""
        abar = self.scheduler.alphas_cumprod.to(device).double()
        a_t = abar[t]
        a_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(a_t))  # ᾱ_{-1} = 1
        beta = 1 - a_t / a_prev
        c0 = a_prev.sqrt() * beta / (1 - a_t)
        ct = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        return c0.float().view(-1, 1, 1, 1), ct.float().view(-1, 1, 1, 1)

    def losses(self, out, z_t, z0, alpha, sigma, t):
        """L^x0, L^μ (Eq. 12) and x'0 for θ's output `out`; gradients reach ϕ only."""
        x0_star = z0_from_prediction(out.detach(), z_t, alpha, sigma, self.paradigm)  # Eq. 8, θ detached
        x0_prime, r = self.refine(x0_star, t)
        c0, ct = self.posterior(t, z0.device)
        mu_true = c0 * z0 + ct * z_t  # μ̃_t
        mu_x0 = (c0 * x0_prime + ct * z_t).detach()  # Eq. 10 (with x'0: the paper's x0* there is a typo)
        mu_eps = c0 * x0_star + ct * z_t  # Eq. 9: Eq. 7 with x0*, detached with θ
        loss_x0 = (x0_prime - z0).square().mean()
        loss_mu = (mu_true - (r * mu_x0 + (1 - r) * mu_eps)).square().mean()  # only r_t learns from it
        return loss_x0, loss_mu, x0_prime, r

    def update_ema(self, decay):
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.phi.parameters()):
                pe.lerp_(pm, 1 - decay)

    def state_dict(self):
        return dict(config=self.config, phi=self.phi.state_dict(), ema=self.ema.state_dict())

    @classmethod
    def from_state(cls, state, latent_shape, paradigm, scheduler):
        cas = cls(latent_shape, paradigm, scheduler, config=state["config"])
        cas.phi.load_state_dict(state["phi"]), cas.ema.load_state_dict(state["ema"])
        return cas


def cas_step(scheduler, x0_scheduler, D, x0_prime, r, t, z):
    """One DDIM step of Cas-DM (Eq. 11 with Eq. 16, 17): the step from θ's output D and the step
    from ϕ's x'0, mixed by r_t. r_t = 0 is plain DDIM on θ, bit for bit."""
    mu_eps = scheduler.step(D, t, z).prev_sample  # Eq. 17 (DDIM from ε', or from v)
    mu_x0 = x0_scheduler.step(x0_prime, t, z).prev_sample  # Eq. 16 (DDIM from x'0)
    return r * mu_x0 + (1 - r) * mu_eps
