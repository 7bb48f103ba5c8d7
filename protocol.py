"""Run a protocol: every training run, score, table and figure of one study, from one command.

    python protocol.py protocols/smoke.py              # minutes on a CPU; CI runs it
    python protocol.py protocols/cifar10-cpu.py --jobs 2
    python protocol.py protocols/cifar10-gpu.py --dry-run   # the plain commands, to run by hand

A protocol is a small Python file (protocols/*.py) naming the data, the autoencoder, the base run,
the post-training arms, the training seeds and the scoring. The driver turns it into stages (the
autoencoder, the FID reference, each base run, each post-training, each score, the tables and
figures) and runs those that are not done, and only those:

- Kill it at any moment (SIGKILL included) and give the same command again: an unfinished training
  run resumes from its checkpoint, a score from its samples, the FID reference from its features; a
  finished stage is never redone. A stage is done when its record in RESULTS/stages/ exists *and*
  names the same command as the protocol file now gives; a protocol file changed over finished
  stages is refused in one line (or, with --redo-changed, they re-run).
- Before any work it prints the plan: every stage, its state (done / at step k / to do) and a
  projected wall time from timings measured by earlier stages (this machine's first, then the
  protocol file's own `timings`).
- --dry-run prints the train.py / sample.py / metrics.py commands it would run, and nothing else.
- --jobs N runs N independent stages at once: one per GPU (CUDA_VISIBLE_DEVICES), or on a CPU N
  processes of cores/N threads each (two 1-thread jobs train 1.4x faster than one 2-thread job on 2
  cores).

Small results go to results/NAME/ (committed: score files, training logs, tables, figures, the
manifest); checkpoints, samples and data to runs/NAME/ (never committed). A protocol never writes
outside those two folders. The protocol file's schema, its stages and their records: plan.py.
"""
import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from cli import DEVICE, HelpFormatter, Int, Parser, Path, fail
from plan import (HERE, Paths, ProtocolError, artifact_hash, build_stages, copy_atomic, data_needs, host, load_protocol,
                  read_json, train_progress, vae_step, write_atomic)


