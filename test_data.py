"""data.py and train_vae.py: the latent cache, image folders and ImageNet batches, images of any
depth and mode, the toy data of the quick start, the CIFAR-10 autoencoder recipe."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import data
import fid
import train
from conftest import load, one_line_error, read_log, train_args, write_pngs


# ---------------------------------------------------------------- the latent cache
def test_lpl_off_logs_no_lpl_and_cache_is_reused(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "a", "--steps", "2"))
    caches = list(tmp_path.glob("latents-*.pt"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    train.main(train_args(assets, tmp_path / "b", "--steps", "1"))
    assert caches[0].stat().st_mtime_ns == mtime  # same data + VAE: encoded once
    assert all("loss_lpl" not in r and "lpl_share" not in r for r in read_log(tmp_path / "a"))  # not "measured: 0"
    z = torch.load(caches[0])["z"]
    assert z.shape == (48, 4, 8, 8)  # 24 images x 2 flips


def test_cache_key_follows_the_vae_weights_not_their_dates(assets, tmp_path):
    """The key reads the VAE's weights, not their dates (a model folder provisioned again keeps its
    latents, and its runs can resume); one changed bit changes it. A post-training in another folder,
    and its resume, reuse its pre-training's latents instead of encoding the data again."""
    vae_dir, files = tmp_path / "vae", [str(p) for p in sorted((assets / "data").rglob("*.png"))]
    shutil.copytree(assets / "vae", vae_dir)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    key = lambda: os.path.basename(data.cache_path(argparse.Namespace(  # noqa: E731
        vae=str(vae_dir), images_per_class=None, image_size=16, run_dir=str(tmp_path / "r")), vae, files))
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    before = key()
    os.utime(weights, (0, 0))  # copied without its dates
    assert key() == before
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the weights
    weights.write_bytes(bytes(raw))
    assert key() != before
    (pre_cache,) = (assets / "runs").glob("latents-*.pt")
    train.main(train_args(assets, tmp_path / "elsewhere" / "post", "--steps", "1",
                          "--init-from", str(assets / "runs" / "pre")))
    assert not list((tmp_path / "elsewhere").glob("latents-*.pt"))  # nothing encoded again
    assert load(tmp_path / "elsewhere" / "post" / "ckpt.pt")["args"]["latent_cache"] == str(pre_cache)
    train.main(["--resume", str(tmp_path / "elsewhere" / "post"), "--steps", "2"])  # and so does its resume
    assert not list((tmp_path / "elsewhere").glob("latents-*.pt"))


def test_images_per_class_takes_the_first_of_each_class(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "4", "--images-per-class", "2"))
    (cache,) = tmp_path.glob("latents-*.pt")
    data = torch.load(cache)
    assert data["y"].tolist() == [0, 0, 1, 1, 2, 2] * 2  # the 6 images, then their mirrors
    ref = torch.load(next(assets.glob("runs/latents-*.pt")))  # all 8 per class, in one batch
    torch.testing.assert_close(data["z"][:2], ref["z"][:2])  # images 0, 1 of class 0
    torch.testing.assert_close(data["z"][2:4], ref["z"][8:10])  # images 0, 1 of class 1


