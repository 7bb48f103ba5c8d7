"""The numbers of the results, and their command line: FID (fid.py: the network of the original
FID code, offline), the power spectrum, tables over training seeds, the decoder-feature scale of a
model's estimates, and the σ̂ bias on a real decoder; the figures are drawn by figures.py.

The spectrum (the paper's Fig. 4/5): the radially averaged power spectrum of images, compared
with real ones by the mean |log ratio| over frequencies. It needs no network.

    python metrics.py fid FOLDER_A FOLDER_B            # FID between two image folders (or .npz stats)
    python metrics.py stats FOLDER ref.npz             # a folder's FID statistics, computed once (--resume: continue)
    python metrics.py spectrum FOLDER_A FOLDER_B --plot spectrum.png
    python metrics.py diff grid-l2.png grid-lpl.png --out diff.png   # grids from the same noise, and b - a
    python metrics.py curves runs/lpl/log.jsonl [runs/base/log.jsonl ...] --out curves.png
    python metrics.py table runs/p17/post-*-s*/ --baseline post-l2   # mean ± std over training seeds
    python metrics.py inflation data/cifar10-png/test runs/l2/ckpt.pt runs/lpl/ckpt.pt   # ẑ0's scale under τ
    python metrics.py denoise runs/l2/ckpt.pt runs/lpl/ckpt.pt --n 2000     # one-step ẑ0 of test images, per σ/α
    python metrics.py table runs/*-s*/ --baseline l2 --denoise              # ... paired by seed and level
    python metrics.py outliers data/cifar10-png/test --index 7 --vae VAE --out outliers.png   # Fig. 13
"""
import argparse
import json
import math
import os
import shutil

import numpy as np
import torch

from cli import atomic_path, entry, fail
from fid import (IMAGE_EXTENSIONS, InceptionFeatures, features_of_files, frechet_distance, gaussian_stats,
                 image_files, kept_features, load_stats, read_images, stats_settings, subset)
from figures import difference_image, outlier_maps, plot_curves, plot_denoise, plot_seeds, plot_spectra



# ------------------------------------------------------------------------------ FID statistics
STATS_BATCH = 100  # images per batch of the FID network (a continued call keeps the same batches)


def write_stats(folder, out, n, seed, device, resume):
    """`metrics.py stats`: the FID statistics of n images of a folder (all: None), with what they were
    computed from. The features are kept as they come (fid.kept_features), so an interrupted call
    continues with resume; a finished OUT of the same settings is kept as it is."""
    files = subset(image_files(folder), n, seed)
    size = tuple(next(read_images(files[:1])).shape[-2:])  # the images' size: compared with samples
    settings = stats_settings(files, device, STATS_BATCH)  # (before the network is loaded: a finished OUT needs none)
    keep = out[:-len(".npz")] + ".features"
    if os.path.exists(out):  # (with resume only: main refuses it otherwise)
        try:
            with np.load(out) as f:
                old = json.loads(str(f["settings"])) if "settings" in f.files else None
        except Exception:  # (not an .npz of this script's)
            old = None
        if old != settings:
            fail(f"{out} exists and holds the statistics of {'other images or settings' if old else 'an unrecorded call'}: "
                 f"remove it or pick another name")
        shutil.rmtree(keep, ignore_errors=True)  # (a kill between the last write and this clean-up leaves it)
        print(f"{out} already holds these statistics")
        return
    extractor = InceptionFeatures(device=device)
    feats = kept_features(files, extractor, keep, settings, resume, desc=f"FID features of {folder}")
    mu, sigma = gaussian_stats(feats)
    with atomic_path(out) as tmp:  # a killed run leaves no half-written statistics
        np.savez(tmp, mu=mu, sigma=sigma, size=np.array(size), settings=json.dumps(settings))
    shutil.rmtree(keep)
    print(f"wrote {out}")


# ------------------------------------------------------------------------------ spectrum
def radial_power_spectrum(x):
    """Images (B, C, H, W), any range -> (min(H, W)//2,) mean power per integer radial frequency
    (the DC term excluded), averaged over images and channels. Each image is centred first, so the
    mean colour does not leak into the low frequencies."""
    x = x.double()
    x = x - x.mean((-2, -1), keepdim=True)
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x, norm="ortho").abs().square().mean((0, 1))  # (H, W)
    fy, fx = torch.fft.fftfreq(H, 1 / H), torch.fft.fftfreq(W, 1 / W)
    r = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt().round().long()  # (H, W): radius in cycles per image
    n = min(H, W) // 2
    keep = (r >= 1) & (r <= n)
    total = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, r[keep], power[keep])
    count = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, r[keep], torch.ones_like(power[keep]))
    return (total / count)[1:]  # radii 1..n


def spectrum_error(p_gen, p_ref):
    """Mean |log(P_gen / P_ref)| over frequencies: 0 when the spectra match, log 2 ≈ 0.69 when one
    has twice (or half) the other's power at every frequency."""
    if p_gen.shape != p_ref.shape:
        fail(f"spectra of images of different sizes ({len(p_gen)} and {len(p_ref)} frequencies) cannot be "
             f"compared: use images of one size")
    return float((p_gen.log() - p_ref.log()).abs().mean())


def folder_spectrum(folder, n=None, seed=0):
    files = subset(image_files(folder), n, seed)
    size = tuple(next(read_images(files[:1])).shape[-2:])
    if min(size) < 2:  # the spectrum of a 1-pixel image has no frequency: a mean over nothing, NaN
        fail(f"the images of {folder!r} are {size[0]}x{size[1]}: the power spectrum needs at least 2x2 pixels")
    total, n = 0, 0
    for x in read_images(files):
        total, n = total + radial_power_spectrum(x.double() / 255) * len(x), n + len(x)
    return total / n


# ------------------------------------------------------------------------------ loss curves
def read_log(path):
    import json
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} as a train.py log.jsonl ({type(e).__name__})")


def run_start(ckpt_path):
    """The step a run's own steps count from: the --init-from checkpoint's step (0 for a run from
    scratch, or when the checkpoint cannot be read)."""
    try:
        return int(torch.load(ckpt_path, map_location="cpu", weights_only=False)["args"].get("init_step", 0))
    except Exception:
        return 0


