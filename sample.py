"""Sample a checkpoint of train.py: a grid, a folder of PNGs, or FID against the training images.

    python sample.py --ckpt runs/lpl/ckpt.pt --out grid.png
    python sample.py --ckpt runs/lpl/ckpt.pt --n 10000 --out-dir samples/lpl --fid

The checkpoint describes itself: paradigm, model, VAE and data come from it. DDIM (eta 0, 50 steps
as in the paper) for eps and v, Euler for flow; classifier-free guidance with --cfg; EMA weights.
FID uses torch-fidelity (pip install torch-fidelity): it computes FID and precision/recall from
two image folders in one call, with the reference Inception weights of the original FID code.
"""
import math
import os

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from train import (HelpFormatter, Parser, all_finite, build_model, decode, fail, generate, load_checkpoint,
                   load_vae, pick_device)


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a checkpoint written by train.py (required)")
    a("--out", default="samples.png", help="the grid PNG (when --out-dir is not given)")
    a("--out-dir", default=None, help="write --n individual PNGs here (default: a grid at --out)")
    a("--n", type=int, default=None, help="number of samples (default: 8 per class, at most 80, for a grid; 1000 for --out-dir)")
    a("--classes", type=int, nargs="+", default=None, help="class indices to sample (default: all classes, in turn)")
    a("--cfg", type=float, default=1.5, help="guidance scale; 1 = no guidance (the paper: 1.5 at 256 px)")
    a("--steps", type=int, default=50, help="DDIM / Euler steps")
    a("--seed", type=int, default=0, help="seeds the initial noise")
    a("--batch-size", type=int, default=250, help="samples per model call")
    a("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    a("--fid", action="store_true", help="FID, precision and recall of --out-dir against the training images")
    a("--fid-ref", default=None, help="reference image folder for --fid (default: the run's --data)")
    a("--vae", default=None, help="override the checkpoint's VAE, e.g. a local copy (default: the checkpoint's)")
    a("--device", default=None, help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not math.isfinite(args.cfg):
        fail(f"--cfg must be a number, got {args.cfg}")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.fid and not args.out_dir:
        fail("--fid needs --out-dir (and --n) to write the samples it measures")
    if args.fid:
        try:
            import torch_fidelity
        except ImportError:
            fail("--fid needs torch-fidelity: pip install torch-fidelity")
    if args.out_dir:  # where the output goes is checked before any sampling
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            fail(f"cannot create --out-dir {args.out_dir!r} ({e.strerror})")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out!r}: the folder {os.path.dirname(os.path.abspath(args.out))!r} does not exist")
    ckpt = load_checkpoint(args.ckpt)
    train_args, classes = ckpt["args"], ckpt["classes"]
    device = pick_device(args.device)
    model = build_model(ckpt["model_config"]).to(device).eval()
    model.load_state_dict(ckpt["model"] if args.no_ema else ckpt["ema"])
    if not all_finite(model):
        fail(f"{args.ckpt} holds non-finite weights ({'model' if args.no_ema else 'EMA'}): it cannot sample")
    vae = load_vae(args.vae or train_args["vae"], device)
    if vae.config.latent_channels != ckpt["latent_shape"][0]:
        fail(f"the VAE {args.vae or train_args['vae']!r} has {vae.config.latent_channels} latent channels, the "
             f"checkpoint was trained on {ckpt['latent_shape'][0]}: use the VAE it was trained with")
    K = len(classes)
    labels = args.classes if args.classes is not None else list(range(K))
    if any(not 0 <= c < K for c in labels):
        fail(f"--classes must be in 0..{K - 1} for this checkpoint ({', '.join(classes[:10])}, ...)")
    n = args.n or (min(8 * len(labels), 80) if args.out_dir is None else 1000)
    per_label = torch.tensor(labels).repeat_interleave(1 if args.out_dir else 8)  # grid: a row per class
    y_all = per_label.repeat(-(-n // len(per_label)))[:n]
    gen = torch.Generator().manual_seed(args.seed)
    images = []
    for i in tqdm(range(0, n, args.batch_size), desc=f"sampling ({train_args['paradigm']})"):
        y = y_all[i:i + args.batch_size].to(device)
        z = generate(model, train_args["paradigm"], y, K, tuple(ckpt["latent_shape"]), args.steps, args.cfg, gen)
        if not z.isfinite().all():
            fail(f"sampling gave non-finite latents at sample {i}: the model diverges under --cfg {args.cfg}")
        x = decode(vae, z).cpu()
        if args.out_dir:
            for j, img in enumerate(x):
                save_image(img, os.path.join(args.out_dir, f"{i + j:06d}.png"))
        else:
            images.append(x)
    if not args.out_dir:
        save_image(torch.cat(images), args.out, nrow=8)
        print(f"wrote {args.out}: {n} samples at step {ckpt['step']}, cfg {args.cfg}")
        return
    print(f"wrote {n} samples to {args.out_dir}")
    if args.fid:
        ref = args.fid_ref or (train_args["data"] if train_args["data"] != "cifar10" else "cifar10-train")
        m = torch_fidelity.calculate_metrics(input1=args.out_dir, input2=ref, fid=True, prc=True,
                                             samples_find_deep=True, cuda=device.type == "cuda", verbose=False)
        print(" ".join(f"{k}={v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