def test_imagenet_npz_batches_are_encoded_file_by_file(assets, tmp_path):
    """Two official-format batches (6 + 4 images): the latents are those of the area-resized images,
    in file order, with labels 1..3 mapped to 0..2."""
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (6, 12288), dtype=np.uint8), rng.integers(0, 256, (4, 12288), dtype=np.uint8)]
    labels = [np.array([1, 2, 3, 1, 2, 3]), np.array([3, 3, 1, 2])]
    (tmp_path / "npz").mkdir()
    for k in range(2):
        np.savez(tmp_path / "npz" / f"train_data_batch_{k + 1}.npz", data=data[k], labels=labels[k])
    argv = ["--data", str(tmp_path / "npz"), *train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "4")[2:]]
    train.main(argv)
    (cache,) = tmp_path.glob("latents-*.pt")
    got = torch.load(cache)
    x = torch.from_numpy(np.concatenate(data)).view(-1, 3, 64, 64).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="area")
    vae = AutoencoderKL.from_pretrained(str(assets / "vae"), low_cpu_mem_usage=False)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(got["z"][:10].float(), z, atol=2e-3, rtol=1e-2)  # cached in fp16
    torch.testing.assert_close(got["z"][10:].float(), vae.encode(x.flip(-1)).latent_dist.mean.detach()
                               * vae.config.scaling_factor, atol=2e-3, rtol=1e-2)
    assert got["y"].tolist() == (np.concatenate(labels) - 1).tolist() * 2 and got["classes"] == ["0", "1", "2"]
    train.main(["--data", str(tmp_path / "npz"), *train_args(assets, tmp_path / "r2", "--steps", "1",
                                                              "--batch-size", "2", "--images-per-class", "1")[2:]])
    (small,) = [c for c in tmp_path.glob("latents-*.pt") if c != cache]
    assert torch.load(small)["y"].tolist() == [0, 1, 2] * 2  # the first image of each class


def test_cache_follows_the_data_and_survives_truncation(assets, tmp_path, capsys):
    data = tmp_path / "data"
    write_pngs(data, classes=("a", "b"), per_class=4)
    args = lambda run, *x: ["--data", str(data), *train_args(assets, tmp_path / run, *x)[2:]]  # noqa: E731
    train.main(args("r1", "--steps", "1"))
    write_pngs(data, classes=("a", "b", "c", "d"), per_class=5, seed=1)  # the folder grows: 20 images, 4 classes
    train.main(args("r2", "--steps", "1"))
    caches = sorted(tmp_path.glob("latents-*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert len(caches) == 2
    new = torch.load(caches[-1])
    assert new["z"].shape[0] == 40 and new["classes"] == ["a", "b", "c", "d"]
    assert load(tmp_path / "r2" / "ckpt.pt")["model_config"]["num_embeds_ada_norm"] == 4
    caches[-1].write_bytes(caches[-1].read_bytes()[:100])  # a kill during the write of the cache
    train.main(["--resume", str(tmp_path / "r2"), "--steps", "2"])  # resume re-encodes, says so
    assert "is unreadable" in "".join(capsys.readouterr())
    assert torch.equal(torch.load(caches[-1])["z"], new["z"])


# ================================================================ train_vae.py
def test_train_vae_writes_a_usable_autoencoder_with_measured_metrics(assets, tmp_path):
    import train_vae
    from diffusers import AutoencoderKL
    out = tmp_path / "vae"
    argv = ["--data", str(assets / "data"), "--test-data", str(assets / "data"), "--out", str(out),
            "--image-size", "16", "--batch-size", "4", "--warmup", "1", "--ckpt-every", "1"]
    train_vae.main([*argv, "--steps", "2"])
    assert "holds a training state" in one_line_error(train_vae.main, [*argv, "--steps", "3"])
    train_vae.main([*argv, "--steps", "3", "--resume"])  # continues from step 2
    assert torch.load(out / "train-state.pt", weights_only=False)["step"] == 3
    vae = AutoencoderKL.from_pretrained(str(out), low_cpu_mem_usage=False).eval()
    assert vae.config.latent_channels == 4 and 2.5e6 < sum(p.numel() for p in vae.parameters()) < 3e6
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in sorted((assets / "data").glob("*/*.png"))])  # ImageFolder's order
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
    assert z.shape == (24, 4, 4, 4)
    metrics_json = json.load(open(out / "metrics.json"))
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=1e-4)
    psnr = (10 * torch.log10(1 / ((rec - x) / 2).square().flatten(1).mean(1))).mean().item()
    assert metrics_json["test_psnr_db"] == pytest.approx(psnr, abs=0.01)
    assert (out / "reconstructions.png").exists()
    # and train.py takes it as --vae
    train.main(train_args(assets, tmp_path / "run", "--vae", str(out), "--steps", "1", "--loss", "lpl"))