def inflation(model, paradigm, lpl, z0, y, tau, resolution_scale, seed=0, refine=None):
    """How much larger a trained model's clean-latent estimates are than z0 where LPL acts
    (σ_t/α_t ≤ τ, at training's time distribution): (slope, feature ratio). slope: the regression
    of ẑ0 on z0, Σ ẑ0·z0 / Σ z0·z0. feature ratio: σ(ϕ̂)/σ(ϕ), each decoder feature map's spatial
    std, the geometric mean over samples, channels and layers; the gradient through σ̂ rewards
    raising it (README, Differences). An estimate near the conditional mean shrinks towards the
    mean where z0 is uncertain, so both sit below 1: compare models on one z0, y, t and noise.
    refine(ẑ0, t) -> the estimate to measure instead (a Cas-DM run: ϕ's x'0, on which its LPL acts)."""
    from lpl import lpl_mask, z0_from_prediction
    from model import ddpm_scheduler, sample_t
    n = len(z0)
    with torch.random.fork_rng():  # the times and noise: the same for every model measured
        torch.manual_seed(seed)
        alpha, sigma, t_model = sample_t(paradigm, 50 * n, "cpu", None if paradigm == "flow" else ddpm_scheduler(paradigm))
        keep = lpl_mask(alpha, sigma, tau, resolution_scale).nonzero().squeeze(1)[:n]  # LPL's samples
        if len(keep) < n:
            fail(f"only {len(keep)} of {50 * n} draws of t fall under the run's τ {tau}: lower --n to {len(keep)}")
        alpha, sigma, t_model = alpha[keep], sigma[keep], t_model[keep]  # (n,) each
        eps = torch.randn_like(z0)  # (n, C, h, w)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        z_t = a * z0 + s * eps
        out = model(z_t, timestep=t_model, class_labels=y).sample.float()
        z0_hat = z0_from_prediction(out, z_t, alpha, sigma, paradigm)  # (n, C, h, w)
        if refine is not None:
            z0_hat = refine(z0_hat, t_model)  # (n, C, h, w)
        slope = float((z0_hat * z0).sum() / (z0 * z0).sum())
        log_ratio = [(fh.std((2, 3)) / f.std((2, 3)).clamp_min(1e-12)).log().mean()  # per layer: (B, C) -> ()
                     for f, fh in zip(lpl.features(z0), lpl.features(z0_hat))]
    return slope, float(torch.stack(log_ratio).mean().exp())


# ------------------------------------------------------------------------------ one-step denoising, held out
DENOISE_LEVELS = (0.1, 0.25, 0.5, 1.0, 2.0)  # σ/α; at 8x8 latents LPL acts at σ/α <= 0.5 (τ = 4 scaled)
DENOISE_METRICS = ("latent MSE", "L_LPL", "PSNR", "FID", "spectrum error")


def level_time(paradigm, ratio, scheduler=None):
    """(α, σ, the model's time) at noise level σ/α = ratio, on the model's own time grid: for eps
    and v the integer DDPM step whose σ/α is nearest (the times it was trained at; the level
    reported is that step's own), for flow the continuous t = r / (1 + r) (α = 1 − t, σ = t)."""
    if paradigm == "flow":
        t = ratio / (1 + ratio)
        return 1 - t, t, t * 1000
    abar = scheduler.alphas_cumprod.double()  # (1000,)
    i = int(((1 - abar) / abar).sqrt().log().sub(math.log(ratio)).abs().argmin())
    return abar[i].sqrt().item(), (1 - abar[i]).sqrt().item(), i


def to_uint8(x):
    """Images in [0, 1] -> uint8, rounded as save_image writes PNGs (what samples are scored as)."""
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def denoise(model, paradigm, vae, lpl, z0, y, levels, seed=0, extractor=None, ref=None, refine=None, batch=250):
    """One-step estimates ẑ0 of held-out latents z0 (n, C, h, w), labels y, at each noise level σ/α:
    {level: {"σ/α", "t", "latent MSE", "L_LPL", "PSNR", "FID", "spectrum error"}}. The noise ε is
    drawn once from `seed` (the same for every level and every model measured: models are paired).
    L_LPL: lpl(ẑ0, z0) of every sample (no δ), its mean. PSNR (dB), FID and the spectrum error
    compare decode(ẑ0) with decode(z0), both as the uint8 images a PNG holds; ref is decode(z0)'s
    (uint8 images, FID features or None, radial spectrum), computed once by denoise_reference.
    refine(ẑ0, t) -> the estimate to measure instead (a Cas-DM run: ϕ's x'0)."""
    from data import decode
    from lpl import z0_from_prediction
    from model import ddpm_scheduler
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))  # (n, C, h, w)
    sched = None if paradigm == "flow" else ddpm_scheduler(paradigm)
    x_ref, feats_ref, power_ref = ref
    out = {}
    for level in levels:
        alpha, sigma, t = level_time(paradigm, level, sched)
        mse = l_lpl = sq_err = 0.0
        images = []
        for zb, eb, yb in zip(z0.split(batch), eps.split(batch), y.split(batch)):
            z_t = alpha * zb + sigma * eb  # (b, C, h, w)
            t_b = torch.full((len(zb),), t, device=zb.device)  # (b,)
            pred = model(z_t, timestep=t_b, class_labels=yb).sample.float()
            z0_hat = z0_from_prediction(pred, z_t, alpha, sigma, paradigm)  # (b, C, h, w)
            if refine is not None:
                z0_hat = refine(z0_hat, t_b)
            mse += (z0_hat - zb).square().sum().item()
            l_lpl += lpl(z0_hat, zb).sum().item()
            images.append(to_uint8(decode(vae, z0_hat)))  # (b, 3, H, W) uint8
        x_hat = torch.cat(images)  # (n, 3, H, W)
        sq_err = (x_hat.double() - x_ref.double()).div(255).square().mean().item()
        row = {"σ/α": sigma / alpha, "t": t, "latent MSE": mse / z0.numel(), "L_LPL": l_lpl / len(z0),
               "PSNR": 10 * math.log10(1 / max(sq_err, 1e-20)),
               "spectrum error": spectrum_error(radial_power_spectrum(x_hat.double() / 255), power_ref)}
        if extractor is not None:
            row["FID"] = frechet_distance(*gaussian_stats(extractor(x_hat)), *gaussian_stats(feats_ref))
        out[level] = row
    return out


