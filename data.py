"""Images -> latents, and back: the autoencoder (any family lpl.py reads), the image readers
(folders of images of any depth, the official ImageNet 64x64 .npz batches) and the latent cache that
train.py encodes the dataset into once."""
import bisect
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import Kept
from cli import fail
from lpl import SUPPORTED, decoder_taps, encode_latents


def looks_like_path(name):
    """A local path rather than 'cifar10' or a Hugging Face id (org/name, org/name/subfolder)."""
    return name != "cifar10" and (name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name))
                                  or name.count("/") == 0)


def load_vae(name, device):
    """Any diffusers autoencoder lpl.py supports (README, "Supported autoencoders"): a folder written
    by save_pretrained, a Hub id, or a Hub id and its subfolder (black-forest-labs/FLUX.2-dev/vae)."""
    from diffusers import AutoModel
    if not os.path.isdir(name) and (name.startswith(("/", ".", "~")) or os.path.exists(name)):
        fail(f"--vae {name!r} is not a folder: give a folder written by save_pretrained or a Hugging Face id")
    repo, sub = name, None
    if not os.path.isdir(name) and name.count("/") >= 2:  # org/repo/subfolder: a pipeline's VAE
        org, rest, sub = name.split("/", 2)
        repo = f"{org}/{rest}"
    try:  # low_cpu_mem_usage=False: the same load, without diffusers' warning that accelerate is missing
        vae = AutoModel.from_pretrained(repo, subfolder=sub, low_cpu_mem_usage=False)
    except Exception as e:
        cause = " ".join(str(e).split())[:200]
        if os.path.isdir(name):
            fail(f"cannot load the VAE folder {name!r}: {type(e).__name__}: {cause}. Give a folder written by "
                 f"save_pretrained (config.json and its weights)")
        fail(f"cannot load the VAE {name!r} from the Hugging Face Hub: {type(e).__name__}: {cause}. Offline "
             f"(or with HF_HUB_OFFLINE=1), give --vae a local folder written by save_pretrained")
    try:
        decoder_taps(vae)
    except ValueError:
        fail(f"--vae {name!r} is a {type(vae).__name__}; the trainer takes the autoencoders lpl.py "
             f"supports: {SUPPORTED}")
    return vae.to(device).eval().requires_grad_(False)


def latent_geometry(vae):
    """(latent channels, downsampling factor) of a supported autoencoder, from decoding a 2x2 latent
    (each family keeps these in differently named config fields)."""
    _, decode, channels = decoder_taps(vae)
    p = next(vae.parameters())
    with torch.no_grad():
        size = decode(torch.zeros(1, channels, 2, 2, device=p.device, dtype=p.dtype)).shape[-1]
    return channels, size // 2


