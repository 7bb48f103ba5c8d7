"""Helpers shared by the test files: tiny random autoencoders built from config, synthetic PNGs, a
saved VAE and a pre-trained run (the `assets` fixture), and the one-line-error check. CPU only, offline."""
import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import train


def tiny_vae(blocks=2, latent_channels=4, seed=0, **kw):
    """A random AutoencoderKL with `blocks` levels of 8 channels (factor 2^(blocks-1))."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1,
                         norm_num_groups=4, latent_channels=latent_channels, **kw).eval()


def saved_bytes(fn):
    """Bytes autograd stores for backward while fn runs (outside checkpointed regions)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def write_pngs(folder, classes=("cat", "dog", "ship"), per_class=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(img).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny VAE saved with save_pretrained (and one with 8 latent channels), 3 classes x 8
    synthetic 16x16 PNGs, and a pre-trained run to post-train or resume from."""
    root = tmp_path_factory.mktemp("assets")
    tiny_vae(blocks=2).save_pretrained(root / "vae")
    tiny_vae(blocks=2, latent_channels=8).save_pretrained(root / "vae8")
    write_pngs(root / "data")
    (root / "empty").mkdir()
    train.main(train_args(root, root / "runs" / "pre", "--steps", "2"))
    return root


def train_args(assets, run_dir, *extra):
    return ["--data", str(assets / "data"), "--vae", str(assets / "vae"), "--image-size", "16",
            "--model", "DiT-T/2", "--batch-size", "8", "--run-dir", str(run_dir), "--log-every", "1",
            "--sample-every", "1000", *extra]


def read_log(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def load(path):
    return torch.load(path, weights_only=False)


def one_line_error(fn, *args):
    """fn must stop with exactly one line starting 'error:' (an exception would fail the test)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert "error:" in msg and "\n" not in msg, msg
    return msg


class _ColourMeans(torch.nn.Module):  # a stand-in FID network: 3-d features
    def forward(self, x):
        return x.mean((2, 3))


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