@torch.no_grad()
def denoise_reference(vae, z0, extractor=None, batch=250):
    """decode(z0) as uint8 images, their FID features (None without an extractor) and spectrum."""
    from data import decode
    x = torch.cat([to_uint8(decode(vae, zb)) for zb in z0.split(batch)])  # (n, 3, H, W)
    return x, (extractor(x) if extractor is not None else None), radial_power_spectrum(x.double() / 255)


def format_denoise(rows, path):
    """denoise()'s result as lines, one per level, that read_denoise reads back."""
    lines = []
    for level, r in rows.items():
        lines.append(f"denoise σ/α {r['σ/α']:.4f} (level {level:g}, t {r['t']:g}): latent MSE {r['latent MSE']:.6f}, "
                     f"L_LPL {r['L_LPL']:.6f}, PSNR {r['PSNR']:.4f} dB, "
                     + (f"FID {r['FID']:.4f}, " if "FID" in r else "") + f"spectrum error {r['spectrum error']:.5f}  {path}")
    return lines


def read_denoise(path):
    """{level: {metric: value}} from a file holding `metrics.py denoise`'s lines for one checkpoint,
    or None where the file is not there."""
    import re
    if not os.path.exists(path):
        return None
    out, ckpts = {}, set()
    for line in open(path):
        m = re.match(r"denoise σ/α [\d.]+ \(level ([\d.]+), t [\d.]+\): (.*?)  (\S+)$", line.strip())
        if not m:
            continue
        ckpts.add(m[3])
        row = {}
        for name in DENOISE_METRICS:
            v = re.search(re.escape(name) + r" ([\d.]+)", m[2])
            if v:
                row[name] = float(v[1])
        out[float(m[1])] = row
    if len(ckpts) > 1:
        fail(f"{path} holds metrics.py denoise's lines of {len(ckpts)} checkpoints: one file per checkpoint")
    if not out:
        fail(f"{path} holds no line of metrics.py denoise")
    return out


# ------------------------------------------------------------------------------ seed table
def read_scores(path):
    """(FID, spectrum error or None) from a file holding the output of `sample.py --fid` (and of
    `metrics.py spectrum`, whose line wins over sample.py's when both are there)."""
    import re
    try:
        text = open(path).read()
    except OSError as e:
        fail(f"cannot read {path} ({e.strerror}): write it with sample.py --fid ... > {path}")
    fid, spectrum = re.search(r"^FID ([\d.]+)", text, re.M), re.findall(r"^spectrum error ([\d.]+)", text, re.M)
    if not fid:
        fail(f"{path} holds no 'FID ...' line: it must hold the output of sample.py --fid")
    return float(fid.group(1)), float(spectrum[-1]) if spectrum else None


def read_inflation(path):
    """σ(ϕ̂)/σ(ϕ) from a file holding `metrics.py inflation`'s line for one checkpoint, or None."""
    import re
    if not os.path.exists(path):
        return None
    found = re.findall(r"σ\(ϕ̂\)/σ\(ϕ\) ([\d.]+)", open(path).read())
    if len(found) != 1:
        fail(f"{path} must hold metrics.py inflation's line for one checkpoint, it holds {len(found)}")
    return float(found[0])


def read_runs(runs):
    """Run directories named ARM-sSEED, each with train.py's log.jsonl and score.txt -> ({arm: {seed:
    (FID, spectrum error, s/step, LPL share, {step: L_Diff}, σ(ϕ̂)/σ(ϕ) or None)}}, [runs not scored
    yet]). σ(ϕ̂)/σ(ϕ) is read from the run's inflation.txt where there is one. s/step is the median
    over the log (a paused run does not move it), the share its mean. A folder of samples only (a run
    sampled again, or two runs sampled together with sample.py --ckpt-low) has no log: its training
    columns stay empty."""
    import re
    import statistics
    arms, unscored = {}, []
    for run in runs:
        if not os.path.isdir(run):
            fail(f"{run!r} is not a run directory (a glob like runs/post-*-s*/ keeps to directories)")
        m = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(os.path.normpath(run)))
        if not m:
            fail(f"{run!r} is not named ARM-sSEED (e.g. runs/post-lpl-s0): the table groups runs by that name")
        if not os.path.exists(os.path.join(run, "score.txt")):  # still training, or not scored yet
            unscored.append(os.path.basename(os.path.normpath(run)))
            continue
        log = read_log(os.path.join(run, "log.jsonl")) if os.path.exists(os.path.join(run, "log.jsonl")) else []
        fid, spectrum = read_scores(os.path.join(run, "score.txt"))
        share = [r["lpl_share"] for r in log if "lpl_share" in r]
        arms.setdefault(m[1], {})[int(m[2])] = (fid, spectrum, statistics.median(r["s_per_step"] for r in log[1:] or log)
                                                 if log else None,
                                                 statistics.mean(share) if share else None,
                                                 {r["step"]: r["loss_diff"] for r in log},
                                                 read_inflation(os.path.join(run, "inflation.txt")))
    return arms, unscored