def load_rgb(path):
    """An image file as the 8-bit RGB picture it shows. PIL's convert("RGB") alone clips 16-bit
    grayscale (mode I;16 or I) to 255, a white image, and drops alpha, showing whatever colour lies
    under transparent pixels; here 16-bit values are scaled to 8 bits and transparency is laid over
    white, as a viewer shows it on a white page. Float images (TIFF mode F) in 0..1 are scaled to
    0..255 (PIL would clip them to black). Palette, grayscale and 16-bit RGB PNGs (which PIL reads as
    8-bit RGB) convert as they are."""
    from PIL import Image
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == "F":  # 32-bit float (TIFF): values in 0..1 or 0..255, as the file's own range says
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise ValueError("a float image with values outside 0..1 and 0..255")
        img = Image.fromarray(np.round(a * (255 if a.max() <= 1 else 1)).astype(np.uint8), "L")
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale
        a = np.asarray(img, dtype=np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"a {img.mode} image with values outside 0..65535")
        img = Image.fromarray(np.round(a / 257).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


class UnreadableImage(Exception):
    pass


def read_rgb(path):
    """ImageFolder's loader, reading 16-bit and transparent images as what they show
    (load_rgb), with the file named when it fails (truncated PNG, not an image)."""
    try:
        return load_rgb(path)
    except Exception as e:
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from None


class NpzImages(torch.utils.data.Dataset):
    """The official downsampled ImageNet 64x64: .npz batches with 'data' (N x 12288 uint8 rows) and
    'labels' (1..1000). Labels and array headers are read up front, so a malformed file fails before
    any work; pixels are read one file at a time (1.28M images are never all in memory)."""

    def __init__(self, files, size):
        self.files, self.size, self.cached = files, size, (None, None)
        labels, self.starts = [], [0]
        for f in files:
            try:
                with zipfile.ZipFile(f) as z, z.open("data.npy") as h:
                    version = np.lib.format.read_magic(h)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(h)
                with np.load(f) as part:
                    y = part["labels"].astype(np.int64) - 1
                if shape != (len(y), 3 * 64 * 64) or dtype != np.uint8 or y.min() < 0 or y.max() > 999:
                    raise ValueError(f"'data' {shape} {dtype}, {len(y)} labels from {y.min() + 1}")
            except Exception as e:
                fail(f"{f} is not an ImageNet 64x64 batch ('data': N x 12288 uint8, 'labels': 1..1000): "
                     f"{type(e).__name__}: {e}".replace("\n", " "))
            labels.append(torch.from_numpy(y))
            self.starts.append(self.starts[-1] + len(y))
        self.targets = torch.cat(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        k = bisect.bisect_right(self.starts, i) - 1  # the file holding image i
        if self.cached[0] != k:
            with np.load(self.files[k]) as part:
                self.cached = (k, part["data"])
        x = torch.from_numpy(self.cached[1][i - self.starts[k]]).view(1, 3, 64, 64).float() / 127.5 - 1
        return F.interpolate(x, size=self.size, mode="area")[0], int(self.targets[i])  # (3, size, size)


def image_dataset(args):
    """The images in [-1, 1] with integer labels, and the files they come from (the cache key)."""
    ds, classes, files = _image_dataset(args)
    if args.images_per_class:  # the first N of each class, in the dataset's own order
        seen, idx = {}, []
        for i, y in enumerate(torch.as_tensor(ds.targets).tolist()):
            seen[y] = seen.get(y, 0) + 1
            if seen[y] <= args.images_per_class:
                idx.append(i)
        ds = torch.utils.data.Subset(ds, idx)
    return ds, classes, files


def _image_dataset(args):
    import torchvision.datasets as D
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor(),
                    T.Normalize(0.5, 0.5)])  # VAEs take images in [-1, 1]
    if args.data == "cifar10":
        try:
            ds = D.CIFAR10(args.data_root, train=True, download=True, transform=tf)
        except Exception as e:
            fail(f"cannot download CIFAR-10 into {args.data_root!r} ({type(e).__name__}); offline, pass "
                 f"--data PATH to an image folder with one subfolder per class")
        return ds, ds.classes, sorted(glob.glob(os.path.join(args.data_root, "cifar-10-batches-py", "*")))
    if not os.path.isdir(args.data):
        fail(f"--data {args.data!r} is neither 'cifar10' nor an existing folder")
    npz = sorted(glob.glob(os.path.join(args.data, "*.npz")))
    subfolders = [d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d))]
    if npz and subfolders:  # one kind or the other, never one silently ignored
        fail(f"--data {args.data!r} holds both .npz batches ({os.path.basename(npz[0])}, ...) and class folders "
             f"({subfolders[0]}, ...): give a folder of one kind")
    if npz:  # official downsampled ImageNet
        ds = NpzImages(npz, args.image_size)
        return ds, [str(i) for i in range(int(ds.targets.max()) + 1)], npz
    try:
        ds = D.ImageFolder(args.data, transform=tf, loader=read_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"--data {args.data!r} has no images in class subfolders ({e})".replace("\n", " "))
    return ds, ds.classes, [p for p, _ in ds.samples]


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def cache_path(args, vae, files, known=None):
    """The latent cache, keyed by what the latents depend on: the data files (names and contents;
    5.6 s for CIFAR-10's 50,000 PNGs on one busy core), the image size and the VAE (config, and the contents of its weight files if
    local: a copied or re-provisioned model folder keeps its key). It lies next to the run directory,
    unless `known` (the cache a checkpoint names: a post-training's pre-training's, or a resumed
    run's own) has the same key: then that one is reused instead of encoding the data again."""
    def stat(f):  # by content, not date: touching a file must not block a resume, editing one must re-encode
        h = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        return [os.path.abspath(f), h.hexdigest()]

    def digest(f):  # weights only, so a README edit changes nothing (0.4 s per 335 MB, the SD VAE's size)
        h = hashlib.sha1()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        return [os.path.basename(f), h.hexdigest()]
    vae_files = sorted(f for f in glob.glob(os.path.join(args.vae, "*")) if f.endswith(WEIGHT_FILES)) \
        if os.path.isdir(args.vae) else []
    key = json.dumps([[stat(f) for f in files], args.images_per_class, args.image_size, args.vae,
                      [digest(f) for f in vae_files], vae.config], sort_keys=True, default=str)
    digest_ = hashlib.sha1(key.encode()).hexdigest()
    args.latent_key = digest_  # kept inside the cache: a file of the same name and shape but other data is refused
    name = f"latents-{digest_[:12]}.pt"
    if known and os.path.basename(known) == name and os.path.exists(known):
        return known
    return os.path.join(os.path.dirname(os.path.abspath(args.run_dir)), name)