def test_train_vae_by_default_keeps_a_short_run_resumable(assets, tmp_path, monkeypatch):
    """A kill loses at most a tenth of a run when --ckpt-every is not given (it was a fixed 500, so
    a 400-step stage kept nothing until its end); long runs still save every 500 steps."""
    import train_vae
    argv = ["--data", str(assets / "data"), "--test-data", str(assets / "data"), "--image-size", "16"]
    assert [train_vae.get_args([*argv, "--out", "o", "--steps", str(n)]).ckpt_every
            for n in (3, 20, 400, 3000, 100000)] == [1, 2, 40, 300, 500]

    class Killed(Exception):
        pass

    class KillAtStep7(train_vae.tqdm):  # the bar is updated once per optimizer step
        def __init__(self, *a, **k):
            super().__init__(*a, **dict(k, disable=False))  # (a disabled bar counts nothing: TQDM_DISABLE=1)

        def update(self, n=1):
            super().update(n)
            if self.n == 7:
                raise Killed
    monkeypatch.setattr(train_vae, "tqdm", KillAtStep7)
    out = tmp_path / "vae"
    argv += ["--out", str(out), "--batch-size", "2", "--warmup", "1", "--steps", "20"]
    with pytest.raises(Killed):
        train_vae.main(argv)
    assert torch.load(out / "train-state.pt", weights_only=False)["step"] == 6


def test_toy_dataset_makes_the_offline_quick_start(tmp_path):
    import data
    data.main(["toy", str(tmp_path / "toy"), "--per-class", "4"])
    classes = sorted(os.listdir(tmp_path / "toy" / "images"))
    assert classes == ["circle", "square", "stripes"] and len(os.listdir(tmp_path / "toy" / "images" / "square")) == 4
    train.main(["--data", str(tmp_path / "toy" / "images"), "--vae", str(tmp_path / "toy" / "vae"), "--image-size", "16",
                "--model", "DiT-T/2", "--batch-size", "8", "--steps", "2", "--loss", "lpl", "--sample-every", "1000",
                "--run-dir", str(tmp_path / "runs" / "quick")])
    assert load(tmp_path / "runs" / "quick" / "ckpt.pt")["latent_shape"] == (4, 8, 8)
    assert "already holds a toy dataset" in one_line_error(data.main, ["toy", str(tmp_path / "toy")])
    # in the diffusion model's scale its latents have unit spread (issue 40: 0.049 with the default factor)
    from lpl import encode_latents
    vae = AutoencoderKL.from_pretrained(tmp_path / "toy" / "vae").eval()
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy())
                     for f in sorted((tmp_path / "toy" / "images").glob("*/*.png"))]).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert abs(encode_latents(vae, x.float() / 127.5 - 1).std().item() - 1) < 1e-4


