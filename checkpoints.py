"""Run folders and checkpoints: a checkpoint describes its run (arguments, model config, classes,
latent shape, random state), is written whole or not at all (data.atomic_save) and read back with a
one-line error; a run folder (a sample folder) is locked by the one train.py (sample.py) writing to it."""
import contextlib
import fcntl
import hashlib
import json
import os

import torch

from cli import fail


CKPT_KEYS = ("args", "model_config", "step", "model", "ema", "opt", "classes", "latent_shape", "rng")


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        fail(f"no checkpoint at {path!r}")
    except Exception as e:
        fail(f"cannot read checkpoint {path!r} ({type(e).__name__}); it is corrupted or not a train.py checkpoint")
    missing = [k for k in CKPT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CKPT_KEYS)
    if missing:
        fail(f"{path!r} is not a train.py checkpoint (no {', '.join(repr(k) for k in missing)})")
    return ckpt


def all_finite(module):
    return bool(torch.stack([p.isfinite().all() for p in module.parameters()]).all())


def weights_digest(*modules):
    """A fingerprint of the modules' weights (names and values; not files, paths or dates)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def lock_run_dir(run_dir, who="train.py", flag="--run-dir"):
    """An exclusive lock on a folder one command writes to, for this process's lifetime (released on
    exit or kill): a second command on it stops in one line."""
    f = open(os.path.join(run_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another {who} is writing to {run_dir}; wait for it or pick another {flag}")
    return f


@contextlib.contextmanager
def locked(folder, who, flag):
    """lock_run_dir for a block: the lock file goes with the block (it would be litter in the folder)."""
    f = lock_run_dir(folder, who, flag)
    try:
        yield
    finally:
        f.close()
        os.remove(os.path.join(folder, ".lock"))


def make_run_dir(path):
    """Create (or check) the run directory before any work; returns whether it was created."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to the run directory {path!r} ({e.strerror}); pick a writable --run-dir")
    return created


def truncate_log(path, step):
    """Drop log rows past the checkpoint's step (written after it, before a kill), and a last row cut
    short by a kill, so a resume neither logs those steps twice nor trips over half a line."""
    if not os.path.exists(path):
        return
    rows = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a partial or foreign line
            continue
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