def seed_table(arms, unscored=(), baseline=None):
    """Markdown rows, one per arm of read_runs, over its training seeds: FID and spectrum error as
    mean ± std (sample std; one seed is shown as it is), s/step and LPL's mean share; the runs not
    scored yet are named under the table. With a baseline arm, also the paired difference arm −
    baseline over the seeds both have: runs of one seed share batches, t and noise, so the paired
    spread is the one a gap must exceed. Of the training loss L_Diff (on those same batches, over
    the steps both logs have) the paired difference is relative: what an added loss costs the
    diffusion objective."""
    import statistics
    if baseline is not None and baseline not in arms:
        fail(f"--baseline {baseline!r} is none of the arms: {', '.join(arms)}")

    def spread(values, digits, sign=""):
        values = [v for v in values if v is not None]
        if not values:
            return ""
        if len(values) == 1:
            return f"{values[0]:{sign}.{digits}f}"
        return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    inflated = any(x[5] is not None for seeds in arms.values() for x in seeds.values())
    head = "| arm | training seeds | FID | FID per seed | spectrum error | s/step | LPL share |"
    if inflated:
        head += " σ(ϕ̂)/σ(ϕ) under τ |"
    if baseline:
        head += (f" FID − {baseline}, same seed | spectrum error − {baseline}, same seed |"
                 f" L_Diff / {baseline}'s − 1, same seed |")
    rows = [head, "|" + "---|" * head.count(" |")]
    for arm, seeds in arms.items():
        v = [seeds[s] for s in sorted(seeds)]
        shares = [x[3] for x in v if x[3] is not None]
        row = (f"| {arm} | {', '.join(map(str, sorted(seeds)))} | {spread([x[0] for x in v], 2)} | "
               f"{', '.join(f'{x[0]:.2f}' for x in v)} | {spread([x[1] for x in v], 3)} | "
               f"{spread([x[2] for x in v], 2).split(' ±')[0]} | {f'{statistics.mean(shares):.3f}' if shares else ''} |")
        if inflated:
            row += f" {spread([x[5] for x in v], 3)} |"
        if baseline:
            both = sorted(set(seeds) & set(arms[baseline])) if arm != baseline else []
            base = arms[baseline]
            d_spec = [seeds[s][1] - base[s][1] for s in both if seeds[s][1] is not None and base[s][1] is not None]
            d_loss = []  # %: what the added loss costs the diffusion loss, over the steps both logged
            for s in both:
                steps = seeds[s][4].keys() & base[s][4].keys()
                if steps:  # (a folder of samples only has no log)
                    d_loss.append(100 * (sum(seeds[s][4][k] for k in steps) / sum(base[s][4][k] for k in steps) - 1))
            row += (f" {spread([seeds[s][0] - base[s][0] for s in both], 2, '+')} | {spread(d_spec, 3, '+')} |"
                    f" {spread(d_loss, 2, '+')}{'%' if d_loss else ''} |")
        rows.append(row)
    return rows + ([f"(not scored yet, left out: {', '.join(unscored)})"] if unscored else [])


def sampling_noise(first, second, name, baseline=None):
    """How far a second sampling (another seed) of the same runs moves FID, and with a baseline, how far
    it moves each paired difference arm − baseline at one training seed: e = Δ(second) − Δ(first) is
    the difference of two independent samplings of Δ, so Δ's sampling std is rms(e)/√2. first and
    second are read_runs results of one set of runs under two score files; returns lines to print."""
    import statistics
    runs = [(a, s) for a in first for s in first[a] if s in second.get(a, {})]
    if len(runs) < 2:
        return [f"(sampling noise: {len(runs)} run(s) scored both ways; it needs 2)"]
    d = [second[a][s][0] - first[a][s][0] for a, s in runs]
    out = [f"Sampling noise, {name} against the first sampling: FID moves by {statistics.mean(d):+.2f} ± "
           f"{statistics.stdev(d):.2f} over {len(d)} runs (range {min(d):+.2f} to {max(d):+.2f})"]
    if baseline:
        e = [(second[a][s][0] - second[baseline][s][0]) - (first[a][s][0] - first[baseline][s][0])
             for a, s in runs if a != baseline and (baseline, s) in runs]
        if e:
            sd = math.sqrt(sum(x * x for x in e) / len(e) / 2)
            out.append(f"a paired difference (arm − {baseline}, one training seed) moves by {statistics.mean(e):+.2f} "
                       f"(rms {math.sqrt(sum(x * x for x in e) / len(e)):.2f}, {len(e)} pairs): its sampling std is "
                       f"{sd:.2f}, so a paired difference within ±{2 * sd:.2f} is within sampling noise")
    return out


RELATIVE = ("latent MSE", "L_LPL")  # paired as a ratio (−1, in %); the others as differences


def read_denoise_runs(runs):
    """{arm: {seed: {level: {metric: value}}}} of run directories named ARM-sSEED, from each one's
    denoise.txt (metrics.py denoise's lines); the runs without one are returned apart."""
    import re
    arms, missing = {}, []
    for run in runs:
        m = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(os.path.normpath(run)))
        if not m or not os.path.isdir(run):
            fail(f"{run!r} is not a run directory named ARM-sSEED (e.g. results/study/lpl-s0)")
        rows = read_denoise(os.path.join(run, "denoise.txt"))
        if rows is None:
            missing.append(os.path.basename(os.path.normpath(run)))
            continue
        arms.setdefault(m[1], {})[int(m[2])] = rows
    return arms, missing


def denoise_deltas(arms, baseline):
    """{arm: {seed: {level: {metric: paired difference}}}} against the baseline arm at the same seed
    and level: latent MSE and L_LPL as a relative change (%), the others as differences."""
    if baseline not in arms:
        fail(f"--baseline {baseline!r} has no denoise.txt among the runs: {', '.join(arms) or 'none'}")
    out = {}
    for arm, seeds in arms.items():
        if arm == baseline:
            continue
        for seed, levels in seeds.items():
            base = arms[baseline].get(seed)
            for level, row in (levels.items() if base else ()):
                if level in base:
                    out.setdefault(arm, {}).setdefault(seed, {})[level] = {
                        k: 100 * (v / base[level][k] - 1) if k in RELATIVE else v - base[level][k]
                        for k, v in row.items() if k in base[level]}
    return out


