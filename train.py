"""Train a small class-conditional DiT on VAE latents, with or without the Latent Perceptual Loss.

The paper's protocol at toy scale: pre-train with the plain diffusion loss, then post-train from
that checkpoint with (--lpl-weight 3) and without (--lpl-weight 0) LPL, and compare. The dataset is
encoded once by the frozen VAE (both horizontal flips) and cached next to the run.

    python train.py --run-dir runs/pretrain --steps 100000
    python train.py --run-dir runs/lpl --init-from runs/pretrain/ckpt.pt --steps 50000 --lpl-weight 3

Time conventions. eps and v: discrete t in {0..999}, t = 0 is (almost) clean, t = 999 is noise;
z_t = α_t z0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t). flow: t in [0, 1], t = 0 is data,
t = 1 is noise (SD3's convention); z_t = (1 − t) z0 + t ε, so α_t = 1 − t, σ_t = t.
"""
import argparse
import copy
import functools
import glob
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lpl import LatentPerceptualLoss, lpl_mask, z0_from_prediction

# DiT sizes (Peebles & Xie, Table 1) plus a tiny one for CPU smoke runs. Name = size / patch size.
MODELS = {
    "DiT-T/2": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, patch_size=2),
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),
    "DiT-S/4": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=4),
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="cifar10", help="'cifar10' (torchvision), an image folder with one subfolder "
      "per class, or a folder of ImageNet 64x64 .npz batches")
    a("--data-root", default="data", help="where --data cifar10 is downloaded")
    a("--vae", default="stabilityai/sd-vae-ft-ema", help="Hugging Face id or save_pretrained folder")
    a("--image-size", type=int, default=64, help="images are resized to this (64 -> 8x8 latents at f8)")
    a("--model", default="DiT-S/2", choices=MODELS)
    a("--paradigm", default="eps", choices=["eps", "v", "flow"])
    a("--steps", type=int, default=None, help="total steps (default 50000; on --resume, the run's own)")
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=1e-4)
    a("--seed", type=int, default=0)
    a("--run-dir", default="runs/pretrain", help="checkpoints, log.jsonl and sample grids go here")
    a("--device", default=None, help="default: cuda, else mps, else cpu")
    a("--init-from", default=None, help="start a new run from this checkpoint's weights (post-training)")
    a("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR exactly where it stopped")
    a("--ema-decay", type=float, default=0.9999, help="the paper's baseline; it finds 0.99975 best with LPL")
    a("--lpl-weight", type=float, default=0.0, help="w_LPL; 0 turns LPL off, 3.0 is the paper's best")
    a("--lpl-tau", type=float, default=4.0, help="τ_σ on σ/α at 64x64 latents (the paper's 512 px; "
      "3-6 is best, Fig. 6); scaled by latent width / 64 (Section 4.1)")
    a("--lpl-blocks", type=int, default=None, help="decoder blocks tapped (Fig. 7); default all")
    a("--lpl-normalization", default="shared", choices=["shared", "separate"])
    a("--lpl-layer-weights", default="pow2", choices=["pow2", "uniform"])
    a("--lpl-no-outliers", action="store_true", help="turn off Algorithm 1's outlier mask")
    a("--lpl-grad-checkpointing", action="store_true", help="recompute decoder blocks in backward")
    a("--compile", action="store_true", help="torch.compile the DiT")
    a("--log-every", type=int, default=100)
    a("--ckpt-every", type=int, default=5000)
    a("--sample-every", type=int, default=5000)
    a("--num-workers", type=int, default=0, help="data loader workers for the one-time encoding")
    args = p.parse_args(argv)
    if args.lpl_tau < 0:
        p.error(f"--lpl-tau must be >= 0, got {args.lpl_tau}")
    if args.steps is None and not args.resume:
        args.steps = 50_000
    return args


def fail(msg):
    """A one-line error for bad input: no traceback, nothing lost."""
    sys.exit(f"error: {msg}")


def pick_device(name=None):
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


# ------------------------------------------------------------------------------ data -> latents
def load_vae(name, device):
    from diffusers import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:
        fail(f"cannot load the VAE {name!r} ({type(e).__name__}): give --vae a Hugging Face id you can "
             f"download or a folder written by AutoencoderKL.save_pretrained")
    return vae.to(device).eval().requires_grad_(False)


def image_dataset(args):
    import torchvision.datasets as D
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor(),
                    T.Normalize(0.5, 0.5)])  # VAEs take images in [-1, 1]
    if args.data == "cifar10":
        try:
            return D.CIFAR10(args.data_root, train=True, download=True, transform=tf)
        except Exception as e:
            fail(f"cannot download CIFAR-10 into {args.data_root!r} ({type(e).__name__}); offline, pass "
                 f"--data PATH to an image folder with one subfolder per class")
    if not os.path.isdir(args.data):
        fail(f"--data {args.data!r} is neither 'cifar10' nor an existing folder")
    npz = sorted(glob.glob(os.path.join(args.data, "*.npz")))
    if npz:  # official downsampled ImageNet: uint8 rows of 3*64*64, labels 1..1000
        parts = [np.load(f) for f in npz]
        x = torch.from_numpy(np.concatenate([p["data"] for p in parts])).view(-1, 3, 64, 64)
        y = torch.from_numpy(np.concatenate([p["labels"] for p in parts]).astype(np.int64) - 1)
        x = F.interpolate(x.float() / 127.5 - 1, size=args.image_size, mode="area")
        return torch.utils.data.TensorDataset(x, y)
    try:
        return D.ImageFolder(args.data, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"--data {args.data!r} has no images in class subfolders ({e})".replace("\n", " "))