# ---------------------------------------------------------------- no silent wrong answer, no lost work, no hang
def _png16_rgb(path, arr):
    """A 16-bit RGB PNG written by hand (PIL cannot write one): arr (H, W, 3) uint16."""
    import struct
    import zlib
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_images_of_any_depth_and_mode_read_as_what_they_show(tmp_path):
    """16-bit grayscale became white (every pixel 255) through PIL's convert("RGB"); 16-bit RGB,
    palette, grayscale and transparent images must all read as the picture they show."""
    ramp = np.arange(16 * 16, dtype=np.float64).reshape(16, 16) / 255  # 0..1
    gray8 = np.round(ramp * 255).astype(np.uint8)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    rgb16 = np.stack([np.round(ramp * 65535)] * 3, -1).astype(np.uint16)
    rgb16[..., 2] = 65535 - rgb16[..., 2]
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    pal = Image.fromarray(gray8, "P")  # palette indices 0..255 into a gray palette
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(tmp_path / "p.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3], rgba[8:, :, 3] = 200, 255, 0  # red on top; below, invisible red
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected_gray = np.stack([gray8] * 3, -1)
    for name in ("g16", "g8", "p"):
        np.testing.assert_array_equal(np.asarray(data.load_rgb(tmp_path / f"{name}.png")), expected_gray, err_msg=name)
    got = np.asarray(data.load_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got[..., 0] - gray8).max() <= 1 and np.abs(got[..., 2] - (255 - gray8)).max() <= 1
    got = np.asarray(data.load_rgb(tmp_path / "rgba.png"))
    assert (got[:8] == [200, 0, 0]).all() and (got[8:] == 255).all()  # transparent = the white page
    # and the trainer's loader and metrics.py read them the same way
    assert np.array_equal(np.asarray(data.read_rgb(str(tmp_path / "g16.png"))), expected_gray)
    batch = next(fid.read_images([str(tmp_path / "g16.png")]))
    assert batch.shape == (1, 3, 16, 16) and np.array_equal(batch[0].permute(1, 2, 0).numpy(), expected_gray)


def test_first_runs_side_by_side_share_one_encoding(assets, tmp_path):
    """Two first runs in one parent folder: the second waits for the first one's latent cache
    instead of racing it on one temporary file; both train."""
    data = tmp_path / "data"
    write_pngs(data, per_class=24)
    argv = lambda run: [sys.executable, "train.py", *train_args(assets, tmp_path / "runs" / run, "--steps", "1")[:1],  # noqa: E731
                        str(data), *train_args(assets, tmp_path / "runs" / run, "--steps", "1")[2:]]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv(r), cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ("a", "b")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list((tmp_path / "runs").glob("latents-*.pt"))) == 1
    assert not list((tmp_path / "runs").glob("*.tmp"))


def test_a_killed_encoding_is_continued_by_the_next_run(assets, tmp_path, monkeypatch):
    """The latents are kept as they come: a run stopped in its 3rd batch of encoding leaves two, the
    next run encodes only the rest, and the cache equals one encoding's to the last bit."""
    images = tmp_path / "data"
    write_pngs(images, per_class=70)  # 210 images: batches of 64, 64, 64, 18
    calls = []
    real = data.encode_latents

    def counted(vae, x, *a, **k):
        calls.append(len(x))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(vae, x, *a, **k)
    monkeypatch.setattr(data, "encode_latents", counted)
    args = lambda run: [str(images) if a == str(assets / "data") else a for a in train_args(assets, run, "--steps", "1")]  # noqa: E731
    stop_at = 5  # the 3rd batch's first view
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train.main(args(tmp_path / "a" / "r1"))
    (parts,) = (tmp_path / "a").glob("latents-*.parts")
    assert sorted(p.name for p in parts.glob("*.pt")) == ["000000000-000000128.pt"]
    stop_at, calls[:] = None, []
    train.main(args(tmp_path / "a" / "r2"))
    assert calls == [64, 64, 18, 18], calls  # the 3rd and 4th batches, both flips of each
    assert not parts.exists()
    calls[:] = []
    train.main(args(tmp_path / "b" / "r"))  # one encoding, elsewhere
    assert calls == [64, 64] * 3 + [18, 18]
    (c1,), (c2,) = (tmp_path / "a").glob("latents-*.pt"), (tmp_path / "b").glob("latents-*.pt")
    one, two = torch.load(c1), torch.load(c2)
    assert torch.equal(one["z"], two["z"]) and torch.equal(one["y"], two["y"]) and one["key"] == two["key"]


def test_bad_caches_and_half_written_logs_are_recovered(assets, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    train.main(train_args(assets, run, "--steps", "2", "--ckpt-every", "1"))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss_d')  # a kill in the middle of a log row
    (cache,) = (tmp_path / "runs").glob("latents-*.pt")
    good = torch.load(cache)
    bad = dict(good, z=good["z"][:, :, :2])  # latents of another shape
    torch.save(bad, cache)
    train.main(["--resume", str(run), "--steps", "3"])
    assert "encoding the data again" in capsys.readouterr().out
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert torch.equal(torch.load(cache)["z"], good["z"])
    torch.save(dict(good, y=good["y"] + 10), cache)  # labels out of range
    train.main(["--resume", str(run), "--steps", "4"])
    assert "labelled with other classes" in capsys.readouterr().out
