"""Train a small class-conditional DiT on VAE latents, with or without the Latent Perceptual Loss.

The paper's protocol at toy scale: pre-train with the plain diffusion loss, then post-train from
that checkpoint with (--loss lpl) and without (--loss l2) LPL for the same number of steps, and
compare. The dataset is encoded once by the frozen VAE (both horizontal flips) and cached.

    python train.py --run-dir runs/pretrain                                   # 50k steps
    python train.py --run-dir runs/lpl --init-from runs/pretrain --steps 20000 --ema-decay 0.9995 --loss lpl
    torchrun --standalone --nproc_per_node 8 train.py ...     # DDP; --batch-size stays the global batch

The DiT, its schedules and the sampler are in model.py (with the time conventions); checkpoints and
run folders in checkpoints.py; the related methods (--loss rgb, self-perceptual, cas-dm, --reweight)
in comparisons.py.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import all_finite, load_checkpoint, lock_run_dir, make_run_dir, truncate_log
from cli import (DEVICE, POSITIVE, RANK, SEED, SHARE, WORLD, Float, HelpFormatter, Int, Parser, Path, atomic_path, barrier,
                 entry, fail, init_distributed, mean_over_ranks, pick_device, requires)
from comparisons import CasDM, SelfPerceptual, min_snr_weights, rgb_loss
from data import (atomic_save, cache_path, decode, encode_dataset, image_dataset, latent_geometry, load_vae,
                  looks_like_path)
from lpl import NORMALIZATIONS, LatentPerceptualLoss, lpl_mask, z0_from_prediction
from model import MODELS, build_model, ddpm_scheduler, drop_labels, generate, sample_t

# w_LPL. The paper's rule (Section 4.3, Fig. 9): w_LPL = 3 "roughly corresponds to a fifth of the relative
# contribution to the total loss". Its absolute scale does not carry over (it depends on the
# normalisation, the autoencoder, the paradigm's target and τ), so by default the trainer applies the
# rule itself: before the first step it measures L_Diff and L_LPL of the starting model on a few
# batches and sets w_LPL = L_Diff / (4 L_LPL), which makes w_LPL·L_LPL a fifth of L_tot.
LPL_SHARE = 1 / 5
LOSSES = ("l2", "lpl", "rgb", "self-perceptual", "cas-dm")
# Flags that --resume accepts beside the run's own: they change neither the maths nor the data.
RESUME_OVERRIDES = ("steps", "device", "log_every", "ckpt_every", "sample_every", "num_workers", "compile")


def build_parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", default="cifar10", type=Path("dir", words=["cifar10"]), help="'cifar10' (torchvision download), an image folder with one "
      "subfolder per class, or a folder of ImageNet 64x64 .npz batches")
    a("--data-root", default="data", type=Path("out-dir"), help="where --data cifar10 is downloaded")
    a("--images-per-class", type=Int(1), default=None, help="use only the first N images of each class "
      "(quick runs); default: all")
    a("--vae", default="stabilityai/sd-vae-ft-ema", type=Path("dir", hub=True), help="any autoencoder family of lpl.py (SD, FLUX.1/2, "
      "Qwen-Image, Wan, DC-AE, TAESD, VQ-GAN): a Hugging Face id (a pipeline's as org/repo/vae) or a "
      "save_pretrained folder")
    a("--image-size", type=Int(1, 4096), default=64, help="images are resized to this (64 -> 8x8 latents at f8)")
    a("--model", default="DiT-S/2", choices=MODELS, help="DiT size / patch size")
    a("--paradigm", default="eps", choices=["eps", "v", "flow"], help="what the model predicts (Table 1)")
    a("--steps", type=Int(1), default=None, help="total steps; default 50000, on --resume the run's own")
    a("--batch-size", type=Int(1, 65536), default=128, help="global batch size")
    a("--lr", type=Float(0, 1, lo_open=True), default=1e-4, help="AdamW learning rate, constant (DiT)")
    a("--seed", type=SEED, default=0, help="seeds the data order, the noise and the sample grids")
    a("--run-dir", default="runs/pretrain", type=Path("out-dir"), help="ckpt.pt, log.jsonl and sample grids go here")
    a("--device", default=None, type=DEVICE, help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu")
    a("--init-from", default=None, metavar="CKPT", type=Path("any"), help="start a new run from this checkpoint's weights "
      "(post-training); its model and paradigm are kept, and its --data, --vae and --image-size unless "
      "given. Default: from scratch")
    a("--resume", default=None, metavar="RUN_DIR", type=Path("dir"), help="continue RUN_DIR exactly where it stopped, "
      f"writing into RUN_DIR (default: a new run); only {', '.join('--' + f.replace('_', '-') for f in RESUME_OVERRIDES)} may change")
    a("--ema-decay", type=SHARE, default=0.9999, help="EMA decay, warmed up as min(decay, (1+n)/(10+n)) over the "
      "run's steps n. The default is DiT's, for pre-training; an EMA averages ~1/(1-decay) steps, so a post-training "
      "takes less: 0.9995 for 20,000 steps (the main job), 0.999 for the CPU runs (the paper finds 0.99975 best "
      "with LPL over its longer runs, Fig. 10)")
    a("--label-dropout", type=Float(0, 1, hi_open=True), default=0.1, help="share of samples trained with the null class "
      "(classifier-free guidance; DiT's 0.1)")
    a("--loss", default="l2", choices=LOSSES, help="l2: the diffusion loss alone; lpl: plus w_LPL x the "
      "Latent Perceptual Loss; rgb: plus --rgb-weight x the pixel MSE of the fully decoded ẑ0 and z0 on "
      "the samples under τ (the paper's Fig. 7 ablation); self-perceptual: Lin & Yang's objective alone, "
      "on a frozen copy of the --init-from model (the paper's Table 5); cas-dm: An et al.'s cascade, a second "
      "network ϕ refines the DiT's x0 and takes LPL (--cas-metric) with no gradient into the DiT")
    a("--lpl-weight", type=Float(0, 1e6, lo_open=True), default=None, help="w_LPL. Default: the paper's rule (Section 4.3), "
      "w_LPL·L_LPL = a fifth of the total loss, measured on the starting model over --lpl-calibration-batches "
      "batches before the first step and stored in the checkpoint (meant for post-training, the paper's use). "
      "Under --loss cas-dm: λ^metric, by the same rule a fifth of ϕ's loss")
    a("--lpl-weight-factor", type=Float(0, 1e6, lo_open=True), default=1.0, help="multiplies the one-fifth rule's "
      "w_LPL (0.5: half the rule's weight; Fig. 9 varies w); with --lpl-weight, give the weight itself")
    a("--lpl-calibration-batches", type=Int(1, 10000), default=10, help="batches that measure L_Diff and L_LPL for the "
      "default --lpl-weight (their own random draws: the run's batches are the same with any weight)")
    a("--lpl-tau", type=POSITIVE, default=4.0, help="τ on σ/α at 64x64 latents (the paper's 512 px at f8; "
      "3-6 is best, Fig. 6); scaled by the latents' √(h·w) / 64 (Section 4.1); also selects --loss rgb's samples")
    a("--lpl-blocks", type=Int(1, 64), default=None, help="decoder blocks tapped, the first N in decoding order "
      "(Fig. 7); default: all")
    a("--lpl-normalization", default="shared", choices=list(NORMALIZATIONS),
      help="shared: both feature maps standardised by the prediction's statistics (Section 3.2); separate: each by "
      "its own (Sec. 4.3); channel: each position's features over channels by the target's norm (the authors' code)")
    a("--lpl-detach-sigma", action=argparse.BooleanOptionalAction, default=True, help="treat the prediction's std "
      "σ̂ as a constant (no gradient through it; the loss's optimum is then unbiased, see lpl.layer_distance); "
      "--no-lpl-detach-sigma differentiates it")
    a("--lpl-layer-weights", default="pow2", choices=["pow2", "uniform"],
      help="ω_l = 2^-r_l (the paper's) or 1 (Sec. 4.3)")
    a("--lpl-no-outliers", action="store_true", help="turn off Algorithm 1's outlier mask")
    a("--lpl-grad-checkpointing", action="store_true", help="recompute decoder blocks in backward")
    a("--rgb-weight", type=Float(0, 1e6, lo_open=True), default=1.0, help="weight of the pixel MSE of --loss rgb (the paper gives "
      "none; log.jsonl's aux_share shows its share of the total)")
    a("--cas-metric", default="lpl", choices=["lpl", "none"], help="--loss cas-dm: the metric on ϕ's x'0 (LPIPS, "
      "the paper's, needs pretrained weights this offline project cannot load); none: Cas-DM's own losses alone")
    a("--cas-width", type=Int(1, 1024), default=32, help="--loss cas-dm: channels of ϕ's first level (a UNet2DModel of "
      "two levels, width and 2 x width)")
    a("--sp-layer", type=Int(1, 1000), default=None, help="--loss self-perceptual: the frozen DiT block whose output "
      "is compared (1 = first); default: the middle one (Lin & Yang's mid block)")
    a("--reweight", default="none", choices=["none", "min-snr"], help="per-sample weights on the diffusion "
      "loss: none (the paper's baseline) or min-SNR-γ (Hang et al.; the paper's Table 6)")
    a("--min-snr-gamma", type=POSITIVE, default=5.0, help="γ of --reweight min-snr (Hang et al.'s 5)")
    a("--compile", action="store_true", help="torch.compile the DiT (not the loss: its hooks break graphs)")
    a("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast of the training step on CUDA: bf16 "
      "(mixed precision; the loss and its statistics are computed in fp32 either way) or fp32. CPU and MPS "
      "runs train in fp32")
    a("--log-every", type=Int(1), default=100, help="steps per log.jsonl row, each the mean over those steps "
      "(a 200-step run gets two rows: lower it for short runs)")
    a("--ckpt-every", type=Int(1), default=None, help="steps per checkpoint (and one at the end); default: "
      "min(5000, steps / 10), so a kill loses at most a tenth of a short run")
    a("--sample-every", type=Int(1), default=5000, help="steps per sample grid (and one at the end)")
    a("--num-workers", type=Int(0, 256), default=0, help="data loader workers for the one-time encoding")
    return p


def get_args(argv=None):
    """The arguments, and the names of those given explicitly on the command line."""
    p = build_parser()
    args = p.parse_args(argv)
    q = copy.deepcopy(p)
    for action in q._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(q.parse_args(argv)))
    if args.steps is None and not args.resume:
        args.steps = 50_000
    check_args(args)
    if not args.resume:  # (a resumed run's own options come from its checkpoint, checked below)
        loss = "cas-dm --cas-metric none" if args.loss == "cas-dm" and args.cas_metric == "none" else args.loss
        requires(argparse.Namespace(**dict(vars(args), loss=loss)), explicit, REQUIRES)
        requires(args, explicit, REQUIRES_TOO)
    return args, explicit


def check_args(args):
    """What no option's type can check alone: the options against each other."""
    def need(ok, msg):
        if not ok:
            fail(msg)
    need(args.batch_size % WORLD == 0, f"--batch-size {args.batch_size} (the global batch) must be a multiple "
         f"of the {WORLD} ranks torchrun started")
    need(args.loss != "self-perceptual" or args.init_from or args.resume, "--loss self-perceptual needs "
         "--init-from CKPT: the pre-trained model is its frozen feature network (Lin & Yang)")
    need(not (args.init_from and args.resume), "--init-from starts a new run, --resume continues one: give one")
    need(args.lpl_weight is None or args.lpl_weight_factor == 1, f"--lpl-weight-factor scales the one-fifth rule's "
         f"w_LPL; with --lpl-weight {args.lpl_weight} give the weight you want (or drop --lpl-weight)")
    need(args.loss != "cas-dm" or WORLD == 1, "--loss cas-dm trains on one process: its ϕ is not wrapped for DDP; "
         "run it without torchrun")