def encode_dataset(args, vae, device):
    """Latents in the diffusion model's scale, (z − shift)·scaling_factor, of each image and its mirror."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % factor:
        fail(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor {factor}")
    key = json.dumps([os.path.abspath(args.data) if args.data != "cifar10" else "cifar10",
                      args.image_size, args.vae, vae.config.scaling_factor, vae.config.shift_factor])
    cache = os.path.join(os.path.dirname(os.path.abspath(args.run_dir)),
                         f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    if os.path.exists(cache):
        return torch.load(cache), cache
    ds = image_dataset(args)
    classes = getattr(ds, "classes", None) or [str(i) for i in range(int(ds.tensors[1].max()) + 1)]
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=args.num_workers)
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    zs, ys = [], []
    with torch.no_grad():
        for x, y in tqdm(loader, desc="encoding dataset (once)"):
            x = x.to(device)
            for view in (x, x.flip(-1)):  # both horizontal flips
                zs.append(((vae.encode(view).latent_dist.mean - shift) * sf).half().cpu())
                ys.append(y)
    data = dict(z=torch.cat(zs), y=torch.cat(ys), classes=classes)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_save(data, cache)
    return data, cache


# ------------------------------------------------------------------------------ model, schedules
def build_model(model_cfg):
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(**model_cfg)
    for block in model.transformer_blocks:  # adaLN-Zero: each block starts as the identity
        torch.nn.init.zeros_(block.norm1.linear.weight), torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):  # and the output as zero (DiT, Section 3.2)
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    return model


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


@torch.no_grad()
def generate(model, paradigm, y, num_classes, latent_shape, steps=50, cfg=1.5, generator=None):
    """Latents for labels y: DDIM (eta 0) for eps and v, Euler from t = 1 to 0 for flow."""
    dev = y.device
    z = torch.randn(len(y), *latent_shape, generator=generator, device="cpu").to(dev)
    y_in = torch.cat([y, torch.full_like(y, num_classes)])  # conditional, then the null class

    def D(z, t):  # classifier-free guidance (Ho & Salimans)
        out = model(torch.cat([z, z]), timestep=t.expand(2 * len(z)), class_labels=y_in).sample
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

    if paradigm == "flow":
        ts = torch.linspace(1, 0, steps + 1, device=dev)
        for t, t_next in zip(ts[:-1], ts[1:]):
            z = z + (t_next - t) * D(z, t * 1000)  # dz/dt = ε − z0
        return z
    sched = ddpm_scheduler(paradigm)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        z = sched.step(D(z, t.to(dev)), t, z).prev_sample
    return z


def decode(vae, z):
    """Diffusion-scale latents -> images in [0, 1]."""
    x = vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------ checkpoints
def atomic_save(obj, path):
    """Write to a temp file and rename: an interrupted save never corrupts the last checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        fail(f"no checkpoint at {path!r}")
    except Exception as e:
        fail(f"cannot read checkpoint {path!r} ({type(e).__name__}); it is corrupted or not a train.py checkpoint")


