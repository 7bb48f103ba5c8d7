"""Command-line plumbing shared by the scripts: argparse with every default in --help, one-line
errors for bad input, the checked types every option is declared with, and the process: the rank
torchrun gives it and its device.

Every option of every entry point takes one of the checked types below (or argparse's `choices`,
or is a switch), so a value is refused by the parser, in one line naming the option, the value and
what would be accepted, before any work: `Int(1)` for counts, `Float(0, 1)` for shares, `SEED` for
seeds, `Path(...)` for files and folders. test_cli.py walks every parser and tries the values of
each kind on every option, so a new option is covered without writing a case.
"""
import argparse
import contextlib
import errno
import math
import os
import re
import sys
import time

# torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `python train.py` is one rank of one.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # argparse takes "-1" and "-.5" as numbers but "-1e-4" as an option name; these take all three
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # one line, not the whole usage block
        sys.exit(f"{self.prog}: error: {' '.join(message.split())} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # options defaulting to None say in words what they default to
        return action.help if action.default is None else super()._get_help_string(action)


def fail(msg):
    """A one-line error for bad input: no traceback, nothing lost. Under torchrun every rank stops;
    rank 0 says why (the ranks check the same things)."""
    if RANK != 0:
        # torchrun stops every rank once one exits: a rank that left first could cut rank 0 off before
        # it printed why. So the others wait; rank 0's exit ends them (the wait is a bound, not a cost).
        time.sleep(60)
        sys.exit(1)
    sys.exit(f"error: {' '.join(str(msg).split())}")


# ------------------------------------------------------------------------------ checked types
class Checked:
    """An argparse `type`: turns the string into a value or raises ArgumentTypeError saying what
    would be accepted. `accepts` is that description (also for tests)."""
    accepts = "a value"

    def __call__(self, text):
        raise NotImplementedError

    def __repr__(self):  # argparse names the type in its messages
        return self.accepts

    def refuse(self, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not {self.accepts}")


class Int(Checked):
    """An integer in [lo, hi]: counts, sizes, indices. The default upper bound keeps every count
    far inside what torch, numpy and a disk can hold (a typo of 10^12 samples is refused, not run)."""

    def __init__(self, lo=None, hi=10 ** 9):
        self.lo, self.hi = lo, hi
        bounds = [f">= {lo}" if lo is not None else "", f"<= {hi:,}" if hi is not None else ""]
        self.accepts = "an integer " + " and ".join(b for b in bounds if b)

    def __call__(self, text):
        try:
            v = int(text)
        except (TypeError, ValueError):
            self.refuse(text)
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            self.refuse(text)
        return v


SEED = Int(0, 2 ** 31 - 1)  # torch, numpy and the trainer's derived seeds (seed·1000 + epoch) all hold it


class Float(Checked):
    """A finite number in [lo, hi] (open at either end with lo_open / hi_open). Like Int, bounded by
    default: no weight, scale or threshold of these scripts means anything beyond 10^9."""

    def __init__(self, lo=-10 ** 9, hi=10 ** 9, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
        self.accepts = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def __call__(self, text):
        try:
            v = float(text)
        except (TypeError, ValueError):
            self.refuse(text)
        if not math.isfinite(v):
            self.refuse(text)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            self.refuse(text)
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            self.refuse(text)
        return v


POSITIVE = Float(0, lo_open=True)
SHARE = Float(0, 1)


class Path(Checked):
    """A path, checked for what it must be before any work.

    kind: "file" (an existing file), "dir" (an existing folder), "new-file" (a file to write: its folder
    exists and is writable; with ext, the name ends in one of them), "out-file" (as new-file, or one that
    exists: for a command that continues or checks it, and refuses it otherwise), "out-dir" (a folder to write into:
    it exists and is writable, or can be created), "any" (a file or a folder that exists).
    hub=True also accepts a Hugging Face id (org/name or org/name/subfolder) that is no local path."""

    def __init__(self, kind, ext=(), hub=False, words=()):
        self.kind, self.ext, self.hub, self.words = kind, tuple(ext), hub, tuple(words)
        self.accepts = {"file": "an existing file", "dir": "an existing folder", "any": "an existing file or folder",
                        "new-file": "a file name in a writable folder", "out-file": "a file name in a writable folder",
                        "out-dir": "a writable folder"}[kind]
        if self.ext:
            self.accepts += f" ending in {' or '.join(self.ext)}"
        if hub:
            self.accepts += " or a Hugging Face id (org/name)"
        if self.words:
            self.accepts += "".join(f" or {w!r}" for w in self.words)

    def __call__(self, text):
        if text in self.words:
            return text
        if not text or "\0" in text:
            raise argparse.ArgumentTypeError(f"{text!r} is not a path")
        path = os.path.expanduser(text)
        if self.hub and not os.path.exists(path) and is_hub_id(text):
            return text
        if self.ext and not text.lower().endswith(self.ext):
            raise argparse.ArgumentTypeError(f"{text!r} does not end in {' or '.join(self.ext)}")
        if self.kind == "file" and not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{text!r} is {'a folder' if os.path.isdir(path) else 'missing'}, "
                                             f"not {self.accepts}")
        if self.kind == "dir" and not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{text!r} is {'a file' if os.path.exists(path) else 'missing'}, "
                                             f"not {self.accepts}")
        if self.kind == "any" and not os.path.exists(path):
            raise argparse.ArgumentTypeError(f"{text!r} does not exist (expected {self.accepts})")
        if self.kind in ("new-file", "out-file"):
            if os.path.isdir(path):
                raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
            if os.path.exists(path) and self.kind == "new-file":  # outputs are never replaced in silence
                raise argparse.ArgumentTypeError(f"{text!r} exists: remove it or pick another name")
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
            if not os.access(folder, os.W_OK):
                raise argparse.ArgumentTypeError(f"the folder of {text!r} is not writable")
        if self.kind == "out-dir":
            if os.path.exists(path) and not os.path.isdir(path):
                raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
            probe = path
            while not os.path.exists(probe):  # the deepest folder that exists must be writable
                probe = os.path.dirname(os.path.abspath(probe))
            if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
                raise argparse.ArgumentTypeError(f"{text!r} cannot be written ({probe!r} is not a writable folder)")
        return text


class Name(Checked):
    """A short name: letters, digits, '.', '-' and '_' (an arm of a table, a study)."""
    accepts = "a name of letters, digits, '.', '-' and '_'"

    def __call__(self, text):
        if not re.fullmatch(r"[\w.-]{1,100}", text or ""):
            self.refuse(text)
        return text


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path` (with its extension, so savers pick the format) that becomes
    `path` only when the block finishes: a reader sees the whole output or none, never half of it."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def entry(main):
    """Run an entry point's main: Ctrl-C and a full disk end it in one line, as bad input does.
    Outputs are written whole or not at all (atomic_path, atomic_save), so nothing is half written."""
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted; what was finished is kept, and nothing is half written")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"the disk is full ({e.filename or 'writing an output'}): what was written before is kept, the "
                 f"output being written was dropped; free some space and run the command again")
        raise


def is_hub_id(name):
    """org/name or org/name/subfolder: word characters, dots and dashes, nothing that looks local."""
    return (not name.startswith(("/", ".", "~")) and 1 <= name.count("/") <= 2
            and re.fullmatch(r"[\w.-]+(/[\w.-]+){1,2}", name) is not None)


class Device(Checked):
    """cpu, cuda, cuda:N or mps, and present on this machine."""
    accepts = "a device: cpu, cuda, cuda:N or mps, present on this machine"

    def __call__(self, text):
        import torch
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError, TypeError):
            self.refuse(text)
        if dev.type not in ("cpu", "cuda", "mps"):
            self.refuse(text)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise argparse.ArgumentTypeError(f"{text!r}: {torch.cuda.device_count()} CUDA device(s) are visible here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
        return text


DEVICE = Device()


def requires(args, explicit, table):
    """Options that mean something only with another option's value: given without it they would be
    ignored in silence, so they are refused. table: {dest: (other dest, allowed values, hint)}."""
    idle = {}
    for dest, (other, allowed, hint) in table.items():
        if dest in explicit and getattr(args, other) not in allowed:
            idle.setdefault((other, hint), []).append("--" + dest.replace("_", "-"))
    for (other, hint), flags in idle.items():
        fail(f"{' '.join(flags)} act{'s' if len(flags) == 1 else ''} only with {hint}; this run has "
             f"--{other.replace('_', '-')} {getattr(args, other)}, so {'it' if len(flags) == 1 else 'they'} "
             f"would be ignored: drop {'it' if len(flags) == 1 else 'them'}")


def explicit_dests(parser, argv):
    """The dests given on the command line (not left at their defaults)."""
    import copy
    q = copy.deepcopy(parser)
    for action in q._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    q.error = lambda message: None
    ns, _ = q.parse_known_args(argv)
    return set(vars(ns))


# ------------------------------------------------------------------------------ torchrun (DDP)
# Every rank draws the whole global batch (its indices, dropped labels, t and noise: one random
# stream, the same as a single process) and trains on its own slice, so N ranks follow a one-rank run
# sample for sample and --resume stays exact. DistributedDataParallel averages the gradients; rank 0
# alone writes.
def init_distributed(device):
    """The process group (nccl on CUDA, gloo on CPU) and this rank's device."""
    if WORLD == 1:
        return device
    import datetime

    import torch
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # the other ranks wait at a barrier while rank 0 encodes the dataset once (ImageNet: long)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return device


def barrier():
    if WORLD > 1:
        import torch.distributed
        torch.distributed.barrier()


def mean_over_ranks(x):
    """x averaged over the ranks (x itself on one)."""
    if WORLD > 1:
        import torch.distributed
        torch.distributed.all_reduce(x)
        x = x / WORLD
    return x


def pick_device(name=None):
    """A torch device from --device (None: cuda, else mps, else cpu), checked to exist here."""
    import torch
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"--device {name!r} is not a device name: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: train.py runs on cpu, cuda or mps")
    return dev