# ------------------------------------------------------------------------------ the driver
class Driver:
    def __init__(self, cfg, paths, jobs, device=None, redo=False, out=functools.partial(print, flush=True)):
        self.cfg, self.paths, self.jobs, self.device, self.redo, self.say = cfg, paths, jobs, device, redo, out
        self.stages = build_stages(cfg)
        self.by_name = {s.name: s for s in self.stages}
        self.host = host()

    # -------------------------------------------------------------- what is done
    def record(self, stage):
        return read_json(self.paths.record(stage))

    def done(self, stage):
        rec = self.record(stage)
        return rec is not None and rec.get("key") == stage.key

    def artifact_ready(self, stage):
        """Done, and what it left for later stages is still here (a new machine has lost it)."""
        return self.done(stage) and (stage.artifact is None or os.path.exists(self.paths.fill(stage.artifact)))

    def changed(self):
        """Stages finished under another command than the protocol now gives."""
        out = []
        for s in self.stages:
            rec = self.record(s)
            if rec is not None and rec.get("key") != s.key:
                out.append((s, rec))
        return out

    def needed(self):
        """The stages to run: every stage not done, and what they need that is not at hand, in order."""
        need = set()

        def want(s):
            if s.name in need:
                return
            need.add(s.name)
            for d in s.deps:
                dep = self.by_name[d]
                if not self.artifact_ready(dep):
                    want(dep)
        for s in self.stages:
            if not self.done(s):
                want(s)
        return [s for s in self.stages if s.name in need]

    def inputs_of(self, stage):
        """The fingerprints of what a stage reads, as the finished stages recorded them."""
        return {d: (self.record(self.by_name[d]) or {}).get("artifact_hash") for d in stage.deps}

    def check_pairing(self, stage):
        """A stage must read the same base model, autoencoder and reference as its finished siblings:
        on a new machine a re-made base can differ in its last bits, and pairing runs by seed then
        compares runs of two base models."""
        for d in stage.deps:
            now = (self.record(self.by_name[d]) or {}).get("artifact_hash")
            stale = [o for o in self.stages if o is not stage and (self.record(o) or {}).get("inputs", {}).get(d)
                     not in (None, now)] if now else []
            if not stale:
                continue
            if self.redo:  # the finished stages that read the old one, and all that read them, are to do again
                gone = {o.name for o in stale}
                for o in self.stages:  # (stages come in dependency order)
                    if set(o.deps) & gone:
                        gone.add(o.name)
                for o in self.stages:
                    if o.name in gone and o is not stage:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(self.paths.record(o))
                        if o.train_dir:  # its checkpoint was trained from the old one
                            shutil.rmtree(self.paths.fill(o.train_dir), ignore_errors=True)
                return (f"{d} was re-made here and differs from the one {len(stale)} finished stage(s) used "
                        f"({', '.join(o.name for o in stale[:4])}, ...): their records are removed (--redo-changed); "
                        f"run the same command again to redo them on the new {d}")
            return (f"{d} was re-made here and differs from the one {stale[0].name} used (fingerprint {now} against "
                    f"{self.record(stale[0])['inputs'][d]}): finishing on it would pair runs of two different {d}s. "
                    f"Run again with --redo-changed to redo the stages that read the old one")
        return None

    # -------------------------------------------------------------- the plan
    def rates(self):
        """Seconds per unit of each timing key: measured here (finished stages' records and runs in
        progress), else measured elsewhere (records), else the protocol file's timings."""
        here, elsewhere = {}, {}
        for s in self.stages:
            rec = self.record(s)
            if rec and rec.get("units") and s.rate:
                (here if rec.get("host") == self.host else elsewhere).setdefault(s.rate, []).append(
                    rec["seconds"] / rec["units"])
        out = {k: (v, "protocol file") for k, v in self.cfg["timings"].items()}
        out.update({k: (statistics.median(v), "measured elsewhere") for k, v in elsewhere.items()})
        out.update({k: (statistics.median(v), "measured here") for k, v in here.items()})
        return out

    def state(self, stage):
        """('done' | 'at step k' | 'to do', units left)."""
        if self.done(stage):
            if stage.artifact and not os.path.exists(self.paths.fill(stage.artifact)):
                return "done (its output is gone: re-made if a later stage needs it)", stage.units
            return "done", 0
        if stage.train_dir:
            d = self.paths.fill(stage.train_dir)
            if os.path.exists(os.path.join(d, "ckpt.pt")):
                step, _ = train_progress(d)
                return f"at step {step} of {stage.steps}", stage.steps - step
        if stage.kind == "vae" and vae_step(self.paths.fill(stage.artifact)):
            step = vae_step(self.paths.fill(stage.artifact))
            return f"at step {step} of {stage.units}", stage.units - step
        k, noun = self.units_kept(stage) if self.continues(stage) else (0, "")
        if k:
            return f"at {noun[:-1]} {k} of {stage.units}", stage.units - k
        return "to do", stage.units

    def attempt(self, stage):
        """Where a resumable stage keeps the key of the attempt that wrote its scratch."""
        return os.path.join(self.paths.work, "attempts", stage.name.replace("/", "__") + ".key")

    def continues(self, stage):
        """A resumable stage continues its scratch only when an attempt under its present key wrote it:
        after a change of command or input, what is there belongs to another stage."""
        if not stage.resume or not any(os.path.exists(self.paths.fill(s)) for s in stage.scratch):
            return False
        with contextlib.suppress(OSError):
            with open(self.attempt(stage)) as f:
                return f.read().strip() == stage.key
        return False

    def units_kept(self, stage):
        """(k, noun): the units a resumable stage's scratch holds so far: a score's PNGs (sample.py writes
        each atomically), the reference's images with features kept (fid.kept_features' chunks)."""
        noun = {"score": "samples", "ref": "images"}.get(stage.kind, "units")
        with contextlib.suppress(OSError):  # (nothing written yet: 0)
            if stage.kind == "score":
                names = os.listdir(self.paths.fill(stage.artifact))
                return sum(f.endswith(".png") and ".tmp-" not in f for f in names), noun
            if stage.kind == "ref":
                names = os.listdir(self.paths.fill(stage.scratch[1]))  # chunks N-M.pt: images N to M
                return max((int(f[:-3].split("-")[1]) for f in names if f.endswith(".pt") and ".tmp-" not in f),
                           default=0), noun
        return 0, noun

    def plan(self):
        need = self.needed()
        rates, lines, seconds = self.rates(), [], {}
        unknown = False
        for s in self.stages:
            st, left = self.state(s)
            if s in need and st.startswith("done"):
                st, left = "to re-make (a later stage needs it)", s.units
            eta = ""
            if s in need:
                r = rates.get(s.rate)
                seconds[s.name] = left * r[0] if left and s.rate and r else 0.0
                if left and s.rate and r:
                    eta = f"~{fmt_time(left * r[0])}"
                elif left and s.rate:
                    unknown, eta = True, "time unknown"
            lines.append(f"  {s.name:<28} {st:<34} {eta}")
        head = (f"protocol {self.cfg['name']}: {len(self.stages) - len(need)}/{len(self.stages)} stages done, "
                f"{len(need)} to run with {self.jobs} job(s) on {self.host}")
        sources = sorted({r[1] for r in rates.values()})
        total = schedule(need, seconds, self.jobs)
        tail = (f"projected: {fmt_time(total)} of wall time"
                f"{' at least (no timing for some stages yet)' if unknown else ''}"
                f" ({', '.join(sources) or 'nothing measured yet'}; {self.jobs} job(s) side by side)")
        return [head, *lines, tail], need

    # -------------------------------------------------------------- running
    def commands(self, stage):
        """The shell commands of a stage, as a reader would type them (resuming where it stopped)."""
        out = []
        if not self.continues(stage):
            out += [f"rm -rf {shlex.quote(self.paths.fill(s))}" for s in stage.scratch if os.path.exists(self.paths.fill(s))]
        if stage.outputs is not None:
            out.append(f"mkdir -p {shlex.quote(self.paths.fill(stage.scratch[0]))}")
        for i, cmd in enumerate(self.argv(stage)):
            line = shlex.join(["python", *cmd])
            if stage.capture:
                line += f" {'>>' if i else '>'} {shlex.quote(self.paths.fill(os.path.join(self.paths.results, stage.capture)))}"
            out.append(line)
        if stage.outputs is not None:
            dest = self.paths.fill(os.path.join(self.paths.results, stage.outputs))
            out.append(f"mv {shlex.quote(self.paths.fill(stage.scratch[0]))}/* {shlex.quote(dest)}/")
        return out

    def argv(self, stage):
        cmds = [[self.paths.fill(a) for a in cmd] for cmd in stage.cmds]
        if self.device:  # where the work runs is no part of what it is (not in the stage's key)
            cmds = [c + ["--device", self.device] if c[0] in ("train.py", "sample.py", "bench.py")
                    or c[:2] == ["metrics.py", "stats"] else c for c in cmds]
        if stage.train_dir:  # a run with a checkpoint continues it
            d = self.paths.fill(stage.train_dir)
            if os.path.exists(os.path.join(d, "ckpt.pt")):
                step, _ = train_progress(d)
                cmds = [] if step >= stage.steps else [["train.py", "--resume", d, "--steps", str(stage.steps)]
                                                        + (["--device", self.device] if self.device else [])]
        if stage.kind == "vae" and os.path.exists(os.path.join(self.paths.fill(stage.artifact), "train-state.pt")):
            cmds = [cmds[0] + ["--resume"]]
        if stage.resume:  # (on an empty scratch it starts from the beginning; launch empties another attempt's)
            cmds = [cmds[0] + [stage.resume], *cmds[1:]]
        return cmds

    def prepare_scratch(self, stage):
        """What an unfinished attempt left: the stage is its only writer, and not done. Removed, unless
        the stage resumes and the attempt ran under its present key (then its command continues it)."""
        if not stage.scratch:
            return
        if not self.continues(stage):
            for scratch in map(self.paths.fill, stage.scratch):
                if os.path.isfile(scratch):
                    os.remove(scratch)
                shutil.rmtree(scratch, ignore_errors=True)
        if stage.outputs is not None:
            os.makedirs(self.paths.fill(stage.scratch[0]), exist_ok=True)
        if stage.resume:
            write_atomic(self.attempt(stage), stage.key + "\n")

    def launch(self, stage, slot, threads, gpus):
        """Start a stage's commands one after the other; their output goes to runs/NAME/logs/STAGE.log
        (stdout to the stage's capture file when its output is kept: scores, tables)."""
        self.prepare_scratch(stage)
        log = os.path.join(self.paths.work, "logs", stage.name.replace("/", "__") + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        capture = None
        if stage.capture:
            capture = os.path.join(self.paths.work, "capture", stage.name.replace("/", "__") + ".txt")
            os.makedirs(os.path.dirname(capture), exist_ok=True)
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
        else:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmds = self.argv(stage)
        with open(log, "a") as f:
            f.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} {stage.name}\n"
                    + "".join(shlex.join([sys.executable, *c]) + "\n" for c in cmds))
        if capture:
            open(capture, "w").close()
        job = dict(stage=stage, start=time.time(), log=log, capture=capture, logf=open(log, "a"), env=env,
                   queue=list(cmds), proc=None)
        self.next_command(job)
        return job

    def next_command(self, job):
        """Start the stage's next command as a direct child of the driver (no shell between them: a
        child dies with the driver, SIGKILL included, and a shell's own children would not)."""
        if not job["queue"]:
            job["proc"] = None
            return
        cmd = job["queue"].pop(0)
        out = open(job["capture"], "a") if job["capture"] else job["logf"]
        job["proc"] = subprocess.Popen([sys.executable, *cmd], cwd=HERE, env=job["env"], stdout=out,
                                       stderr=job["logf"], preexec_fn=die_with_parent, start_new_session=True)
        if out is not job["logf"]:
            out.close()  # (the child holds its own descriptor)

    def finish(self, job):
        """A stage that exited 0: keep its small outputs under results/ and write its record."""
        stage, p = job["stage"], self.paths
        for src, dst in stage.keeps:
            copy_atomic(p.fill(src), os.path.join(p.results, dst))
        if job["capture"]:
            write_atomic(os.path.join(p.results, stage.capture), open(job["capture"]).read())
        if stage.outputs is not None:  # each file renamed into results whole (same file system: work and
            scratch = p.fill(stage.scratch[0])  # results may not be, so copy_atomic, then drop the scratch)
            for f in sorted(os.listdir(scratch)):
                copy_atomic(os.path.join(scratch, f), os.path.join(p.results, stage.outputs, f))
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.time() - job["start"]
        units = stage.units
        if stage.train_dir:  # the seconds of this segment, per step it trained
            units = stage.steps - job.get("from_step", 0)
        elif job.get("written"):  # a continued score or reference: per unit it computed (the rest are read back)
            units = max(1, stage.units - job["written"])
        rec = dict(stage=stage.name, key=stage.key, commands=[shlex.join(["python", *c]) for c in stage.cmds],
                   inputs=self.inputs_of(stage), artifact_hash=artifact_hash(p.fill(stage.artifact)) if stage.artifact else None,
                   seconds=round(seconds, 1), units=units, host=self.host, threads=job["threads"],
                   finished=datetime.datetime.now().isoformat(timespec="seconds"))
        write_atomic(p.record(stage), json.dumps(rec, indent=1) + "\n")
        if stage.resume:  # (done: a later attempt, after a change, starts afresh)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.attempt(stage))

    def run(self):
        need = self.needed()
        gpus = cuda_devices()
        threads = self.cfg.get("threads") or max(1, (os.cpu_count() or 1) // self.jobs)
        running, failed, t0 = [], None, time.time()
        todo = list(need)
        finished = 0

        def ready(s):
            return all(self.artifact_ready(self.by_name[d]) for d in s.deps)
        last_line = 0.0
        while todo or running:
            for job in list(running):
                rc = job["proc"].poll() if job["proc"] is not None else 0
                if rc is None:
                    continue
                if rc == 0 and job["queue"]:  # the stage's next command
                    self.next_command(job)
                    continue
                job["logf"].close()
                running.remove(job)
                if rc == 0:
                    self.finish(job)
                    finished += 1
                    self.say(f"[{fmt_time(time.time() - t0)}] done: {job['stage'].name} "
                             f"({fmt_time(time.time() - job['start'])})")
                    self.manifest()
                else:
                    failed = failed or (job["stage"], rc, job["log"])
            if failed:
                break
            while todo and len(running) < self.jobs:
                s = next((s for s in todo if ready(s)), None)
                if s is None:
                    break
                problem = self.check_pairing(s)
                if problem:
                    failed = (s, None, problem)
                    break
                todo.remove(s)
                from_step, (written, noun) = 0, (0, "")
                if s.train_dir and os.path.exists(os.path.join(self.paths.fill(s.train_dir), "ckpt.pt")):
                    from_step = train_progress(self.paths.fill(s.train_dir))[0]
                if self.continues(s):
                    written, noun = self.units_kept(s)
                # on a CPU, a stage that will run alone gets the cores the others would have had
                others = len(running) + sum(1 for t in todo if ready(t))
                n_threads = threads if self.cfg.get("threads") or gpus else max(
                    threads, (os.cpu_count() or 1) // max(1, min(self.jobs, others + 1)))
                job = self.launch(s, len(running), n_threads, gpus)
                job.update(threads=n_threads, from_step=from_step, written=written)
                running.append(job)
                self.say(f"[{fmt_time(time.time() - t0)}] start: {s.name}"
                         + (f" (from step {from_step})" if from_step else "")
                         + (f" (continuing: {written} of {s.units} {noun} done)" if written else "")
                         + f"  log: {job['log']}")
            if failed:
                break
            if not running and todo:  # nothing can start: a dependency failed to appear
                failed = (todo[0], None, f"{todo[0].name} needs {', '.join(todo[0].deps)}, which did not finish")
                break
            if time.time() - last_line > 300 and running:
                last_line = time.time()
                self.say(f"[{fmt_time(time.time() - t0)}] {finished}/{len(need)} finished; running: "
                         + ", ".join(self.progress(j) for j in running) + f"; {self.eta()}")
            time.sleep(0.5)
        for job in running:  # a failure stops the others where their checkpoints are
            if job["proc"] is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job["proc"].pid, signal.SIGTERM)
                job["proc"].wait()
        if failed:
            stage, rc, info = failed
            if rc is None:
                fail(info)
            last = tail_line(info)
            fail(f"stage {stage.name} failed (exit {rc}): {last} (full log: {info}); fix it and run the same "
                 f"command again: finished stages are kept")

    def eta(self):
        """The projected wall time of what is left, as the plan computes it."""
        lines, _ = self.plan()
        return lines[-1].replace("projected: ", "left: ")

    def progress(self, job):
        s = job["stage"]
        if s.train_dir:
            step = None
            with contextlib.suppress(Exception):
                rows = [json.loads(r) for r in open(os.path.join(self.paths.fill(s.train_dir), "log.jsonl"))]
                step = rows[-1]["step"]
            return f"{s.name} (step {step or 0}/{s.steps})"
        if s.kind == "vae":
            step = vae_step(self.paths.fill(s.artifact))
            return f"{s.name} (step {step}/{s.units}, {fmt_time(time.time() - job['start'])})"
        if s.resume:
            k, noun = self.units_kept(s)
            return f"{s.name} ({noun[:-1]} {k}/{s.units}, {fmt_time(time.time() - job['start'])})"
        return f"{s.name} ({fmt_time(time.time() - job['start'])})"

    def manifest(self):
        """results/NAME/manifest.json: what made these results (commit, protocol file, versions) and
        each stage's record."""
        p = self.paths
        recs = [self.record(s) for s in self.stages]
        versions = {}
        for mod in ("torch", "diffusers", "torchvision"):
            with contextlib.suppress(Exception):
                versions[mod] = __import__(mod).__version__
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
        text = json.dumps(dict(protocol=self.cfg["name"], protocol_sha256=self.cfg["sha256"],
                               commit=commit, uncommitted_changes=dirty, versions=versions, python=platform.python_version(),
                               stages={s.name: (dict(state="done", host=r["host"], seconds=r["seconds"], threads=r.get("threads"),
                                                     finished=r["finished"]) if r and r.get("key") == s.key else dict(state="to do"))
                                       for s, r in zip(self.stages, recs)}), indent=1)
        write_atomic(os.path.join(p.results, "manifest.json"), text + "\n")


def schedule(stages, seconds, jobs):
    """The wall time of running the stages on `jobs` slots in the driver's order, each as soon as a
    slot is free and what it needs has finished (what is not being run counts as finished)."""
    names = {s.name for s in stages}
    end, free, todo = {}, [0.0] * jobs, list(stages)
    while todo:
        free.sort()
        s = next((s for s in todo if all(d not in names or d in end for d in s.deps)), todo[0])
        todo.remove(s)
        start = max([free[0]] + [end.get(d, 0.0) for d in s.deps])
        end[s.name] = free[0] = start + seconds.get(s.name, 0.0)
    return max(end.values(), default=0.0)


def die_with_parent():
    """Children die with the driver (SIGKILL included): a killed driver leaves no stage running
    behind it, so the next driver can resume that stage."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cuda_devices():
    try:
        import torch
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:
        return []


def tail_line(path):
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in open(path) if ln.strip()]
        return lines[-1] if lines else "(no output)"
    return "(no log)"


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------ command line
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("protocol", type=Path("file", ext=(".py",)), help="a protocol file, e.g. protocols/smoke.py")
    a("--jobs", type=Int(1, 256), default=1, help="stages run at once: GPUs, or CPU processes of cores/jobs threads")
    a("--dry-run", action="store_true", help="print the plan and the commands of every stage to run, run nothing")
    a("--work", default=None, type=Path("out-dir"), help="checkpoints, samples and data (never committed); default: runs/NAME")
    a("--results", default=None, type=Path("out-dir"), help="scores, logs, tables, figures (committed); default: results/NAME")
    a("--data", default=None, type=Path("dir"), help="override the protocol's data folder (e.g. where CIFAR-10 lies on this machine)")
    a("--device", default=None, type=DEVICE, help="cpu, cuda or cuda:N for every stage (default: each script's own: "
      "cuda if there is one, else cpu)")
    a("--redo-changed", action="store_true", help="re-run the finished stages the protocol file now gives "
      "another command for, or that read an input (a base model, the autoencoder) re-made with other weights "
      "(default: refuse)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--dry-run | head` ends quietly
    if args.jobs < 1:
        fail(f"--jobs must be >= 1, got {args.jobs}")
    try:
        cfg = load_protocol(args.protocol)
    except ProtocolError as e:
        fail(str(e))
    cfg["sha256"] = hashlib.sha256(open(args.protocol, "rb").read()).hexdigest()[:16]
    name = cfg["name"]
    work = os.path.abspath(args.work or os.path.join(HERE, "runs", name))
    results = os.path.abspath(args.results or os.path.join(HERE, "results", name))
    data = None if cfg["data"] == "toy" else os.path.abspath(args.data or os.path.join(HERE, cfg["data"])
                                                              if not os.path.isabs(args.data or cfg["data"]) else args.data or cfg["data"])
    paths = Paths(work, results, data)
    if args.device:
        from cli import pick_device
        pick_device(args.device)  # one line now if this machine has no such device
    driver = Driver(cfg, paths, args.jobs, args.device, args.redo_changed)
    changed = driver.changed()
    if changed and not args.redo_changed:
        names = ", ".join(s.name for s, _ in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        fail(f"{args.protocol} changed since {names} finished under other commands (recorded in {paths.stages}): "
             f"restore the file, or give --redo-changed to run them again")
    lines, need = driver.plan()
    print("\n".join(lines))
    if args.dry_run:
        print("\n# the commands, in order (each stage's output is kept by the driver as shown)")
        for s in need:
            print(f"# {s.name}")
            print("\n".join(driver.commands(s)))
        return
    if not need:
        print(f"nothing to do: every stage is done; results in {results}")
        return
    if data and not os.path.isdir(os.path.join(data, "train")):
        fail(f"the data folder {data}/train does not exist: {cfg.get('data_hint') or 'give --data FOLDER'}")
    if data:  # every image count a stage will ask of the data, checked now rather than hours in
        from fid import image_files
        for split, (n, what) in data_needs(cfg).items():
            have = len(image_files(os.path.join(data, split)))
            if have < n:
                fail(f"{data}/{split} holds {have} images, and {args.protocol} draws {n} of them ({what}): "
                     f"give a larger --data folder or lower those numbers in the protocol file")
    for d in (work, results):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            fail(f"cannot create {d} ({e.strerror})")
    locks = []
    for d in (results, work):  # one driver per results folder and per work folder
        locks.append(open(os.path.join(d, ".lock"), "w"))
        try:
            fcntl.flock(locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another protocol.py is running on {d}; wait for it (or stop it) and run again")
    for s, _ in changed:  # --redo-changed: their old records go; their outputs are made again
        os.remove(paths.record(s))
        if s.train_dir:
            shutil.rmtree(paths.fill(s.train_dir), ignore_errors=True)
    os.makedirs(paths.stages, exist_ok=True)
    try:
        driver.run()
    except KeyboardInterrupt:
        fail("interrupted; finished stages are kept and unfinished runs resume: run the same command again")
    print(f"done: results in {results}")


if __name__ == "__main__":
    from cli import entry
    entry(main)