# ------------------------------------------------------------------------------ training
def main(argv=None):
    args = get_args(argv)
    resume = None
    if args.resume:  # the run's own arguments, but --steps and --device if given here
        resume = load_checkpoint(os.path.join(args.resume, "ckpt.pt"))
        given = {k: v for k, v in vars(args).items() if k in ("steps", "device") and v is not None}
        args = argparse.Namespace(**dict(resume["args"], **given))
    device = pick_device(args.device)
    os.makedirs(args.run_dir, exist_ok=True)
    vae = load_vae(args.vae, device)
    data, cache = encode_dataset(args, vae, device)
    z_all, y_all = data["z"].to(device), data["y"].to(device)  # on the device once, not per batch
    N, num_classes, latent_shape = len(z_all), len(data["classes"]), tuple(z_all.shape[1:])
    if N < args.batch_size:
        fail(f"the dataset has {N} latents (images x 2 flips), fewer than --batch-size {args.batch_size}")

    torch.manual_seed(args.seed)  # after encoding, so the stream does not depend on the cache existing
    model_cfg = dict(MODELS[args.model], in_channels=latent_shape[0], out_channels=latent_shape[0],
                     sample_size=latent_shape[-1], num_embeds_ada_norm=num_classes)
    init = resume or (load_checkpoint(args.init_from) if args.init_from else None)
    if init is not None:  # the architecture comes from the checkpoint
        if init["args"]["paradigm"] != args.paradigm:
            fail(f"--paradigm {args.paradigm} does not match {args.init_from}'s {init['args']['paradigm']}")
        model_cfg = init["model_config"]
    model = build_model(model_cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    step = 0
    if init is not None:
        model.load_state_dict(init["model"]), ema.load_state_dict(init["ema"])
    if resume is not None:  # --init-from starts afresh; --resume restores everything
        opt.load_state_dict(resume["opt"])
        step = resume["step"]
        torch.set_rng_state(resume["rng"]["cpu"])
        if device.type == "cuda" and resume["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
    sched = None if args.paradigm == "flow" else ddpm_scheduler(args.paradigm)

    lpl = None
    if args.lpl_weight > 0:  # the frozen VAE is reused; only samples under the threshold are decoded
        lpl = LatentPerceptualLoss(vae, num_blocks=args.lpl_blocks, normalization=args.lpl_normalization,
                                   layer_weights=args.lpl_layer_weights, outliers=not args.lpl_no_outliers,
                                   grad_checkpointing=args.lpl_grad_checkpointing)
    res_scale = latent_shape[-1] / 64  # Section 4.1: τ scales with resolution; 64 = latents of 512 px
    fwd = torch.compile(model) if args.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def save(path):
        atomic_save(dict(args=vars(args), model_config=model_cfg, step=step, model=model.state_dict(),
                         ema=ema.state_dict(), opt=opt.state_dict(), classes=data["classes"],
                         latent_shape=latent_shape, rng=dict(cpu=torch.get_rng_state(), cuda=(
                             torch.cuda.get_rng_state() if device.type == "cuda" else None))), path)

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch):  # one permutation per epoch, seeded by it: data order depends on the step only
        return torch.randperm(N, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(device)

    def batch_indices(step):  # exact on --resume
        per_epoch = N // args.batch_size
        i = step % per_epoch
        return epoch_order(step // per_epoch)[i * args.batch_size:(i + 1) * args.batch_size]

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {N} latents "
          f"{latent_shape} from {cache}, {args.paradigm}, LPL weight {args.lpl_weight}, device {device}")
    log = open(os.path.join(args.run_dir, "log.jsonl"), "a")
    bar = tqdm(total=args.steps, initial=step, desc="train")
    acc, t0 = dict(diff=0.0, lpl=0.0, frac=0.0, n=0), time.time()
    model.train()
    while step < args.steps:
        idx = batch_indices(step)
        z0, y = z_all[idx].float(), y_all[idx]
        B = len(z0)
        alpha, sigma, t_model = sample_t(args.paradigm, B, device, sched)
        eps = torch.randn_like(z0)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        z_t = a * z0 + s * eps
        target = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[args.paradigm]
        with amp:
            out = fwd(z_t, timestep=t_model, class_labels=y).sample.float()
            loss_diff = F.mse_loss(out, target)
            loss_lpl, m = torch.zeros((), device=device), None
            if lpl is not None:
                m = lpl_mask(alpha, sigma, args.lpl_tau, res_scale)  # (B,) bool
                if m.any():  # (a sync, to skip decoding) E[δ·L]: the selected samples' losses, summed, / B
                    z0_hat = z0_from_prediction(out[m], z_t[m], alpha[m], sigma[m], args.paradigm)
                    loss_lpl = lpl(z0_hat, z0[m]).sum() / B
            loss = loss_diff + args.lpl_weight * loss_lpl
        frac = m.float().mean() if m is not None else torch.zeros((), device=device)
        l_diff, l_lpl, frac = torch.stack([loss_diff, loss_lpl, frac]).tolist()  # one sync for logging
        if not math.isfinite(l_diff + l_lpl):
            fail(f"the loss is not finite at step {step + 1}; stopped before any update, the last good "
                 f"checkpoint is kept in {args.run_dir} (try a lower --lr or --lpl-weight)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema_decay)
        step += 1
        acc["diff"], acc["lpl"], acc["frac"], acc["n"] = acc["diff"] + l_diff, acc["lpl"] + l_lpl, acc["frac"] + frac, acc["n"] + 1
        bar.update(1)
        bar.set_postfix(loss=f"{l_diff:.4f}", lpl=f"{l_lpl:.4f}")
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t0
            row = dict(step=step, loss_diff=acc["diff"] / acc["n"], loss_lpl=acc["lpl"] / acc["n"],
                       lpl_frac=acc["frac"] / acc["n"], img_per_s=acc["n"] * B / dt, lr=args.lr)
            log.write(json.dumps(row) + "\n"), log.flush()
            acc, t0 = dict(diff=0.0, lpl=0.0, frac=0.0, n=0), time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save(os.path.join(args.run_dir, "ckpt.pt"))
        if step % args.sample_every == 0 or step == args.steps:
            from torchvision.utils import save_image
            ema.eval()
            y_s = torch.arange(num_classes, device=device).repeat_interleave(8)[:80]
            zs = generate(ema, args.paradigm, y_s, num_classes, latent_shape,
                          generator=torch.Generator().manual_seed(args.seed))
            save_image(decode(vae, zs), os.path.join(args.run_dir, f"samples-{step:07d}.png"), nrow=8)
    bar.close()
    print(f"done: {step} steps, checkpoint {os.path.join(args.run_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    main()
