"""The paper's comparisons, as switches of train.py: min-SNR weighting (Table 6), Lin & Yang's
Self-Perceptual objective (Table 5) and the RGB-space loss (Fig. 7)."""
import copy

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

    def draw(self, n, device):
        """t' for n samples: (α', σ', the time the model sees)."""
        if self.paradigm == "flow":  # t' ~ U(0, 1)
            t2 = torch.rand(n, device=device)
            return 1 - t2, t2, t2 * 1000
        t2 = torch.randint(0, 1000, (n,), device=device)  # t' ~ U{0, ..., 999}
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
