"""What LPL costs, measured against the limit any implementation of it has. One run, no network.

    python bench.py                       # CPU-sized defaults: SD VAE architecture, DiT-S/2, 64 px
    python bench.py --device cuda --batch-size 64 --image-size 256 --dtype bf16

Builds the Stable Diffusion VAE architecture (128, 256, 512, 512 channels, 2 layers per block,
4 latent channels) with random weights unless --vae names real ones, and a DiT from train.py's
registry. After warm-up it runs, interleaved, --reps rounds of:
  base   a training step with the diffusion loss only (forward, backward, AdamW step);
  lpl    the same step with LPL on the samples under the noise threshold (--lpl-fraction of them);
  lpl0   the LPL step when no sample is under the threshold (must cost what base costs);
  limit  the decoder work LPL cannot avoid: one forward without gradients on the selected clean
         latents plus one forward and backward on the selected predicted latents, up to the last
         tapped block (bare diffusers modules, no hooks, no loss);
  ckpt   the LPL step with gradient checkpointing of the decoder blocks;
  parts  the loss on precomputed features: outlier masks (Algorithm 1) and the normalized
         distance (forward + backward);
and prints medians and ratios. Peak memory: CUDA's max_memory_allocated (the whole step: weights,
optimizer state, activations); on CPU, the rise of the process's peak resident memory (VmHWM)
over the step, with the peak reset before each step. CPU timings keep freed memory in the process
(keep_freed_memory; --default-malloc turns that off), as CUDA's caching allocator does.
"""
import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cli import DEVICE, Float, Int, Path, HelpFormatter, Parser, fail, pick_device
from data import latent_geometry, load_vae
from lpl import LatentPerceptualLoss, layer_distance, lpl_mask, z0_from_prediction
from model import MODELS, build_model, ddpm_scheduler

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--vae", default=None, type=Path("dir", hub=True), help="a save_pretrained folder or Hub id (default: the SD architecture, random weights)")
    a("--model", default="DiT-S/2", choices=MODELS, help="the DiT of the timed steps")
    a("--batch-size", type=Int(1, 4096), default=16, help="samples per step")
    a("--image-size", type=Int(8, 4096), default=64, help="pixels; latents are this / the VAE factor")
    a("--device", default=None, type=DEVICE, help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, as train.py on CUDA")
    a("--lpl-blocks", type=Int(1, 64), default=None, help="decoder blocks tapped (default: all)")
    a("--lpl-fraction", type=Float(0, 1, lo_open=True), default=None,
      help="share of the batch under the threshold (default: what train.py's default τ gives for eps)")
    a("--grad-checkpointing", action="store_true", help="checkpoint the decoder in the headline LPL step")
    a("--warmup", type=Int(0, 1000), default=2, help="untimed rounds first")
    a("--reps", type=Int(1, 1000), default=11, help="timed rounds; medians are reported")
    a("--default-malloc", action="store_true",
      help="CPU: leave glibc's malloc returning freed memory to the OS (see keep_freed_memory)")
    a("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the CPU memory child process
    args = p.parse_args(argv)
    for name, low in (("batch_size", 1), ("image_size", 1), ("reps", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.lpl_blocks is not None and args.lpl_blocks < 1:
        fail(f"--lpl-blocks must be >= 1, got {args.lpl_blocks}")
    if args.lpl_fraction is not None and not 0 < args.lpl_fraction <= 1:
        fail(f"--lpl-fraction must be in (0, 1], got {args.lpl_fraction}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL
    vae = load_vae(args.vae, device) if args.vae else AutoencoderKL(**SD_VAE).to(device)
    if "AutoencoderKL" not in {c.__name__ for c in type(vae).__mro__}:  # the limit is timed on its decoder layout
        fail(f"bench.py times AutoencoderKL-type decoders (SD, SDXL, SD3, FLUX.1); --vae {args.vae} is a "
             f"{type(vae).__name__}")
    C, f = latent_geometry(vae)
    patch = MODELS[args.model]["patch_size"]
    if args.image_size % (f * patch):
        fail(f"--image-size {args.image_size} must be a multiple of {f * patch}: the VAE downsamples by {f} and "
             f"{args.model} cuts the latent into {patch}x{patch} patches")
    B, h = args.batch_size, args.image_size // f
    model = build_model(dict(MODELS[args.model], in_channels=C, out_channels=C, sample_size=h,
                             num_embeds_ada_norm=1000)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lpl = LatentPerceptualLoss(vae, num_blocks=args.lpl_blocks, grad_checkpointing=True)
    n_taps = len(lpl.layer_weights)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    sched = ddpm_scheduler("eps")
    if args.lpl_fraction is None:  # uniform t in 0..999, train.py's default τ = 4 scaled by h / 64
        abar = sched.alphas_cumprod
        args.lpl_fraction = lpl_mask(abar.sqrt(), (1 - abar).sqrt(), 4.0, h / 64).float().mean().item()
    k = round(args.lpl_fraction * B)
    if not 1 <= k <= B:  # the limit, and so the efficiency, needs at least one sample under τ
        sys.exit(f"bench.py: error: --lpl-fraction {args.lpl_fraction:.3f} puts {k} of {B} samples under the "
                 f"threshold; it must select 1 to {B}: raise --lpl-fraction or --batch-size")
    z0 = torch.randn(B, C, h, h, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    t = torch.full((B,), 900, device=device)  # the first k samples at low noise, the rest high
    t[:k] = 50
    abar = sched.alphas_cumprod.to(device)[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    eps = torch.randn_like(z0)
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    tau_k = (sigma / alpha)[:k].max().item() * 1.0001  # selects exactly the first k
    tau_none = 0.0  # selects nothing: LPL on, but no sample under the threshold

    def train_step(tau=None, ckpt=False):
        (vae.enable_gradient_checkpointing if ckpt else vae.disable_gradient_checkpointing)()
        with amp:
            out = model(z_t, timestep=t, class_labels=y).sample.float()
            loss = F.mse_loss(out, eps)
            if tau is not None:
                m = lpl_mask(alpha, sigma, tau, 1.0)  # tau_k is already on the raw σ/α
                if m.any():
                    z0_hat = z0_from_prediction(out[m], z_t[m], alpha[m], sigma[m], "eps")
                    loss = loss + 3.0 * lpl(z0_hat, z0[m]).sum() / B
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dec = vae.decoder
    blocks = [dec.mid_block, *dec.up_blocks][:n_taps]

    post_quant_conv = vae.post_quant_conv or torch.nn.Identity()  # (None when the config turns it off)

    def bare_decoder(z):  # the unavoidable work: post_quant_conv, conv_in and the tapped blocks
        x = dec.conv_in(post_quant_conv(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)))
        outs = []
        for b in blocks:
            x = b(x)
            outs.append(x)
        return outs

    z_sel = z0[:k]
    z_hat_sel = (z0[:k] + 0.1).requires_grad_()

    def limit():
        vae.disable_gradient_checkpointing()
        with amp:
            with torch.no_grad():
                bare_decoder(z_sel)
            outs = bare_decoder(z_hat_sel)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    with torch.no_grad(), amp:  # features of one LPL call, to time the loss itself
        phi = [x.float() for x in lpl.features(z_sel)]
        phi_hat = [x.float() for x in lpl.features(z_hat_sel.detach())]
    phi_hat = [x.requires_grad_() for x in phi_hat]
    masks = [lpl.outlier_mask(f) for f in phi]

    def outliers():
        for f in phi:
            lpl.outlier_mask(f)

    def distance():
        d = sum(w * layer_distance(f, fh, r).mean(1) for w, f, fh, r in zip(lpl.layer_weights, phi, phi_hat, masks))
        d.sum().backward()

    runs = {"base": train_step, "lpl": lambda: train_step(tau_k, ckpt=args.grad_checkpointing),
            "lpl0": lambda: train_step(tau_none), "limit": limit,
            "ckpt": lambda: train_step(tau_k, ckpt=not args.grad_checkpointing),
            "outliers": outliers, "distance": distance}
    if args.memory_only:  # child process: one warm-up call, then the peak of one call each
        for n in ("base", "lpl", "ckpt"):
            runs[n]()
        print(json.dumps({n: peak_memory(runs[n], device) for n in ("base", "lpl", "ckpt")}))
        return
    kept = device.type == "cpu" and not args.default_malloc and keep_freed_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in runs}
    for rep in range(args.warmup + args.reps):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    if device.type == "cuda":
        mem = {n: peak_memory(runs[n], device) for n in ("base", "lpl", "ckpt")}
    else:  # glibc keeps freed memory resident; a child that unmaps large blocks on free shows the peaks
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-only"], env=env,
                               capture_output=True, text=True, check=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])

    unit = "MiB allocated (CUDA)" if device.type == "cuda" else "MiB peak-RSS rise (CPU)"
    name = args.vae or "SD VAE architecture (random weights)"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if device.type == 'cuda' else 'threads'}), {args.dtype}, {name}, {args.model}, batch {B}, "
          f"{args.image_size} px -> {h}x{h} latents, {n_taps} decoder blocks tapped, "
          f"{k}/{B} samples under the threshold ({args.lpl_fraction:.2f}), median of {args.reps}"
          + (", freed memory kept (see keep_freed_memory)" if kept else ""))
    for n in runs:
        print(f"  {n:9s} {med[n] * 1e3:9.1f} ms" + (f"   {mem[n]:8.0f} {unit}" if n in mem else ""))
    ck, nck = ("lpl", "ckpt") if args.grad_checkpointing else ("ckpt", "lpl")
    print(f"step-time ratio LPL / baseline            {med['lpl'] / med['base']:.3f}")
    print(f"efficiency (LPL - baseline) / limit       {(med['lpl'] - med['base']) / med['limit']:.3f}")
    print(f"memory ratio LPL / baseline               {mem['lpl'] / mem['base']:.3f}")
    print(f"no sample under threshold / baseline      {med['lpl0'] / med['base']:.3f}")
    print(f"share of LPL time: outlier detection      {med['outliers'] / (med['lpl'] - med['base']):.3f} "
          f"of the added time, {med['outliers'] / med['lpl']:.3f} of the step")
    print(f"share of LPL time: normalization+distance {med['distance'] / (med['lpl'] - med['base']):.3f} "
          f"of the added time, {med['distance'] / med['lpl']:.3f} of the step")
    print(f"grad checkpointing: memory x{mem[ck] / mem[nck]:.3f}, step time x{med[ck] / med[nck]:.3f}")


def keep_freed_memory():
    """Stop glibc from handing freed memory back to the OS (Linux CPU timing runs only).

    By default glibc unmaps large freed blocks and trims the heap, so a step whose peak exceeds
    what the allocator kept refaults those pages, ~6 µs per 4 KiB on the VM we measured on; that
    charges the allocator's policy to whichever step uses more memory. Keeping freed memory, as
    PyTorch's CUDA caching allocator does (and jemalloc or tcmalloc, which PyTorch's performance
    tuning guide suggests for CPU training), makes the timings measure compute. Returns whether
    it could be set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))


def peak_memory(fn, device):
    """Peak memory of one call of fn, in MiB (see the module docstring for what is counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    def status(key):
        return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    fn()
    return status("VmHWM") - before


if __name__ == "__main__":
    from cli import entry
    entry(main)
