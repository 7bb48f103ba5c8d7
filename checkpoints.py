"""Run folders and checkpoints: a checkpoint describes its run (arguments, model config, classes,
latent shape, random state), is written whole or not at all (data.atomic_save) and read back with a
one-line error; a run folder (a sample folder) is locked by the one train.py (sample.py) writing to it.
Kept: a long loop's results kept as they come (FID features, the latent cache), continued after a kill."""
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time

import torch

from cli import atomic_path, fail


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


class Kept:
    """A long loop's results kept as they come, so that a killed call, run again, computes only what no
    chunk holds (the FID reference's features, the latent cache's latents). In the folder `keep`:
    settings.json (what the results depend on) and chunks NNNNNNNNN-MMMMMMMMM.pt (items N to M, whole
    batches, written whole or not at all): one at the first batch `every` seconds after the last, and
    one by flush() (on Ctrl-C). A SIGKILL loses what the batches since the last chunk computed: less
    than `every` seconds plus one batch. Chunks are only appended, so a short `every` costs files, not
    rewrites. Used as a context manager: one writer (a lock)."""

    def __init__(self, keep, settings, every=20.0, who="call"):
        self.keep, self.settings, self.every, self.who = keep, settings, every, who
        self.parts, self.pending, self.done, self.last = [], [], 0, 0.0

    def __enter__(self):
        os.makedirs(self.keep, exist_ok=True)
        self.lock = locked(self.keep, self.who, "output")
        self.lock.__enter__()
        for f in os.listdir(self.keep):  # writes a kill cut short (cli.atomic_path's temporary names)
            if ".tmp-" in f:
                os.remove(os.path.join(self.keep, f))
        self.chunks = sorted(f for f in os.listdir(self.keep) if f.endswith(".pt"))
        self.found = int(self.chunks[-1][:-3].split("-")[1]) if self.chunks else 0  # items the chunks hold
        try:
            with open(os.path.join(self.keep, "settings.json")) as f:
                self.old = json.load(f)
        except (OSError, ValueError):
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.lock:
            self.lock.__exit__(*exc)

    def discard(self):
        """The results are used: release the lock and remove the folder (it can hold more than the output)."""
        self.lock.__exit__(None, None, None)
        self.lock = None
        shutil.rmtree(self.keep)

    def differ(self):
        """The settings the kept chunks were computed with that differ from this call's (names)."""
        return [k for k in self.settings if (self.old or {}).get(k) != self.settings[k]]

    def start(self, batch_size, total, keep_old=True):
        """Read the chunks back into `parts` (keep_old) or drop them, and record this call's settings;
        returns the first item to compute (a whole number of batches)."""
        if not keep_old:
            for c in self.chunks:
                os.remove(os.path.join(self.keep, c))
            self.chunks, self.found = [], 0
        with atomic_path(os.path.join(self.keep, "settings.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.settings, f, indent=1)
        for c in self.chunks:  # contiguous from 0, each a whole number of batches
            start, end = (int(v) for v in c[:-3].split("-"))
            if start != self.done or (end % batch_size and end != total) or end > total:
                fail(f"{self.keep} holds a chunk that does not follow the others ({c}): delete the folder")
            self.parts.append(torch.load(os.path.join(self.keep, c)))
            self.done = end
        self.last = time.time()
        return self.done

    def add(self, part, n):
        """The result of the next n items; a chunk is written when `every` seconds have passed."""
        self.pending.append((part, n))
        if time.time() - self.last >= self.every:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        parts = [p for p, _ in self.pending]
        part = (torch.cat(parts) if torch.is_tensor(parts[0]) else
                {k: torch.cat([p[k] for p in parts]) for k in parts[0]})  # a tensor, or a dict of tensors
        n = sum(n for _, n in self.pending)
        with atomic_path(os.path.join(self.keep, f"{self.done:09d}-{self.done + n:09d}.pt")) as tmp:
            torch.save(part, tmp)
        self.parts.append(part)
        self.done, self.pending, self.last = self.done + n, [], time.time()


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