def encode_dataset(args, vae, device, ds, classes, cache, latent_shape):
    """Latents in the diffusion model's scale (encode_latents) of each image and its mirror, cached.
    Runs that share a parent folder share the cache; a lock makes a second run wait for the first
    one's encoding instead of encoding (and writing) the same file at the same time."""
    with open(cache + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"waiting for another run that holds the latent cache {cache} (reading it, or encoding the data)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(cache):
            try:
                data = torch.load(cache)
                problem = cache_problem(data, len(ds), classes, latent_shape, getattr(args, "latent_key", None))
            except Exception as e:  # truncated by a kill, or not ours
                problem = f"unreadable ({type(e).__name__})"
            if problem is None:
                return data
            tqdm.write(f"the latent cache {cache} is {problem}; encoding the data again")
        check_images(ds)  # every file readable, before the minutes of encoding
        # The latents are kept as they come (a killed run's are continued by the next, in the same batches):
        # encoding ImageNet takes a while on a GPU, CIFAR-10 10 min on a CPU.
        keep, bs = cache[:-len(".pt")] + ".parts", 64
        settings = dict(key=getattr(args, "latent_key", None), images=len(ds), classes=classes,
                        latent_shape=list(latent_shape), batch_size=bs)
        with Kept(keep, settings, who="encoding of the dataset") as kept:
            done = kept.start(bs, len(ds), keep_old=not kept.differ())  # (another key's are dropped)
            if done:
                tqdm.write(f"the latent cache: continuing the encoding from image {done} of {len(ds)} ({keep})")
            rest = torch.utils.data.Subset(ds, range(done, len(ds)))
            loader = torch.utils.data.DataLoader(rest, batch_size=bs, num_workers=args.num_workers)
            try:
                with torch.no_grad():
                    for x, y in tqdm(loader, desc="encoding dataset (once)"):
                        x = x.to(device)
                        z = [encode_latents(vae, view).half().cpu() for view in (x, x.flip(-1))]  # both flips
                        kept.add(dict(z=torch.cat(z), y=torch.cat([y, y])), len(x))
            except UnreadableImage as e:  # (from a worker, the message ends with the file and the reason)
                fail(f"cannot read an image in --data: {str(e).strip().splitlines()[-1].split('UnreadableImage: ')[-1]}")
            except KeyboardInterrupt:
                kept.flush()  # the next run continues from here
                raise
            kept.flush()
            data = dict(z=torch.cat([p["z"] for p in kept.parts]), y=torch.cat([p["y"] for p in kept.parts]),
                        classes=classes, key=settings["key"])
        atomic_save(data, cache)
        shutil.rmtree(keep)
        return data


def cache_problem(data, n_images, classes, latent_shape, key=None):
    """What is wrong with a loaded latent cache, or None: it must hold both flips of every image,
    latents of the VAE's shape and labels of the data's classes, and the key of this data and VAE."""
    if not isinstance(data, dict) or not {"z", "y", "classes"} <= set(data):
        return "not a latent cache"
    if key is not None and data.get("key") != key:
        return "of other data or another VAE (its key differs)"
    z, y = data["z"], data["y"]
    if tuple(z.shape) != (2 * n_images, *latent_shape) or tuple(y.shape) != (2 * n_images,):
        return f"of latents {tuple(z.shape)}, not the {2 * n_images} x {latent_shape} of this data and VAE"
    if data["classes"] != list(classes) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(classes)):
        return "labelled with other classes"
    if not z.isfinite().all():
        return "not finite"
    return None