def denoise_table(arms, baseline, missing=()):
    """Markdown rows: the baseline's values per level (mean ± std over seeds), then each arm's paired
    differences from it (same seed: the same images and noise), per level."""
    import statistics

    def spread(values, digits, sign=""):
        if not values:
            return ""
        if len(values) == 1:
            return f"{values[0]:{sign}.{digits}f}"
        return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    deltas = denoise_deltas(arms, baseline)
    metrics = [k for k in DENOISE_METRICS if any(k in r for s in arms[baseline].values() for r in s.values())]
    digits = {"latent MSE": 4, "L_LPL": 4, "PSNR": 2, "FID": 2, "spectrum error": 4}
    head = "| arm | seeds | σ/α | " + " | ".join(
        f"{k}{' (dB)' if k == 'PSNR' else ''}, {baseline} / Δ{' %' if k in RELATIVE else ''}" for k in metrics) + " |"
    rows = [head, "|" + "---|" * (3 + len(metrics))]
    levels = sorted({lv for s in arms[baseline].values() for lv in s})
    for arm in [baseline, *deltas]:
        seeds = sorted(arms[baseline] if arm == baseline else deltas[arm])
        for lv in levels:
            src = ({s: arms[baseline][s].get(lv) for s in seeds} if arm == baseline else
                   {s: deltas[arm][s].get(lv) for s in seeds})
            src = {s: r for s, r in src.items() if r}
            if not src:
                continue
            cells = []
            for k in metrics:
                v = [r[k] for r in src.values() if k in r]
                cells.append(spread(v, digits[k] if arm == baseline else 2 if k in RELATIVE else digits[k],
                                    "" if arm == baseline else "+"))
            rows.append(f"| {arm} | {', '.join(map(str, sorted(src)))} | {lv:g} | " + " | ".join(cells) + " |")
    return rows + ([f"(no denoise.txt, left out: {', '.join(missing)})"] if missing else [])


# ------------------------------------------------------------------------------ the σ̂ bias, on a real decoder
def sigma_bias(vae, z0, noise, detach_sigma, draws=16, steps=300, lr=0.02, seed=0):
    """What a model that minimises the expected LPL would output when part of z0 is unknowable.

    The targets are z0 + noise·u (u ~ N(0, I), `draws` of them per image): u stands for the detail the
    model cannot infer at its noise level. Under ℓ2 the best single output is their mean, z0 itself.
    A free ẑ0 (starting at z0) is fitted by Adam to the mean LPL against the drawn targets. Returns
    (scale, power): the regression slope of ẑ0 on z0 (1 = unbiased; > 1 = inflated) and the mean ratio
    of the decoded images' power spectra, decode(ẑ0) against decode(z0), over frequencies."""
    from lpl import LatentPerceptualLoss, layer_distance
    from data import decode_raw
    lpl = LatentPerceptualLoss(vae, detach_sigma=detach_sigma)
    g = torch.Generator().manual_seed(seed)
    targets = z0 + noise * torch.randn(draws, *z0.shape, generator=g)  # (K, B, C, h, w)
    with torch.no_grad():  # the targets' features and outlier masks, once
        phis = [lpl.features(z) for z in targets]
        rhos = [[lpl.outlier_mask(f) for f in phi] for phi in phis]
    z_hat = z0.clone().requires_grad_()
    opt = torch.optim.Adam([z_hat], lr=lr)
    for _ in range(steps):
        phi_hat = lpl.features(z_hat)
        loss = sum(w * layer_distance(f, fh, r, detach_sigma=detach_sigma).mean()
                   for phi, rho in zip(phis, rhos) for w, f, fh, r in zip(lpl.layer_weights, phi, phi_hat, rho)) / draws
        opt.zero_grad()
        loss.backward()
        opt.step()
    z_hat = z_hat.detach()
    scale = float((z_hat * z0).sum() / (z0 * z0).sum())
    with torch.no_grad():
        p_hat, p = (radial_power_spectrum(decode_raw(vae, z).float() / 2 + 0.5) for z in (z_hat, z0))
    return scale, float((p_hat / p).mean())


# ------------------------------------------------------------------------------ command line
def comparable_checkpoints(paths):
    """[(path, checkpoint)] of train.py checkpoints on one autoencoder and one set of classes (models
    measured on the same latents), or one line naming the one that differs."""
    from checkpoints import load_checkpoint
    ckpts = [(path, load_checkpoint(path)) for path in paths]
    first = ckpts[0][1]
    for path, ck in ckpts:
        if (ck["args"]["vae"], ck["classes"]) != (first["args"]["vae"], first["classes"]):
            fail(f"{path} was trained on another autoencoder or classes than {paths[0]}: measure them apart")
    return ckpts


def labels_of(files, classes, folder):
    """The class index of each ImageFolder file, or one line naming the classes the checkpoints lack."""
    names = [os.path.basename(os.path.dirname(f)) for f in files]
    if not set(names) <= set(classes):
        unknown = ", ".join(sorted(set(names) - set(classes)))
        fail(f"{folder!r} holds classes the checkpoints do not know ({unknown}): give a folder in the training "
             f"data's ImageFolder layout")
    return [classes.index(c) for c in names]


def denoise_main(args):
    """`metrics.py denoise`: every input checked (checkpoints, classes, images, levels) before the
    autoencoder encodes anything; then one block of lines per checkpoint."""
    from data import encode_latents, load_vae
    from lpl import LatentPerceptualLoss
    from model import build_model
    if len(set(args.levels)) != len(args.levels):
        fail(f"--levels names a level twice: {' '.join(f'{v:g}' for v in args.levels)}")
    ckpts = comparable_checkpoints(args.ckpts)
    first = ckpts[0][1]
    folder = args.data
    if folder is None:
        train_data = first["args"]["data"]
        folder = os.path.join(os.path.dirname(os.path.normpath(train_data)), "test")
        if not os.path.isdir(folder):
            fail(f"no held-out images beside {args.ckpts[0]}'s training data {train_data!r} ({folder} does not "
                 f"exist): give --data FOLDER")
    files = image_files(folder)
    if len(files) < args.n:
        fail(f"{folder!r} holds {len(files)} images, fewer than --n {args.n}: lower --n or give a larger --data")
    files = subset(files, args.n, args.seed)
    labels = labels_of(files, first["classes"], folder)
    size = first["args"]["image_size"]
    shape = tuple(next(read_images(files[:1])).shape[-2:])
    if shape != (size, size):
        fail(f"the images of {folder!r} are {shape[0]}x{shape[1]}, the checkpoints were trained at {size}x{size}: "
             f"give held-out images of the training size")
    if args.fid:
        from fid import inception_path
        inception_path()  # the FID network is there, before any work
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    y = torch.tensor(labels, device=device)
    vae = load_vae(first["args"]["vae"], device)
    x = torch.cat(list(read_images(files))).to(device)  # (n, 3, H, W) uint8
    with torch.no_grad():
        z0 = torch.cat([encode_latents(vae, xb.float() / 127.5 - 1) for xb in x.split(250)])  # posterior means
    lpl = LatentPerceptualLoss(vae)  # its defaults for every checkpoint: one yardstick
    extractor = InceptionFeatures(device=str(device)) if args.fid else None
    ref = denoise_reference(vae, z0, extractor)
    for path, ck in ckpts:
        model = build_model(ck["model_config"]).to(device).eval()
        model.load_state_dict(ck["ema"])
        refine = None
        if "cas" in ck:  # Cas-DM: its LPL acts on ϕ's x'0 (the EMA, which samples)
            from comparisons import CasDM
            from model import ddpm_scheduler
            cas = CasDM.from_state(ck["cas"], tuple(ck["latent_shape"]), ck["args"]["paradigm"],
                                   ddpm_scheduler(ck["args"]["paradigm"])).to(device)
            refine = lambda z0_hat, t: cas.refine(z0_hat, t, ema=True)[0]  # noqa: E731
        rows = denoise(model, ck["args"]["paradigm"], vae, lpl, z0, y, args.levels, args.seed, extractor, ref, refine)
        print("\n".join(format_denoise(rows, path)), flush=True)