# Options that act only with another option's value; given without it they would be ignored in silence.
REQUIRES = {
    **{k: ("loss", {"lpl", "cas-dm"}, "--loss lpl or cas-dm (--cas-metric lpl)") for k in (
        "lpl_weight", "lpl_weight_factor", "lpl_calibration_batches", "lpl_blocks", "lpl_normalization", "lpl_detach_sigma",
        "lpl_layer_weights", "lpl_no_outliers", "lpl_grad_checkpointing")},
    "lpl_tau": ("loss", {"lpl", "rgb", "cas-dm"}, "--loss lpl, rgb or cas-dm (--cas-metric lpl)"),
    **{k: ("loss", {"cas-dm", "cas-dm --cas-metric none"}, "--loss cas-dm") for k in ("cas_metric", "cas_width")},
    "rgb_weight": ("loss", {"rgb"}, "--loss rgb"),
    "sp_layer": ("loss", {"self-perceptual"}, "--loss self-perceptual"),
    "min_snr_gamma": ("reweight", {"min-snr"}, "--reweight min-snr"),
}
# ... and a second condition some of them have (the same rule, checked after REQUIRES)
REQUIRES_TOO = {
    "lpl_detach_sigma": ("lpl_normalization", {"shared"}, "--lpl-normalization shared (separate standardises each "
                         "map by its own statistics, with their gradients; channel divides by the target's norm)"),
}