def check_images(ds):
    """Every image of an image folder opens and passes PIL's check (0.3 ms per small PNG), so that a
    bad file stops the run before the encoding, not in the middle of it."""
    from PIL import Image
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    if not hasattr(base, "samples"):  # ImageNet .npz batches are checked as they are opened
        return
    paths = [base.samples[i][0] for i in ds.indices] if isinstance(ds, torch.utils.data.Subset) else [p for p, _ in base.samples]
    for path in tqdm(paths, desc="checking images", **({"disable": True} if len(paths) < 10_000 else {})):
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:
            fail(f"cannot read an image in --data: {path}: {type(e).__name__}: {e}".replace("\n", " "))


@functools.lru_cache(maxsize=None)
def vae_decode(vae):
    """lpl.decoder_taps' decode (the family's de-normalisation, the one the loss decodes through),
    built once per autoencoder rather than on every call of the RGB loss or the sampler."""
    return decoder_taps(vae)[1]


def decode_raw(vae, z):
    """Diffusion-scale latents -> the decoder's output, in [-1, 1] up to overshoot."""
    return vae_decode(vae)(z.to(next(vae.parameters()).dtype))


def decode(vae, z):
    """Diffusion-scale latents -> images in [0, 1]."""
    return (decode_raw(vae, z).float() / 2 + 0.5).clamp(0, 1)


def atomic_save(obj, path):
    """Write to a temp file and rename: an interrupted save never corrupts the last checkpoint. The
    temporary name is unique, so two processes writing the same file never write into one another."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------ a toy dataset, offline
def make_toy(out, classes=("circle", "square", "stripes"), per_class=64, size=16, seed=0):
    """Synthetic PNGs in ImageFolder layout (a shape per class, in random colours and places) and a
    tiny random AutoencoderKL (factor 2) saved with save_pretrained: everything the quick start
    needs, made here, with no download. It shows the pipeline working, not a model. Its scaling_factor
    is 1 / std of the images' latent means, as train_vae.py sets it (the diffusers default, 0.18215,
    would give this autoencoder latents of std 0.05: the wrong-scale trap of the README)."""
    from diffusers import AutoencoderKL
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(out, "images", name), exist_ok=True)
        for i in range(per_class):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size / 2, size / 2, size / 4]) + size / 4).tolist()
            shape = [((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r), ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r),
                     ((xx + yy) // 3) % 2 == 0][c]
            fg, bg = torch.rand(2, 3, generator=g)
            img = torch.where(shape[..., None], fg, bg)  # (size, size, 3) in [0, 1]
            Image.fromarray((img * 255).round().to(torch.uint8).numpy()).save(os.path.join(out, "images", name, f"{i}.png"))
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4).eval()
    files = sorted(glob.glob(os.path.join(out, "images", "*", "*.png")))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()) for f in files])  # (N, H, W, 3)
    with torch.no_grad():
        means = vae.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean  # (N, 4, h, w), raw scale
    vae.register_to_config(scaling_factor=1 / means.std().item())
    vae.save_pretrained(os.path.join(out, "vae"))


def main(argv=None):
    from cli import HelpFormatter, Int, Parser, Path
    p = Parser(description="python data.py toy OUT: a synthetic dataset and a tiny random autoencoder "
               "(the offline quick start)", formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", formatter_class=HelpFormatter, help="synthetic PNGs and a tiny AutoencoderKL")
    toy.add_argument("out", type=Path("out-dir"), help="writes OUT/images (ImageFolder) and OUT/vae (save_pretrained)")
    toy.add_argument("--per-class", type=Int(1, 100000), default=64, help="images per class (3 classes)")
    args = p.parse_args(argv)
    if args.per_class < 1:
        fail(f"--per-class must be >= 1, got {args.per_class}")
    if os.path.exists(os.path.join(args.out, "images")) or os.path.exists(os.path.join(args.out, "vae")):
        fail(f"{args.out} already holds a toy dataset (images/ or vae/): pick another folder")
    make_toy(args.out, per_class=args.per_class)
    print(f"wrote {args.out}/images (3 classes x {args.per_class} PNGs of 16x16) and {args.out}/vae")


if __name__ == "__main__":
    from cli import entry
    entry(main)