def main(argv=None):
    from cli import DEVICE, SEED, Float, HelpFormatter, Int, Name, Parser, Path
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="metric", required=True)
    f = sub.add_parser("fid", formatter_class=HelpFormatter, help="FID between two folders (or .npz statistics)")
    f.add_argument("a", type=Path("any"), help="image folder, or .npz statistics")
    f.add_argument("b", type=Path("any"), help="image folder, or .npz statistics")
    f.add_argument("--n", type=Int(2), default=None, help="draw N images at random from each folder (default: all)")
    f.add_argument("--seeds", type=SEED, nargs="+", default=[0], help="one FID per seed of the draw, "
                   "and their mean and spread; features are computed once for all draws")
    st = sub.add_parser("stats", formatter_class=HelpFormatter, help="save a folder's FID statistics (μ, Σ)")
    st.add_argument("folder", type=Path("dir"), help="image folder")
    st.add_argument("out", type=Path("out-file", ext=(".npz",)), help="the .npz to write (a new file; with --resume, "
                    "an existing one is checked against this call's settings and kept)")
    st.add_argument("--n", type=Int(2), default=None, help="draw N images at random (default: all)")
    st.add_argument("--seed", type=SEED, default=0, help="seeds the draw")
    st.add_argument("--resume", action="store_true", help="continue an interrupted call with the same settings (a "
                    "call keeps its features as they come in a folder named as OUT, .features for .npz)")
    sp = sub.add_parser("spectrum", formatter_class=HelpFormatter, help="power spectrum error of folders against a reference")
    sp.add_argument("a", nargs="+", type=Path("dir"), help="image folder(s), e.g. generated; each is compared with the last folder")
    sp.add_argument("b", type=Path("dir"), help="image folder (reference)")
    sp.add_argument("--n", type=Int(1), default=None, help="draw N images at random from each folder (default: all)")
    sp.add_argument("--plot", default=None, type=Path("new-file", ext=(".png", ".pdf", ".svg")), help="also write a log-log plot here (default: none)")
    for q in (f, st):
        q.add_argument("--device", default=None, type=DEVICE, help="where the FID network runs; default: cuda if there is "
                       "one, else cpu")
    ou = sub.add_parser("outliers", formatter_class=HelpFormatter, help="Fig. 13: decoder feature maps with "
                        "Algorithm 1's outlier mask, for one image")
    ou.add_argument("image", type=Path("any"), help="an image file, or an image folder (then --index picks the image)")
    ou.add_argument("--index", type=Int(0), default=0, help="with a folder: the index of the image, in sorted order")
    ou.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", type=Path("dir", hub=True), help="Hugging Face id or save_pretrained folder")
    ou.add_argument("--image-size", type=Int(8, 4096), default=None, help="resize to this first (default: as it is)")
    ou.add_argument("--channels", type=Int(1, 64), default=4, help="channels shown per layer (those most masked)")
    ou.add_argument("--out", default="outliers.png", type=Path("new-file", ext=IMAGE_EXTENSIONS), help="the PNG to write")
    di = sub.add_parser("diff", formatter_class=HelpFormatter, help="two images of one layout (grids of two "
                        "models from the same noise) and their amplified difference, side by side")
    di.add_argument("a", type=Path("file", ext=IMAGE_EXTENSIONS), help="image, e.g. the baseline's grid")
    di.add_argument("b", type=Path("file", ext=IMAGE_EXTENSIONS), help="image of the same size, e.g. the LPL model's grid from the same --seed")
    di.add_argument("--gain", type=Float(-1000, 1000), default=8.0, help="the difference is shown as 128 + gain x (b - a)")
    di.add_argument("--zoom", type=Int(1, 16), default=2, help="nearest-neighbour upscaling, to see pixels")
    di.add_argument("--out", default="diff.png", type=Path("new-file", ext=IMAGE_EXTENSIONS), help="the PNG to write")
    sb = sub.add_parser("sigma-bias", formatter_class=HelpFormatter, help="how far the output that minimises "
                        "the expected LPL is inflated, with and without the gradient through σ̂ (README, Differences)")
    sb.add_argument("folder", type=Path("dir"), help="image folder (the images at the VAE's training size)")
    sb.add_argument("--vae", required=True, type=Path("dir", hub=True), help="save_pretrained folder or Hub id (required)")
    sb.add_argument("--n", type=Int(1, 100000), default=64, help="images, drawn at random")
    sb.add_argument("--noise", type=Float(0, 100, lo_open=True), nargs="+", default=[0.3, 0.6], help="std of the unknowable part u, "
                    "in the diffusion model's latent units")
    sb.add_argument("--draws", type=Int(1, 10000), default=16, help="targets z0 + noise·u per image")
    sb.add_argument("--steps", type=Int(1, 100000), default=300, help="Adam steps fitting ẑ0")
    sb.add_argument("--seed", type=SEED, default=0, help="seeds the draw of images and of u")
    infl = sub.add_parser("inflation", formatter_class=HelpFormatter, help="how much larger trained models' "
                          "ẑ0 and decoder features are than z0's where LPL acts (README, Differences)")
    infl.add_argument("folder", type=Path("dir"), help="image folder in ImageFolder layout with the checkpoints' classes (e.g. the test set)")
    infl.add_argument("ckpts", nargs="+", type=Path("file"), help="train.py checkpoints on one autoencoder (EMA weights)")
    infl.add_argument("--n", type=Int(1, 100000), default=512, help="images, drawn at random, each at one time under τ")
    infl.add_argument("--seed", type=SEED, default=0, help="seeds the images, times and noise (the same for every checkpoint)")
    de = sub.add_parser("denoise", formatter_class=HelpFormatter, help="what a model's one-step estimate ẑ0 is worth "
                        "on held-out images at fixed noise levels: latent MSE, L_LPL, PSNR, FID and spectrum error of "
                        "decode(ẑ0) against decode(z0); the same images and noise for every checkpoint (paired)")
    de.add_argument("ckpts", nargs="+", type=Path("file"), help="train.py checkpoints on one autoencoder (EMA weights; "
                    "a Cas-DM run's: ϕ's x'0)")
    de.add_argument("--data", default=None, type=Path("dir"), help="held-out images in ImageFolder layout with the "
                    "checkpoints' classes (default: the 'test' folder beside the checkpoints' training data)")
    de.add_argument("--n", type=Int(2, 1000000), default=2000, help="images, a fixed draw (--seed); FID at this n")
    de.add_argument("--levels", type=Float(0, 1e4, lo_open=True), nargs="+", default=list(DENOISE_LEVELS),
                    help="noise levels σ/α (eps, v: the DDPM step nearest each; flow: exact)")
    de.add_argument("--seed", type=SEED, default=0, help="seeds the draw of images and the noise")
    de.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="also FID of decode(ẑ0) "
                    "against decode(z0) at each level (the FID network on n images per level: most of the time)")
    de.add_argument("--device", default=None, type=DEVICE, help="where the models run; default: cuda if there is one, else cpu")
    ta = sub.add_parser("table", formatter_class=HelpFormatter, help="mean ± std over training seeds of runs "
                        "named ARM-sSEED, each with log.jsonl and score.txt (sample.py --fid's output)")
    ta.add_argument("runs", nargs="+", type=Path("dir"), help="run directories, e.g. runs/p17/post-*")
    ta.add_argument("--baseline", default=None, type=Name(), help="an arm, e.g. post-l2: also each arm's difference from "
                    "it at the same training seed (default: none)")
    ta.add_argument("--resampled", default=None, type=Path("dir"), help="a folder holding the same runs (ARM-sSEED/"
                    "score.txt) sampled again with another seed: also print how far that moves FID and each paired "
                    "difference, the sampling noise a difference must exceed (default: none)")
    ta.add_argument("--denoise", action="store_true", help="instead of the scores: each run's denoise.txt (metrics.py "
                    "denoise) per noise level, the baseline's values and every arm's paired differences from it "
                    "(needs --baseline; --plot: the differences against σ/α, a colour per seed)")
    ta.add_argument("--plot", default=None, metavar="PNG", type=Path("new-file", ext=(".png", ".pdf", ".svg")), help="also plot every run's FID and spectrum error, "
                    "the runs of one training seed joined (default: no plot)")
    cu = sub.add_parser("curves", formatter_class=HelpFormatter, help="plot train.py logs: losses and LPL's share; "
                        "a post-training run's steps are counted from the start of its pre-training (its "
                        "--init-from step is added), so it continues its base's curve")
    cu.add_argument("logs", nargs="+", type=Path("file"), help="log.jsonl files; each is labelled by its run directory")
    cu.add_argument("--out", default="curves.png", type=Path("new-file", ext=(".png", ".pdf", ".svg")), help="the PNG to write")
    args = p.parse_args(argv)
    if args.metric == "stats" and os.path.exists(args.out) and not args.resume:  # outputs are never replaced
        fail(f"{args.out} exists: remove it or pick another name (--resume checks it against this call's settings)")
    if args.metric == "outliers":
        from data import UnreadableImage, load_vae, read_rgb
        path = args.image
        if os.path.isdir(path):
            files = image_files(path)
            if not 0 <= args.index < len(files):
                fail(f"--index must be in 0..{len(files) - 1} for {path}, got {args.index}")
            path = files[args.index]
        elif not os.path.isfile(path):
            fail(f"{path!r} is neither an image file nor a folder")
        for name in ("channels", "image_size"):
            v = getattr(args, name)
            if v is not None and v < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        try:
            img = read_rgb(path)
        except UnreadableImage as e:
            fail(f"cannot read {e}")
        if args.image_size:
            img = img.resize((args.image_size, args.image_size), resample=3)  # bicubic
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        vae = load_vae(args.vae, "cpu")
        for frac, i in zip(outlier_maps(vae, x, args.out, args.channels), range(1, 100)):
            print(f"block {i}: {100 * frac:.3f}% of positions masked")
        print(f"wrote {args.out} ({path})")
        return
    if args.metric == "diff":
        if args.zoom < 1 or not np.isfinite(args.gain):
            fail(f"--zoom must be >= 1 and --gain a number, got {args.zoom} and {args.gain}")
        a, b = (next(read_images([f]))[0] for f in (args.a, args.b))  # (3, H, W) uint8 each
        from torchvision.utils import save_image
        with atomic_path(args.out) as tmp:
            save_image(difference_image(a, b, args.gain, args.zoom).float() / 255, tmp)
        d = (b.float() - a.float()).abs()
        print(f"wrote {args.out}: mean |b - a| {d.mean():.2f}/255, max {d.max():.0f}/255")
        return
    if args.metric == "sigma-bias":
        from data import encode_latents, load_vae
        for name in ("n", "draws", "steps"):
            if getattr(args, name) < 1:
                fail(f"--{name} must be >= 1, got {getattr(args, name)}")
        vae = load_vae(args.vae, "cpu")
        x = torch.cat(list(read_images(subset(image_files(args.folder), args.n, args.seed))))  # (n, 3, H, W) uint8
        with torch.no_grad():
            z0 = encode_latents(vae, x.float() / 127.5 - 1)
        for noise in args.noise:
            for detach in (False, True):
                scale, power = sigma_bias(vae, z0, noise, detach, args.draws, args.steps, seed=args.seed)
                print(f"noise {noise:g}, σ̂ {'constant   ' if detach else 'with grad. '}: ẑ0 = {scale:.3f} x z0, "
                      f"decoded power x{power:.3f}")
        return
    if args.metric == "inflation":
        from data import encode_latents, load_vae
        from lpl import LatentPerceptualLoss
        from model import build_model
        if args.n < 1:
            fail(f"--n must be >= 1, got {args.n}")
        ckpts = comparable_checkpoints(args.ckpts)
        first = ckpts[0][1]
        files = image_files(args.folder)
        files = subset(files, min(args.n, len(files)), args.seed)
        y = torch.tensor(labels_of(files, first["classes"], args.folder))
        vae = load_vae(first["args"]["vae"], "cpu")
        x = torch.cat(list(read_images(files)))  # (n, 3, H, W) uint8
        with torch.no_grad():
            z0 = encode_latents(vae, x.float() / 127.5 - 1)
        lpl = LatentPerceptualLoss(vae)
        for path, ck in ckpts:
            model = build_model(ck["model_config"]).eval()
            model.load_state_dict(ck["ema"])
            a = ck["args"]
            res_scale = math.sqrt(z0.shape[-2] * z0.shape[-1]) / 64  # τ is given at 64x64 latents, as train.py scales it
            cas, r_t = None, []
            if "cas" in ck:  # Cas-DM: its LPL acts on ϕ's x'0 (the EMA, which samples)
                from comparisons import CasDM
                from model import ddpm_scheduler
                cas = CasDM.from_state(ck["cas"], tuple(ck["latent_shape"]), a["paradigm"], ddpm_scheduler(a["paradigm"]))

            def refine(z0_hat, t):  # and r_t, the weight Eq. 11 gives x'0's step (sampling's, under τ)
                x0_prime, r = cas.refine(z0_hat, t, ema=True)
                r_t.append(r.mean().item())
                return x0_prime
            slope, ratio = inflation(model, a["paradigm"], lpl, z0, y, a["lpl_tau"], res_scale, args.seed,
                                     refine if cas else None)
            print(f"{'x′0' if cas else 'ẑ0'} / z0 {slope:.4f}, decoder feature std σ(ϕ̂)/σ(ϕ) {ratio:.4f}  {path} "
                  f"({len(z0)} samples under τ {a['lpl_tau']:g}{f', Cas-DM: ϕ(ẑ0), mean r_t {r_t[0]:.4f}' if cas else ''})")
        return
    if args.metric == "denoise":
        return denoise_main(args)
    if args.metric == "table" and args.denoise:
        if args.baseline is None:
            fail("--denoise pairs every arm with a baseline: give --baseline ARM")
        arms, missing = read_denoise_runs(args.runs)
        print("\n".join(denoise_table(arms, args.baseline, missing)))
        if args.plot:
            plot_denoise(denoise_deltas(arms, args.baseline), args.baseline, args.plot)
        return
    if args.metric == "table":
        arms, unscored = read_runs(args.runs)
        print("\n".join(seed_table(arms, unscored, args.baseline)))
        if args.resampled:
            again = [os.path.join(args.resampled, os.path.basename(os.path.normpath(r))) for r in args.runs]
            again = read_runs([r for r in again if os.path.isdir(r)])[0]
            print("\n" + "; ".join(sampling_noise(arms, again, args.resampled, args.baseline)))
        if args.plot:
            plot_seeds(arms, args.plot)
        return
    if args.metric == "curves":
        logs = {}
        for path in args.logs:  # a post-training run starts where its pre-training stopped
            offset = run_start(os.path.join(os.path.dirname(path), "ckpt.pt"))
            logs[os.path.basename(os.path.dirname(os.path.abspath(path)))] = [
                dict(r, step=r["step"] + offset) for r in read_log(path)]
        plot_curves(logs, args.out)
        print(f"wrote {args.out}")
        return
    if args.n is not None and args.n < 2:
        fail(f"--n must be >= 2, got {args.n}")
    if args.metric in ("fid", "stats") and args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.metric == "stats":
        write_stats(args.folder, args.out, args.n, args.seed, args.device, args.resume)
    elif args.metric == "fid":
        extractor = InceptionFeatures(device=args.device)
        draws = {}  # per source: {seed: (μ, Σ)}
        for src in (args.a, args.b):
            if src.endswith(".npz"):
                draws[src] = {seed: load_stats(src) for seed in args.seeds}
                continue
            files = image_files(src)
            picks = {seed: subset(files, args.n, seed) for seed in args.seeds}
            union = sorted(set().union(*picks.values()))
            feats = dict(zip(union, features_of_files(union, extractor, desc=f"FID features of {src}")))
            draws[src] = {seed: gaussian_stats(torch.stack([feats[f] for f in picks[seed]])) for seed in args.seeds}
        fids = [frechet_distance(*draws[args.a][seed], *draws[args.b][seed]) for seed in args.seeds]
        for seed, v in zip(args.seeds, fids):
            print(f"FID {v:.4f}  (seed {seed}{f', {args.n} images each' if args.n else ''})")
        if len(fids) > 1:
            print(f"FID mean {np.mean(fids):.4f}, std {np.std(fids, ddof=1):.4f}, range {min(fids):.4f}-{max(fids):.4f}")
    else:
        ref = folder_spectrum(args.b, args.n)
        spectra = {f: folder_spectrum(f, args.n) for f in args.a}
        for f, p_gen in spectra.items():
            print(f"spectrum error {spectrum_error(p_gen, ref):.4f}  {f} against {args.b} "
                  f"(mean |log power ratio| over {len(ref)} frequencies)")
        if args.plot:
            label = lambda f: os.path.basename(os.path.normpath(f))  # noqa: E731
            plot_spectra({**{label(f): p for f, p in spectra.items()}, label(args.b): ref}, label(args.b), args.plot)
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    entry(main)
