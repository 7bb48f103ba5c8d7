"""Train the small CIFAR-10 AutoencoderKL that the CPU results use: factor 4, 32 px -> 8x8x4 latents.

No pretrained autoencoder can be downloaded on an offline machine, and the SD VAE is slow on a
CPU, so the CPU-scale results use this one. It is a diffusers AutoencoderKL (2.7M parameters:
blocks of 32, 64, 128 channels, one layer each, GroupNorm 8), trained with an L1 reconstruction
loss plus a 1e-6-weighted KL term (no perceptual or adversarial loss, so reconstructions are
soft), random horizontal flips, AdamW with linear warm-up and cosine decay. Afterwards
scaling_factor is set to 1 / std of the test-set latent means (so scaled latents have unit
std, as the SD VAE's 0.18215 does), and the test-set PSNR of the latent means is measured.

    python train_vae.py --data data/cifar10-png/train --test-data data/cifar10-png/test --out runs/cifar10-vae-f4

The output folder is written with save_pretrained (use it as train.py --vae FOLDER), with
metrics.json (test PSNR, scaling factor, wall time) and reconstructions.png (test images, top;
reconstructions, bottom). --ckpt-every saves the training state; --resume continues it.
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

from cli import DEVICE, SEED, Float, HelpFormatter, Int, Parser, Path, atomic_path, entry, fail, pick_device
from data import atomic_save, read_rgb


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", required=True, type=Path("dir"), help="training images, an ImageFolder (one subfolder per class) (required)")
    a("--test-data", required=True, type=Path("dir"), help="test images for the scaling factor and the PSNR (required)")
    a("--out", required=True, type=Path("out-dir"), help="the save_pretrained folder to write (required)")
    a("--image-size", type=Int(4, 1024), default=32, help="images are resized to this")
    a("--steps", type=Int(1), default=3000, help="optimizer steps")
    a("--batch-size", type=Int(1, 65536), default=64, help="images per step")
    a("--lr", type=Float(0, 0.1, lo_open=True), default=5e-4, help="peak AdamW learning rate")
    a("--warmup", type=Int(0), default=100, help="linear warm-up steps, then cosine decay to 0")
    a("--kl-weight", type=Float(0, 1), default=1e-6, help="weight of the KL term (per-image sum) against the L1 loss")
    a("--seed", type=SEED, default=0, help="seeds the initialisation, batches, flips and posterior samples")
    a("--ckpt-every", type=Int(1), default=None,
      help="steps per training-state checkpoint in --out; default: min(500, steps / 10), so a short run "
           "is resumable (and its progress visible) before it ends")
    a("--resume", action="store_true", help="continue from --out/train-state.pt")
    a("--device", default=None, type=DEVICE, help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    if args.ckpt_every is None:
        args.ckpt_every = max(1, min(500, args.steps // 10))
    for name in ("image_size", "steps", "batch_size", "ckpt_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0) or args.kl_weight < 0 or args.warmup < 0:
        fail("--lr must be > 0, --kl-weight and --warmup >= 0")
    if args.image_size % 4:
        fail(f"--image-size {args.image_size} must be a multiple of 4 (the autoencoder downsamples by 4)")
    return args


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                         latent_channels=4, sample_size=32)


def load_images(folder, size):
    """All images of an ImageFolder as one uint8 tensor (N, 3, size, size): CIFAR-10 is 150 MB."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    if not os.path.isdir(folder):
        fail(f"{folder!r} is not a folder")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        ds = D.ImageFolder(folder, transform=tf, loader=read_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{folder!r} has no images in class subfolders ({e})".replace("\n", " "))
    loader = torch.utils.data.DataLoader(ds, batch_size=500)
    try:
        return torch.cat([x for x, _ in tqdm(loader, desc=f"loading {folder}")])
    except Exception as e:  # read_rgb names the file
        fail(f"cannot read an image in {folder}: {e}")


def to_model(x):
    return x.float() / 127.5 - 1  # uint8 -> [-1, 1]


@torch.no_grad()
def evaluate(vae, images, device, batch_size=500):
    """Latent means of the images, and the per-image PSNR (dB, images in [0, 1]) of their decoding."""
    means, psnr = [], []
    for i in range(0, len(images), batch_size):
        x = to_model(images[i:i + batch_size]).to(device)
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).square().flatten(1).mean(1)  # in [0, 1] units
        means.append(z.cpu()), psnr.append((10 * torch.log10(1 / mse)).cpu())
    return torch.cat(means), torch.cat(psnr)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out {args.out!r} ({e.strerror})")
    state_path = os.path.join(args.out, "train-state.pt")
    if args.resume and not os.path.exists(state_path):
        fail(f"--resume: no {state_path}")
    if not args.resume and os.path.exists(state_path):
        fail(f"{args.out} holds a training state: continue it with --resume, or pick another --out")
    if not args.resume and os.listdir(args.out):  # e.g. a trained autoencoder: never written over
        fail(f"--out {args.out} is not empty ({', '.join(sorted(os.listdir(args.out))[:3])}, ...): pick a new folder")
    train_x, test_x = load_images(args.data, args.image_size), load_images(args.test_data, args.image_size)

    from diffusers.optimization import get_cosine_schedule_with_warmup
    torch.manual_seed(args.seed)
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    step, seconds = 0, 0.0
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        step, seconds = state["step"], state["seconds"]
        torch.set_rng_state(state["rng"])
    print(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters, "
          f"{len(train_x)} training images, {len(test_x)} test images, device {device}")
    bar, t0 = tqdm(total=args.steps, initial=step, desc="train"), time.time()
    while step < args.steps:
        idx = torch.randint(len(train_x), (args.batch_size,))
        x = to_model(train_x[idx])
        flip = torch.rand(len(x)) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1, kl = (rec - x).abs().mean(), post.kl().mean()  # kl: summed over the latent, mean over images
        loss = l1 + args.kl_weight * kl
        if not torch.isfinite(loss):
            fail(f"the loss is not finite at step {step + 1}; the last training state is kept in {args.out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        step += 1
        bar.update(1), bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.1f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            atomic_save(dict(vae=vae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step,
                             seconds=seconds + time.time() - t0, rng=torch.get_rng_state()), state_path)
    bar.close()
    seconds += time.time() - t0

    vae.eval()
    if not all(p.isfinite().all() for p in vae.parameters()):
        fail(f"the autoencoder's weights are not finite after {step} steps (try a lower --lr); nothing was saved")
    means, psnr = evaluate(vae, test_x, device)  # (vae.decode does not apply scaling_factor)
    scaling_factor = 1 / means.std().item()  # unit-std latents for the diffusion model
    vae.register_to_config(scaling_factor=scaling_factor)
    # Written beside the folder and moved in file by file, metrics.json last: a folder with
    # metrics.json holds a whole autoencoder, and a killed save leaves no half-written weights.
    staging = os.path.join(args.out, f".saving-{os.getpid()}")
    vae.save_pretrained(staging)
    for f in os.listdir(staging):
        os.replace(os.path.join(staging, f), os.path.join(args.out, f))
    os.rmdir(staging)
    metrics = dict(steps=step, batch=args.batch_size, test_psnr_db=round(psnr.mean().item(), 2),
                   latent_std=means.std().item(), scaling_factor=scaling_factor,
                   latent_shape=list(means.shape[1:]), image_size=args.image_size, train_seconds=round(seconds))
    from torchvision.utils import save_image
    with torch.no_grad():
        x = to_model(test_x[:20]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    with atomic_path(os.path.join(args.out, "reconstructions.png")) as tmp:
        save_image(torch.cat([x, rec]).cpu() / 2 + 0.5, tmp, nrow=20)
    with atomic_path(os.path.join(args.out, "metrics.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
    print(f"wrote {args.out}: test PSNR {metrics['test_psnr_db']} dB, scaling_factor {scaling_factor:.4f}, "
          f"latents {tuple(means.shape[1:])}, {seconds / 60:.0f} min")


if __name__ == "__main__":
    entry(main)