# ------------------------------------------------------------------------------ training
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, explicit = get_args(argv)
    run_dir = args.resume or args.run_dir
    # One writer per run folder: the lock comes before any check and any work, so a second command on
    # the same folder stops here, before it could read a half-made state or replace a log.
    created = make_run_dir(run_dir) if RANK == 0 else False
    lock = lock_run_dir(run_dir) if RANK == 0 else None
    try:
        run(args, explicit)
    except KeyboardInterrupt:
        last = os.path.join(run_dir, "ckpt.pt")
        fail("interrupted; " + (f"the last checkpoint ({load_checkpoint(last)['step']} steps) is in {run_dir}: "
                                 f"continue with --resume {run_dir}" if os.path.exists(last) else "no checkpoint was written"))
    finally:
        if lock is not None:  # (not another process's lock)
            lock.close()
            os.remove(os.path.join(run_dir, ".lock"))
        if created and not os.path.exists(os.path.join(run_dir, "ckpt.pt")):  # leave nothing empty behind
            log = os.path.join(run_dir, "log.jsonl")
            if os.path.exists(log) and os.path.getsize(log) == 0:
                os.remove(log)
            if not os.listdir(run_dir):
                os.rmdir(run_dir)
        if WORLD > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, explicit):
    """Everything main() does under the run folder's lock: check, encode, train."""
    resume, init = None, None
    if args.resume:  # the run's own arguments; only RESUME_OVERRIDES may change, and it writes into RUN_DIR
        resume = load_checkpoint(os.path.join(args.resume, "ckpt.pt"))
        saved = dict(vars(build_parser().parse_args([])), **resume["args"])  # flags added since: defaults
        changed = sorted(k for k in explicit - {"resume", *RESUME_OVERRIDES}
                         if k in saved and getattr(args, k) != saved[k] and k != "run_dir")
        if "run_dir" in explicit and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
            changed.append("run_dir")
        if changed:
            fail(f"--resume continues {args.resume} with its own settings; "
                 f"{', '.join('--' + k.replace('_', '-') for k in changed)} would change them. Drop them, "
                 f"or start a new run from its weights with --init-from {os.path.join(args.resume, 'ckpt.pt')}")
        saved.update({k: getattr(args, k) for k in RESUME_OVERRIDES if k in explicit})
        saved.update(run_dir=args.resume, resume=args.resume)
        args = argparse.Namespace(**saved)
        if args.steps <= resume["step"]:
            fail(f"{args.resume} is already at step {resume['step']}: give --steps above that to continue")
        for k in ("data", "vae"):  # a resumed run trains on its own data through its own VAE, or not at all
            if (saved[k] != "cifar10" if k == "data" else looks_like_path(saved[k])) and not os.path.exists(os.path.expanduser(saved[k])):
                fail(f"{args.resume} was trained with --{k} {saved[k]!r}, which does not exist from {os.getcwd()}: "
                     f"a run resumes only on its own data and VAE; put them back there"
                     + ("" if os.path.isabs(saved[k]) else " (or resume from the folder the run was started in)"))
    elif args.init_from:  # model and paradigm come from the checkpoint
        if os.path.isdir(args.init_from):  # a run directory: its checkpoint
            args.init_from = os.path.join(args.init_from, "ckpt.pt")
        init = load_checkpoint(args.init_from)
        for name in ("model", "ema"):
            if not all(v.isfinite().all() for v in init[name].values() if v.is_floating_point()):
                fail(f"{args.init_from} holds non-finite {name} weights: start from an earlier checkpoint")
        args.init_step = init["step"] + init["args"].get("init_step", 0)  # where this run's steps start
        for k in ("model", "paradigm"):
            if k in explicit and getattr(args, k) != init["args"][k]:
                fail(f"--{k} {getattr(args, k)} does not match {args.init_from}'s {init['args'][k]}; drop --{k}")
            setattr(args, k, init["args"][k])
        for k in ("data", "data_root", "images_per_class", "vae", "image_size"):  # unless given: post-training
            if k not in explicit:  # continues on the pre-training's data, through its VAE
                setattr(args, k, init["args"][k])
        own = [f"--{k.replace('_', '-')} {getattr(args, k)}" + ("" if k in explicit else " (default)")
               for k in ("batch_size", "lr", "ema_decay") if getattr(args, k) != init["args"][k]]
        if own and RANK == 0:  # the optimisation settings are the new run's own: say where they differ
            print(f"from {args.init_from} (step {init['step']}): its model, paradigm, data and VAE; this run's "
                  + ", ".join(own) + " (the pre-training used " + ", ".join(
                      f"{init['args'][k]}" for k in ("batch_size", "lr", "ema_decay") if getattr(args, k) != init["args"][k]) + ")")
    if resume is None:  # local paths are stored absolute, so --resume from any folder finds the same files
        for k in ("data", "vae", "data_root"):
            if looks_like_path(getattr(args, k)) and os.path.exists(os.path.expanduser(getattr(args, k))):
                setattr(args, k, os.path.abspath(os.path.expanduser(getattr(args, k))))
    device = init_distributed(pick_device(args.device))

    # Everything that can be checked is checked before the encoding and the training.
    run_dir = args.run_dir
    if args.loss == "cas-dm" and args.paradigm == "flow":
        fail("--loss cas-dm trains ϕ's mixing weight on the DDPM posterior mean (Cas-DM's Eq. 7, 12), which a flow "
             "model has not: use a --paradigm eps or v model" + (f" (--init-from {args.init_from} is flow)" if init else ""))
    if resume is None and os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        fail(f"{run_dir} already holds a run (ckpt.pt): continue it with --resume {run_dir}, "
             f"or pick another --run-dir")
    vae = load_vae(args.vae, device)
    channels, factor = latent_geometry(vae)
    patch = MODELS[args.model]["patch_size"]
    if args.image_size % (factor * patch):
        fail(f"--image-size {args.image_size} must be a multiple of {factor * patch}: the VAE downsamples by "
             f"{factor} and {args.model} cuts the latent into {patch}x{patch} patches")
    latent_shape = (channels, args.image_size // factor, args.image_size // factor)
    lpl = None
    if args.loss == "lpl" or (args.loss == "cas-dm" and args.cas_metric == "lpl"):  # the frozen VAE, reused
        try:
            lpl = LatentPerceptualLoss(vae, num_blocks=args.lpl_blocks, normalization=args.lpl_normalization,
                                       detach_sigma=args.lpl_detach_sigma, layer_weights=args.lpl_layer_weights,
                                       outliers=not args.lpl_no_outliers,
                                       grad_checkpointing=args.lpl_grad_checkpointing)
        except ValueError as e:
            fail(f"--lpl-blocks: {e}" if "num_blocks" in str(e) else f"the LPL loss cannot use --vae {args.vae}: {e}")
    if args.loss == "self-perceptual":  # the frozen network is the --init-from model
        depth = (init or resume)["model_config"]["num_layers"]
        args.sp_layer = args.sp_layer or (depth + 1) // 2
        if not 1 <= args.sp_layer <= depth:
            fail(f"--sp-layer must be in 1..{depth} for this {args.model}, got {args.sp_layer}")
    ds, classes, files = image_dataset(args)
    num_classes = len(classes)
    source = init or resume
    if source is not None:
        what = args.init_from or args.resume
        # A post-training may change the resolution (the paper post-trains 512 px models from 256 px ones,
        # Table 2): DiT's positional embedding is a fixed sin-cos table over patch positions, so every
        # learned weight carries over. Channels must match, and a resumed run keeps its own size.
        resized = init is not None and source["latent_shape"][0] == latent_shape[0]
        if tuple(source["latent_shape"]) != latent_shape and not resized:
            fail(f"{what} was trained on latents {tuple(source['latent_shape'])}, but --vae {args.vae} at "
                 f"--image-size {args.image_size} gives {latent_shape}: use the same VAE"
                 + ("" if init is not None else " and image size"))
        if tuple(source["latent_shape"]) != latent_shape and RANK == 0:
            print(f"post-training at latents {latent_shape} from {what}'s {tuple(source['latent_shape'])}: every weight "
                  f"carries over, τ scales by the latent width / 64 ({latent_shape[-1] / 64:g})")
        if len(source["classes"]) != num_classes:
            fail(f"{what} was trained on {len(source['classes'])} classes, --data {args.data} has {num_classes}")
    trained_on = (resume or {}).get("args", {}).get("latent_cache")
    cache = cache_path(args, vae, files, known=trained_on or (init or {}).get("args", {}).get("latent_cache"))
    if trained_on and os.path.basename(trained_on) != os.path.basename(cache):
        fail(f"the data or VAE at --data {args.data} / --vae {args.vae} are not those {args.resume} was trained on "
             f"(files, sizes or dates changed: their latents would be {os.path.basename(cache)}, the run's are "
             f"{os.path.basename(trained_on)}); a run resumes only on its own data")
    args.latent_cache = cache  # saved with the run's arguments: what it was trained on
    if not os.access(os.path.dirname(cache), os.W_OK):  # the run directory's parent
        fail(f"cannot write the latent cache into {os.path.dirname(cache)}; pick a --run-dir in a writable folder")
    train(args, device, vae, lpl, ds, classes, cache, latent_shape, resume, init)


def train(args, device, vae, lpl, ds, classes, cache, latent_shape, resume, init):
    """Encode the dataset once (rank 0 first, the others then read its cache), then train."""
    if RANK != 0:
        barrier()
    data = encode_dataset(args, vae, device, ds, classes, cache, latent_shape)
    if RANK == 0:
        barrier()
    Run(args, device, vae, lpl, data, classes, cache, latent_shape, resume, init).fit()


def _probe_loss(vae):
    """LPL with its defaults, to read (an autoencoder it cannot read gives no probe, not an error)."""
    try:
        return LatentPerceptualLoss(vae)
    except ValueError:
        return None


class Run:
    """One training run: everything a step needs, set up once (__init__); the parts of a step as
    methods (draw, losses, measure, update_ema); the loop itself in fit()."""

    def __init__(self, args, device, vae, lpl, data, classes, cache, latent_shape, resume, init):
        self.args, self.device, self.vae, self.lpl, self.cache = args, device, vae, lpl, cache
        # L_LPL of the DiT's ẑ0 at log steps, without gradient, in a run that does not train on it (the
        # run's τ and LPL settings), so that what LPL does to its own loss is measured in both arms
        self.probe = lpl if lpl is not None or args.loss == "lpl" else _probe_loss(vae)
        self.classes, self.latent_shape, self.resume, self.init = classes, latent_shape, resume, init
        self.z_all, self.y_all = data["z"].to(device), data["y"].to(device)  # on the device once, not per batch
        self.N, self.num_classes = len(self.z_all), len(classes)
        if self.N < args.batch_size:
            fail(f"the dataset has {self.N} latents (images x 2 flips), fewer than --batch-size {args.batch_size}")
        torch.manual_seed(args.seed)  # after encoding, so the stream does not depend on the cache existing
        self.model_cfg = dict(MODELS[args.model], in_channels=latent_shape[0], out_channels=latent_shape[0],
                              sample_size=latent_shape[-1], num_embeds_ada_norm=self.num_classes)
        source = resume or init
        if source is not None:  # (at the new latent width, for a post-training that changes the resolution)
            self.model_cfg = dict(source["model_config"], sample_size=latent_shape[-1])
        self.model = build_model(self.model_cfg).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.sched = None if args.paradigm == "flow" else ddpm_scheduler(args.paradigm)
        self.cas = None  # Cas-DM's ϕ: new on --init-from, restored on --resume; one optimizer for θ and ϕ
        if args.loss == "cas-dm":
            with torch.random.fork_rng(devices=[]):  # ϕ's init from a stream of its own: the run's t, ε and labels stay l2's
                torch.manual_seed(args.seed)
                self.cas = (CasDM.from_state(resume["cas"], latent_shape, args.paradigm, self.sched) if resume is not None
                            else CasDM(latent_shape, args.paradigm, self.sched, width=args.cas_width)).to(device)
        self.opt = torch.optim.AdamW([*self.model.parameters(), *(self.cas.phi.parameters() if self.cas else [])],
                                     lr=args.lr, weight_decay=0)
        self.step, self.last_ckpt = 0, None
        if source is not None:
            self.model.load_state_dict(source["model"]), self.ema.load_state_dict(source["ema"])
        if resume is not None:  # --init-from starts afresh; --resume restores everything
            self.opt.load_state_dict(resume["opt"])
            self.step = self.last_ckpt = resume["step"]
            torch.set_rng_state(resume["rng"]["cpu"])
            if device.type == "cuda" and resume["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(resume["rng"]["cuda"])
        self.sp = None  # Self-Perceptual's network: frozen at the --init-from weights, kept in the checkpoint
        if args.loss == "self-perceptual":
            self.sp = SelfPerceptual(self.model, args.sp_layer, args.paradigm, self.sched)
            if resume is not None:
                self.sp.net.load_state_dict(resume["sp_net"])
        # Section 4.1: τ scales with resolution. 64 = the latent width of the paper's 512 px images with
        # its f8 VAE; we scale by the latent grid, on which the noise acts, so an f4 VAE at 32 px (8x8
        # latents) gets the τ of an f8 VAE at 64 px.
        self.res_scale = math.sqrt(latent_shape[-2] * latent_shape[-1]) / 64  # (the width: square latents)
        self.fwd = self.model
        if WORLD > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.fwd = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.fwd = torch.compile(self.fwd) if args.compile else self.fwd
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.dtype == "bf16")
        self.ckpt_path, self.log_path = os.path.join(args.run_dir, "ckpt.pt"), os.path.join(args.run_dir, "log.jsonl")
        self.epoch_order = functools.lru_cache(maxsize=1)(self._epoch_order)
        self.say = print if RANK == 0 else (lambda *a: None)

    # ------------------------------------------------------------------ the batch of a step
    def _epoch_order(self, epoch):  # one permutation per epoch, seeded by it: data order depends on the step only
        return torch.randperm(self.N, generator=torch.Generator().manual_seed(self.args.seed * 1000 + epoch)).to(self.device)

    def batch_indices(self, step):  # exact on --resume
        per_epoch = self.N // self.args.batch_size
        i = step % per_epoch
        return self.epoch_order(step // per_epoch)[i * self.args.batch_size:(i + 1) * self.args.batch_size]

    def draw(self, step, gen=None):
        """The batch of `step` (exact on --resume), or with `gen` a batch of its own random draws:
        z0, y (labels dropped), α, σ, the model's t, ε, and Self-Perceptual's t', this rank's slice."""
        args, device = self.args, self.device
        idx = self.batch_indices(step) if gen is None else torch.randint(0, self.N, (args.batch_size,), generator=gen).to(device)
        z0, y = self.z_all[idx].float(), self.y_all[idx]
        with torch.random.fork_rng([device] if device.type == "cuda" else []) if gen is not None else contextlib.nullcontext():
            if gen is not None:  # the run's own random stream is left as it was
                torch.manual_seed(int(torch.randint(2 ** 62, (), generator=gen)))
            y = drop_labels(y, self.num_classes, args.label_dropout)
            alpha, sigma, t_model = sample_t(args.paradigm, len(z0), device, self.sched)
            eps = torch.randn_like(z0)
            t2 = ()
            if self.sp is not None:  # Self-Perceptual's t', from a stream of its own (the run's t and ε stay l2's)
                own = gen if gen is not None else torch.Generator().manual_seed((args.seed << 32) + step)
                t2 = self.sp.draw(len(z0), device, own)
        if WORLD > 1:  # this rank's slice of the global batch
            k = len(z0) // WORLD
            z0, y, alpha, sigma, t_model, eps, *t2 = (v[RANK * k:(RANK + 1) * k]
                                                      for v in (z0, y, alpha, sigma, t_model, eps, *t2))
        return z0, y, alpha, sigma, t_model, eps, tuple(t2)

    # ------------------------------------------------------------------ the losses of a step
    def losses(self, z0, y, alpha, sigma, t_model, eps, t2, probe=False):
        """L_Diff, the added term (LPL, RGB or Self-Perceptual; 0 for l2), LPL's selection mask δ (None
        when the loss has none) and the terms added unweighted (Cas-DM's ϕ: L^x0, L^μ) of one batch;
        with probe, also E_batch[δ·L_LPL] of the DiT's ẑ0 (no gradient; the loss itself in an LPL run)."""
        args, lpl, cas = self.args, self.lpl, self.cas
        B = len(z0)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        z_t = a * z0 + s * eps
        target = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[args.paradigm]
        with self.amp:
            out = self.fwd(z_t, timestep=t_model, class_labels=y).sample.float()
            if args.reweight == "min-snr":  # Table 6's alternative: per-sample weights on the diffusion loss
                w_t = min_snr_weights(alpha, sigma, args.paradigm, args.min_snr_gamma)  # (B,)
                loss_diff = (w_t * (out - target).square().flatten(1).mean(1)).mean()
            else:
                loss_diff = F.mse_loss(out, target)
            loss_aux, m, extra = torch.zeros((), device=self.device), None, {}  # the added term: LPL, or rgb / SP
            if cas is not None:  # ϕ's losses on θ's detached x0* (Cas-DM's Eq. 12); θ keeps L_Diff alone
                loss_x0, loss_mu, x0_prime, _ = cas.losses(out, z_t, z0, alpha, sigma, t_model)
                extra = dict(loss_x0=loss_x0, loss_mu=loss_mu)
            if args.loss in ("lpl", "rgb") or (cas is not None and lpl is not None):
                m = lpl_mask(alpha, sigma, args.lpl_tau, self.res_scale)  # (B,) bool
                if m.any():  # (a sync, to skip decoding) E[δ·L]: the selected samples' losses, summed, / B
                    z0_hat = (x0_prime[m] if cas is not None else  # LPL on ϕ's x'0 under Cas-DM, else θ's ẑ0
                              z0_from_prediction(out[m], z_t[m], alpha[m], sigma[m], args.paradigm))
                    per_sample = lpl(z0_hat, z0[m]) if lpl is not None else rgb_loss(self.vae, z0_hat, z0[m])
                    loss_aux = per_sample.sum() / B
            if self.sp is not None:  # Lin & Yang train with their objective alone
                loss_aux = self.sp(out, z_t, z0, eps, alpha, sigma, y, t2).mean()
            probed = None
            if probe and args.loss == "lpl":
                probed = loss_aux.detach()
            elif probe and self.probe is not None:  # what LPL would be, on this batch: read, never trained
                with torch.no_grad():
                    mp = lpl_mask(alpha, sigma, args.lpl_tau, self.res_scale)  # (B,) bool
                    probed = (self.probe(z0_from_prediction(out[mp], z_t[mp], alpha[mp], sigma[mp], args.paradigm),
                                         z0[mp]).sum() / B if mp.any() else torch.zeros((), device=self.device))
        return loss_diff, loss_aux, m, extra, probed

    def calibrate_lpl_weight(self):
        """The one-fifth rule, measured (Section 4.3): w_LPL·L_LPL = a fifth of L_Diff + w_LPL·L_LPL on
        the starting model, over batches of their own draws (the run's batches are the same with any w)."""
        args = self.args
        gen = torch.Generator().manual_seed(args.seed + 1_000_003)
        self.model.eval()
        with torch.no_grad():  # the rule's reference: L_Diff, or under Cas-DM ϕ's own loss L^x0 + L^μ
            sums = sum(torch.stack([sum(out[3].values()) if self.cas else out[0], out[1]])
                       for out in (self.losses(*self.draw(0, gen)) for _ in range(args.lpl_calibration_batches)))
        l_diff, l_lpl = mean_over_ranks(sums).tolist()
        if not l_lpl > 0:
            fail(f"no sample fell under --lpl-tau {args.lpl_tau} in {args.lpl_calibration_batches} calibration "
                 f"batches, so the one-fifth rule cannot set w_LPL: raise --lpl-tau or give --lpl-weight")
        rule = LPL_SHARE / (1 - LPL_SHARE) * l_diff / l_lpl  # w·L_LPL / (L_Diff + w·L_LPL) = 1/5
        args.lpl_weight = rule * args.lpl_weight_factor
        self.say(f"w_LPL = {args.lpl_weight:.4g} by the one-fifth rule"
                 + (f" ({rule:.4g}) x --lpl-weight-factor {args.lpl_weight_factor:g}" if args.lpl_weight_factor != 1 else "")
                 + f": {'L^x0 + L^μ' if self.cas else 'L_Diff'} "
                 f"{l_diff / args.lpl_calibration_batches:.4g}, L_LPL {l_lpl / args.lpl_calibration_batches:.4g} on "
                 f"{args.lpl_calibration_batches} batches of the starting model")

    def describe(self):
        args, cas, lpl = self.args, self.cas, self.lpl
        self.say(f"{args.model}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters, {self.N} "
                 f"latents {self.latent_shape} from {self.cache}, {args.paradigm}, loss {args.loss}"
                 + (f" (w_LPL {args.lpl_weight:.4g}, τ {args.lpl_tau})" if lpl and not cas else "")
                 + (f" (weight {args.rgb_weight}, τ {args.lpl_tau})" if args.loss == "rgb" else "")
                 + (f" (frozen block {args.sp_layer})" if self.sp else "")
                 + (f" (ϕ: UNet2DModel {cas.config['block_out_channels']}, {sum(p.numel() for p in cas.phi.parameters()) / 1e6:.2f}M "
                    f"parameters; metric {args.cas_metric}" + (f", w {args.lpl_weight:.4g}, τ {args.lpl_tau})" if lpl else ")") if cas else "")
                 + (f", min-SNR-{args.min_snr_gamma:g} weights" if args.reweight == "min-snr" else "") + f", device {self.device}"
                 + (f", resumed at step {self.step}" if self.resume else f", from {args.init_from}" if self.init else "")
                 + (f", {WORLD} ranks x {args.batch_size // WORLD} samples" if WORLD > 1 else ""))

    def lpl_gradient(self, loss_lpl):
        """|∇L_LPL| / |∇L_Diff| and their cosine over the DiT's parameters, at a log step: one more
        backward, of L_LPL alone (the step's graph is kept for it); ∇L_Diff is the step's gradient less
        w·∇L_LPL, so the step itself, and its gradient, are what they are without the measurement. Its
        cost, measured (30-step runs logging every step or once; DiT-XS/2, batch 128, the f4 decoder, one
        AMD EPYC thread): +1.1 s on a 1.6 s step, 1.3% of a run at --log-every 50 (an l2 run's
        lpl_probe: +0.3 s on 1.2 s, 0.5%)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        # (no sample under τ on this rank: L_LPL is a constant 0; every rank still joins the mean)
        g = torch.autograd.grad(loss_lpl, params, allow_unused=True) if loss_lpl.requires_grad else [None] * len(params)
        g_lpl = mean_over_ranks(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                           for gi, p in zip(g, params)]))  # (P,): the global batch's
        g_diff = torch.cat([p.grad.flatten() for p in params]) - self.aux_weight * g_lpl  # (P,)
        return dict(lpl_grad_ratio=(g_lpl.norm() / g_diff.norm()).item(),
                    lpl_grad_cos=F.cosine_similarity(g_lpl, g_diff, dim=0).item())

    # ------------------------------------------------------------------ after the backward pass
    def measure(self, loss_diff, loss_aux, m, extra):
        """The global batch's L_Diff, added term, share under τ, gradient norm (θ's) and Cas-DM's ϕ
        terms, in one sync; a non-finite value stops the run before the update, keeping the last checkpoint."""
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None]))
        frac = m.float().mean() if m is not None else torch.zeros((), device=self.device)
        stats = mean_over_ranks(torch.stack([loss_diff, loss_aux, frac, gnorm, *extra.values()]).detach()).tolist()
        if not math.isfinite(sum(stats)):
            fail(f"the loss or its gradient is not finite at step {self.step + 1}; stopped before the update, " + (
                f"the checkpoint of step {self.last_ckpt} in {self.args.run_dir} is kept" if self.last_ckpt else
                "no checkpoint was written") + " (try a lower --lr or --lpl-weight)")
        return stats

    def update_ema(self):
        """EMA with a warm-up, min(decay, (1+n)/(10+n)) (diffusers' EMAModel from its second update on),
        so the run's first steps do not anchor the average to its starting point. For a post-training run
        that is the pre-trained model, which a plain 0.9999 EMA would still hold at 0.9999^20000 = 13.5%
        after 20k steps."""
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if self.cas is not None:  # ϕ's EMA alike: samples use both averages
            self.cas.update_ema(decay)
        return decay

    # ------------------------------------------------------------------ what a run writes
    def save(self):
        """The checkpoint, whole (atomic) and self-describing; never over a finite one with non-finite weights."""
        cas, sp = self.cas, self.sp
        if not all(all_finite(m) for m in (self.model, self.ema, *((cas.phi, cas.ema) if cas else ()))):
            fail(f"the weights are not finite at step {self.step}; nothing was saved, " + (
                f"the checkpoint of step {self.last_ckpt} is kept" if self.last_ckpt else "no checkpoint was written")
                + " (try a lower --lr or --lpl-weight)")
        if RANK == 0:  # the ranks hold the same weights, EMA, optimizer and random state
            atomic_save(dict(args=vars(self.args), model_config=self.model_cfg, step=self.step, model=self.model.state_dict(),
                             ema=self.ema.state_dict(), opt=self.opt.state_dict(), classes=self.classes,
                             latent_shape=self.latent_shape, rng=dict(cpu=torch.get_rng_state(), cuda=(
                                 torch.cuda.get_rng_state() if self.device.type == "cuda" else None)),
                             **(dict(sp_net=sp.net.state_dict()) if sp else {}),
                             **(dict(cas=cas.state_dict()) if cas else {})), self.ckpt_path)
        self.last_ckpt = self.step

    def write_log(self, log, acc, decay, dt, measured):
        """One log.jsonl row: the means over the steps since the last row, and what was measured on
        the row's own step (measured: lpl_probe, and in an LPL run its gradient against L_Diff's)."""
        k, names = acc["n"], self.extra_names
        row = {"step": self.step, "loss_diff": acc["diff"] / k}
        if self.aux_name:  # the added term under its own name (for self-perceptual, the one optimised)
            row[self.aux_name] = acc["aux"] / k
        row.update({name: acc[name] / k for name in names})
        if self.aux_weight:  # w·L / L_tot: the paper's rule puts LPL's at 1/5 (Cas-DM: of ϕ's loss)
            w_aux = self.aux_weight * acc["aux"] / k
            ref = sum(acc[name] for name in names) / k if self.cas else acc["diff"] / k
            lpl = self.lpl is not None
            row.update({"lpl_share" if lpl else "aux_share": w_aux / (ref + w_aux), "lpl_frac": acc["frac"] / k,
                        "lpl_weight" if lpl else "rgb_weight": self.aux_weight})
        row.update(measured)
        row.update(grad_norm=acc["gnorm"] / k, s_per_step=dt / k, lr=self.args.lr, ema_decay=decay)
        log.write(json.dumps(row) + "\n"), log.flush()

    def save_grid(self):
        from torchvision.utils import save_image
        grid = os.path.join(self.args.run_dir, f"samples-{self.step:07d}.png")
        tqdm.write(f"sampling a grid of the EMA model (50 steps) to {grid}")
        y_s = torch.arange(self.num_classes, device=self.device).repeat_interleave(8)[:80]
        zs = generate(self.ema.eval(), self.args.paradigm, y_s, self.num_classes, self.latent_shape,
                      generator=torch.Generator().manual_seed(self.args.seed), cas=self.cas)
        with atomic_path(grid) as tmp:
            save_image(decode(self.vae, zs), tmp, nrow=8)

    # ------------------------------------------------------------------ the loop
    def fit(self):
        args, lpl = self.args, self.lpl
        if lpl is not None and args.lpl_weight is None:
            self.calibrate_lpl_weight()
        self.aux_weight = {"lpl": args.lpl_weight, "rgb": args.rgb_weight, "cas-dm": args.lpl_weight if lpl else 0.0}.get(args.loss, 0.0)
        self.aux_name = {"lpl": "loss_lpl", "rgb": "loss_rgb", "self-perceptual": "loss_sp",
                         "cas-dm": "loss_lpl" if lpl else None}.get(args.loss)  # None: l2
        self.extra_names = ("loss_x0", "loss_mu") if self.cas else ()  # Cas-DM's ϕ terms, logged under their names
        self.describe()
        if self.resume is not None and RANK == 0:
            truncate_log(self.log_path, self.step)
        log = open(self.log_path, "a" if self.resume is not None else "w") if RANK == 0 else None
        ckpt_every = args.ckpt_every or max(1, min(5000, args.steps // 10))  # (None: of this run's --steps)
        bar = tqdm(total=args.steps, initial=self.step, desc="train", **({"disable": True} if RANK else {}))  # (TQDM_DISABLE=1 works)
        new_acc = lambda: dict(diff=0.0, aux=0.0, frac=0.0, gnorm=0.0, n=0, **dict.fromkeys(self.extra_names, 0.0))  # noqa: E731
        acc, t0 = new_acc(), time.time()
        self.model.train()
        while self.step < args.steps:  # one step: L_tot = L_Diff + w·L_LPL (Section 3.2), or a comparison's loss
            at_log = (self.step + 1) % args.log_every == 0 or self.step + 1 == args.steps
            loss_diff, loss_aux, m, extra, probed = self.losses(*self.draw(self.step), probe=at_log)
            loss = loss_aux if self.sp is not None else loss_diff + sum(extra.values()) + self.aux_weight * loss_aux
            self.opt.zero_grad(set_to_none=True)
            split = at_log and args.loss == "lpl"
            loss.backward(retain_graph=split)  # (Cas-DM: θ's and ϕ's graphs are apart, so one backward gives each its own loss's gradient)
            l_diff, l_aux, frac, gnorm, *l_extra = self.measure(loss_diff, loss_aux, m, extra)
            measured = {}
            if at_log:
                if probed is not None:
                    measured["lpl_probe"] = mean_over_ranks(probed.detach().reshape(1)).item()
                if split:
                    measured.update(self.lpl_gradient(loss_aux))
            self.opt.step()
            decay = self.update_ema()
            self.step += 1
            for k, v in (("diff", l_diff), ("aux", l_aux), ("frac", frac), ("gnorm", gnorm), ("n", 1),
                         *zip(self.extra_names, l_extra)):
                acc[k] += v
            bar.update(1)
            bar.set_postfix(L_diff=f"{l_diff:.4f}", **({self.aux_name.replace("loss_", "L_"): f"{l_aux:.4f}"} if self.aux_name else {}))
            if self.step % args.log_every == 0 or self.step == args.steps:
                if log is not None:
                    self.write_log(log, acc, decay, time.time() - t0, measured)
                acc, t0 = new_acc(), time.time()
            if self.step % ckpt_every == 0 or self.step == args.steps:
                if self.step == args.steps and RANK == 0:
                    tqdm.write(f"saving the checkpoint of step {self.step} to {self.ckpt_path}")
                self.save()
            if (self.step % args.sample_every == 0 or self.step == args.steps) and RANK == 0:
                self.save_grid()
        bar.close()
        if log is not None:
            log.close()
        self.say(f"done: {self.step} steps, checkpoint {self.ckpt_path}")


if __name__ == "__main__":
    entry(main)
