"""Tests of protocol.py, the driver that runs a protocol file: resumes after SIGKILL without redoing
work, refuses bad or changed protocol files and a second driver in one line, and its dry run prints
the plain commands. They run the real smoke protocol (toy data, a few minutes on 2 CPU cores)."""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import plan
import protocol

HERE = os.path.dirname(os.path.abspath(__file__))


def drive(tmp, proto="protocols/smoke.py", *extra, wait=True, **kw):
    """protocol.py as a user runs it, with its work and results folders under tmp."""
    cmd = [sys.executable, "protocol.py", proto, "--work", str(tmp / "runs"), "--results", str(tmp / "results"), *extra]
    env = dict(os.environ, TQDM_DISABLE="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=kw.get("timeout", 900))


def one_line_failure(res):
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def records(results):
    return {p: json.load(open(os.path.join(results, "stages", p))) for p in os.listdir(os.path.join(results, "stages"))}


def scores(results):
    """Every number the smoke protocol produces that must not depend on interruptions: FID and spectrum
    lines of each score, and the seed table without its timing column."""
    out = {}
    for root, _, files in os.walk(results):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, results)
            if f == "score.txt":
                out[rel] = re.findall(r"^(?:FID|spectrum error) [\d.]+", open(path).read(), re.M)
            elif f == "denoise.txt":
                out[rel] = [line.split("  ")[0] for line in open(path)]
            elif f == "table.md":
                out[rel] = [re.sub(r"\| [\d.]+ \| ([\d.]*) \|", r"| s | \1 |", row, count=1) for row in open(path)]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The smoke protocol run once without interruption."""
    tmp = tmp_path_factory.mktemp("smoke")
    before = tracked_files()
    res = drive(tmp, "protocols/smoke.py", "--jobs", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert tracked_files() == before, "the protocol wrote into the repository's own files"
    return tmp


def tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    return {f: os.stat(os.path.join(HERE, f)).st_mtime_ns for f in files if os.path.exists(os.path.join(HERE, f))}


def test_smoke_writes_tables_figures_and_manifest(finished):
    res = finished / "results"
    for f in ("eps/table.md", "eps/seeds.png", "eps/spectrum.png", "eps/diff.png", "manifest.json",
              "eps/l2-s0/score.txt", "eps/lpl-s1/log.jsonl", "eps/base/log.jsonl"):
        assert (res / f).exists(), f
    table = (res / "eps/table.md").read_text()
    assert "| l2 | 0, 1 |" in table and "| lpl | 0, 1 |" in table and "FID − l2, same seed" in table
    # the analyses: denoise per checkpoint and its paired table and figure, a hybrid, a second sampling seed
    assert "FID" in (res / "eps/lpl-s0/denoise.txt").read_text() and "FID" not in (res / "eps/l2-s0/denoise.txt").read_text()
    assert "| lpl | 0, 1 | 0.5 |" in (res / "eps/table-denoise.md").read_text() and (res / "eps/denoise.png").exists()
    assert "| l2-hi-lpl-lo | 0, 1 |" in (res / "eps/table-l2-hi-lpl-lo.md").read_text()
    assert (res / "eps/seed1/lpl-s1/score.txt").exists()
    assert "Sampling noise" in (res / "eps/table-seed1.md").read_text() and "4 runs" in (res / "eps/table-seed1.md").read_text()
    manifest = json.load(open(res / "manifest.json"))
    assert manifest["protocol"] == "smoke" and manifest["versions"]["torch"]
    assert all(s["state"] == "done" and s["seconds"] >= 0 for s in manifest["stages"].values())
    again = drive(finished)  # done is done: nothing runs
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_sigkill_then_resume_equals_an_uninterrupted_run_and_redoes_nothing(finished, tmp_path):
    proc = drive(tmp_path, "protocols/smoke.py", "--jobs", "2", wait=False)
    ckpt, rec = tmp_path / "runs/eps/l2-s0/ckpt.pt", tmp_path / "results/stages/eps__l2-s0.json"
    deadline = time.time() + 600
    while not (ckpt.exists() and not rec.exists()):  # a post-training between its first checkpoint and its end
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.kill()  # SIGKILL to the driver alone: its stages die with it
    proc.wait()
    time.sleep(1)
    busy = subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True, text=True).stdout
    assert busy == "", "a stage outlived the killed driver"
    before = records(tmp_path / "results")
    for stage in before.values():  # nothing half written: every kept file has its record
        assert stage["key"]
    assert not (tmp_path / "results/eps/l2-s0/score.txt").exists()
    # again, now while a score runs (two commands, sample.py then metrics.py: none may outlive the driver)
    proc = drive(tmp_path, "protocols/smoke.py", "--jobs", "2", wait=False)
    samples, rec = tmp_path / "runs/samples/eps/l2-s0", tmp_path / "results/stages/eps__l2-s0__score.json"
    while not (samples.exists() and any(samples.iterdir()) and not rec.exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    time.sleep(1)
    busy = subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True, text=True).stdout
    assert busy == "", "a score's command outlived the killed driver"
    first = proc.stdout.read()
    assert re.search(r"start: eps/l2-s0 \(from step [1-9]", first), first  # resumed, not restarted
    res = drive(tmp_path, "protocols/smoke.py", "--jobs", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    after = records(tmp_path / "results")
    for name, stage in before.items():  # no finished stage was redone
        assert after[name]["finished"] == stage["finished"], name
    assert scores(tmp_path / "results") == scores(finished / "results")


def test_dry_run_prints_plain_commands_and_does_nothing(tmp_path):
    res = drive(tmp_path, "protocols/cifar10-gpu.py", "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "python train.py --data" in out and "--model DiT-S/2" in out and "--vae stabilityai/sd-vae-ft-ema" in out
    assert "--init-from" in out and "--loss lpl" in out and "python sample.py --ckpt" in out
    assert "python metrics.py stats" in out and "python metrics.py table" in out
    assert "projected:" in out and not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_gpu_smoke_runs_on_cpu(tmp_path):
    res = drive(tmp_path, "protocols/gpu-smoke.py", "--device", "cpu", "--jobs", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    bench = (tmp_path / "results/bench.txt").read_text()
    assert "step time" in bench.lower() or "ratio" in bench.lower(), bench
    score = (tmp_path / "results/lpl/base/score.txt").read_text()
    assert re.search(r"^FID [\d.]+", score, re.M)
    log = [json.loads(r) for r in open(tmp_path / "results/lpl/base/log.jsonl")]
    assert log[-1]["step"] == 200 and all("loss_lpl" in r for r in log)


BAD = {
    "an unknown key": "stuides = {}",
    "a wrong type": "studies = ['eps']",
    "a flag train.py lacks": "studies['eps']['post'] = ['--no-such-flag', '1']",
    "a flag the driver sets": "studies['eps']['post'] = studies['eps']['post'] + ['--seed', '3']",
    "a value train.py refuses": "studies['eps']['base'] = ['--model', 'DiT-XXL/2']",
    "an arm named twice": "studies['eps']['arms'] = {'l2': ['--loss', 'l2'], 'l2': ['--loss', 'lpl']}",
    "a baseline that is no arm": "studies['eps']['baseline'] = 'ema'",
    "seeds named twice": "studies['eps']['seeds'] = [0, 0]",
    "a bad score": "score = dict(n=1, steps=5, cfg=1.5, seed=0, spectrum_n=4)",
    "a spectrum of more images than the samples": "score = dict(n=8, steps=5, cfg=1.5, seed=0, spectrum_n=24)",
    "a score key missing": "score = dict(n=8)",
    "an unknown study key": "studies['eps']['seed'] = [0]",
    "Python that fails": "raise RuntimeError('oops')",
    "a syntax error": "studies = {",
    "a study name with a slash": "studies['a/b'] = studies.pop('eps')",
    "denoise without levels": "studies['eps']['denoise'] = dict(n=8)",
    "a denoise level of 0": "studies['eps']['denoise'] = dict(n=8, levels=[0.5, 0])",
    "a denoise FID of no arm": "studies['eps']['denoise'] = dict(n=8, levels=[0.5], fid=['ema'])",
    "a variant of no arm": "studies['eps']['variants'] = {'seed1': dict(arms=['ema'], seed=1)}",
    "a variant that changes nothing": "studies['eps']['variants'] = {'same': dict(arms=['l2'])}",
    "a variant of 0 steps": "studies['eps']['variants'] = {'s0': dict(arms=['l2'], steps=0)}",
    "a variant key score lacks": "studies['eps']['variants'] = {'x': dict(arms=['l2'], guidance=2)}",
    "a hybrid named as an arm": "studies['eps']['hybrids'] = {'lpl': dict(high='l2', low='lpl', switch=0.5)}",
    "a hybrid of no arm": "studies['eps']['hybrids'] = {'h': dict(high='l2', low='ema', switch=0.5)}",
    "a hybrid switch of 0": "studies['eps']['hybrids'] = {'h': dict(high='l2', low='lpl', switch=0)}",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_protocol_files_are_one_line_before_any_work(tmp_path, case):
    text = open(os.path.join(HERE, "protocols/smoke.py")).read() + "\n" + BAD[case] + "\n"
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    msg = one_line_failure(drive(tmp_path, str(bad)))
    assert "bad.py" in msg, msg
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_data_folder_too_small_for_the_protocol_is_one_line_before_any_work(tmp_path, split):
    """Each count of images a stage draws from the data (the FID reference, the spectrum, inflation's
    test images) is checked against the folder before the first stage, not when that stage comes."""
    from conftest import tiny_vae, write_pngs
    write_pngs(tmp_path / "data/train", per_class=8)  # 24 images
    write_pngs(tmp_path / "data/test", per_class=2)  # 6 images
    tiny_vae().save_pretrained(tmp_path / "vae")
    needs = {"train": "reference = dict(n=25)", "test": "studies['eps']['inflation'] = True"}[split]
    text = open(os.path.join(HERE, "protocols/smoke.py")).read()
    bad = tmp_path / "bad.py"
    bad.write_text(f"{text}\ndata = {str(tmp_path / 'data')!r}\nautoencoder = {str(tmp_path / 'vae')!r}\n"
                   f"reference = dict(n=24)\n{needs}\n")
    msg = one_line_failure(drive(tmp_path, str(bad)))
    assert f"data/{split} holds {24 if split == 'train' else 6} images" in msg, msg
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_a_changed_protocol_over_finished_runs_is_refused_in_one_line(finished, tmp_path):
    shutil.copytree(finished / "results", tmp_path / "results")
    text = open(os.path.join(HERE, "protocols/smoke.py")).read().replace('"--steps", "20"', '"--steps", "25"')
    (tmp_path / "smoke.py").write_text(text)
    before = records(tmp_path / "results")
    msg = one_line_failure(drive(tmp_path, str(tmp_path / "smoke.py")))
    assert "eps/l2-s0" in msg and "--redo-changed" in msg, msg
    assert records(tmp_path / "results") == before
    plan = drive(tmp_path, str(tmp_path / "smoke.py"), "--dry-run", "--redo-changed")
    assert plan.returncode == 0 and "eps/l2-s0" in plan.stdout and "--steps 25" in plan.stdout, plan.stderr


def test_two_drivers_on_one_results_folder(tmp_path):
    (tmp_path / "results").mkdir()
    with open(tmp_path / "results/.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        msg = one_line_failure(drive(tmp_path))
    assert "another protocol.py" in msg


def test_a_remade_base_is_not_paired_with_runs_of_the_old_one(finished, tmp_path):
    """On a new machine a re-made base model can differ in its last bits; the runs still to do would
    then be paired by seed with runs of another base. The driver refuses, naming both."""
    shutil.copytree(finished / "results", tmp_path / "results")
    shutil.copytree(finished / "runs", tmp_path / "runs")
    stages = tmp_path / "results/stages"
    (stages / "eps__lpl-s1.json").unlink()  # one run left to do
    base = json.load(open(stages / "eps__base.json"))
    base["artifact_hash"] = "0" * 16  # the base as re-made here
    (stages / "eps__base.json").write_text(json.dumps(base))
    msg = one_line_failure(drive(tmp_path))
    assert "eps/base" in msg and "differs" in msg, msg
    msg = one_line_failure(drive(tmp_path, "protocols/smoke.py", "--redo-changed"))
    assert "records are removed" in msg, msg
    for gone in ("eps__l2-s0", "eps__l2-s0__score", "eps__table", "eps__figures"):  # and all that read them
        assert not (stages / f"{gone}.json").exists(), gone
    assert not (tmp_path / "runs/eps/l2-s0").exists()  # its checkpoint came from the old base
    plan = drive(tmp_path, "protocols/smoke.py", "--dry-run")
    assert re.search(r"eps/l2-s0 +to do", plan.stdout), plan.stdout


def test_stage_keys_follow_commands_not_paths():
    cfg = plan.load_protocol(os.path.join(HERE, "protocols/smoke.py"))
    a = {s.name: s.key for s in plan.build_stages(cfg)}
    cfg["studies"]["eps"]["post"] = cfg["studies"]["eps"]["post"] + ["--lr", "2e-4"]
    b = {s.name: s.key for s in plan.build_stages(cfg)}
    assert a["eps/base"] == b["eps/base"] and a["reference"] == b["reference"]
    assert a["eps/l2-s0"] != b["eps/l2-s0"] and a["eps/l2-s0/score"] != b["eps/l2-s0/score"]  # and what reads it
    assert a["eps/table"] != b["eps/table"]



def _writes_and_reads(stage):
    """The paths a stage writes (its artifact, captured stdout, kept files, figures) and the
    {work}/{results} paths its commands name but do not write, as placeholder templates."""
    writes = {p for p in (stage.artifact, *stage.scratch) if p}
    writes |= {f"{{results}}/{c}" for c in [stage.capture] if c} | {f"{{results}}/{d}" for _, d in stage.keeps}
    args = [a for cmd in stage.cmds for a in cmd if a.startswith(("{work}", "{results}"))]
    if stage.outputs is not None:  # what goes to {out} lands in results/OUTPUTS/ when the stage succeeds
        writes |= {f"{{results}}/{stage.outputs}{a[len(stage.scratch[0]):]}" for a in args if a.startswith(stage.scratch[0])}
    inside = lambda path, paths: any(path == w or path.startswith(w + "/") for w in paths)  # noqa: E731
    return writes, {a for a in args if not inside(a, writes)}


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(HERE, "protocols"))))
def test_every_stage_depends_on_the_stages_whose_files_it_reads(name):
    """A stage that reads a file another stage writes must wait for it: the table read the runs'
    folders while their inflation.txt could still be unwritten (its deps were the scores alone).
    Checked for every pair of stages of every protocol file, through the dependencies' closure."""
    stages = plan.build_stages(plan.load_protocol(os.path.join(HERE, "protocols", name)))
    by_name = {s.name: s for s in stages}

    def closure(s, seen):
        for d in s.deps:
            if d not in seen:
                seen.add(d), closure(by_name[d], seen)
        return seen
    io = {s.name: _writes_and_reads(s) for s in stages}
    missing = []
    for t in stages:
        needs = closure(t, set())
        for s in stages:
            overlap = [r for r in io[t.name][1] for w in io[s.name][0]
                       if r == w or w.startswith(r + "/") or r.startswith(w + "/")]
            if s is not t and overlap and s.name not in needs:
                missing.append(f"{t.name} reads {overlap[0]} without waiting for {s.name}")
    assert not missing, missing



@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(HERE, "protocols"))))
def test_every_resumable_stage_keeps_its_own_attempt_and_removes_any_other(name, tmp_path):
    """Every stage whose command continues what a killed attempt left (scores: samples; the reference:
    its features and a written statistics file) keeps all of it under its own key, with its command
    continuing it, and removes every path of it under another key (a changed command or input)."""
    cfg = plan.load_protocol(os.path.join(HERE, "protocols", name))
    driver = protocol.Driver(cfg, plan.Paths(str(tmp_path / "runs"), str(tmp_path / "results"), None), 1,
                             out=lambda *a: None)
    resumable = [s for s in driver.stages if s.resume]
    assert any(s.kind == "ref" for s in resumable) and any(s.kind == "score" for s in resumable)
    for stage in resumable:
        paths = [driver.paths.fill(p) for p in stage.scratch]

        def leftovers(key):
            for p in paths:  # a file where the name has an extension, else a folder with a unit in it
                os.makedirs(p if not os.path.splitext(p)[1] else os.path.dirname(p), exist_ok=True)
                open(p if os.path.splitext(p)[1] else os.path.join(p, "000000000-000000002.pt"), "w").close()
            os.makedirs(os.path.dirname(driver.attempt(stage)), exist_ok=True)
            open(driver.attempt(stage), "w").write(key + "\n")
        leftovers(stage.key)
        assert driver.argv(stage)[0][-1] == stage.resume and stage.resume not in stage.cmds[0]  # (keys unchanged)
        assert not any(c.startswith("rm ") for c in driver.commands(stage)), stage.name
        driver.prepare_scratch(stage)
        assert all(os.path.exists(p) for p in paths), stage.name
        leftovers("another-key")
        assert sum(c.startswith("rm -rf ") for c in driver.commands(stage)) == len(paths), stage.name
        driver.prepare_scratch(stage)
        assert not any(os.path.exists(p) for p in paths), stage.name


def test_a_killed_reference_continues_its_features(tmp_path):
    """The reference (16 min for 5,000 images on a CPU, hours for 50,000) counts the images its kept
    features cover, as a score counts its samples."""
    cfg = plan.load_protocol(os.path.join(HERE, "protocols/smoke.py"))
    driver = protocol.Driver(cfg, plan.Paths(str(tmp_path / "runs"), str(tmp_path / "results"), None), 1,
                             out=lambda *a: None)
    stage = driver.by_name["reference"]
    assert driver.progress(dict(stage=stage, start=time.time())).startswith(f"reference (image 0/{stage.units}, ")
    keep = driver.paths.fill(stage.scratch[1])
    os.makedirs(keep)
    for chunk in ("000000000-000000010.pt", "000000010-000000030.pt", "000000030-000000040.tmp-7.pt"):
        open(os.path.join(keep, chunk), "w").close()
    os.makedirs(os.path.dirname(driver.attempt(stage)), exist_ok=True)
    open(driver.attempt(stage), "w").write(stage.key + "\n")
    assert driver.state(stage) == (f"at image 30 of {stage.units}", stage.units - 30)
    assert driver.progress(dict(stage=stage, start=time.time())).startswith(f"reference (image 30/{stage.units}, ")


def test_a_killed_score_continues_its_own_samples_and_no_other_attempts(tmp_path):
    """A score stage (the slowest after training) that was stopped continues the samples it wrote
    (sample.py --resume checks they are its own): its state and the projection count them. Samples an
    attempt under another key left (a changed command or input) are removed before it starts."""
    cfg = plan.load_protocol(os.path.join(HERE, "protocols/smoke.py"))
    driver = protocol.Driver(cfg, plan.Paths(str(tmp_path / "runs"), str(tmp_path / "results"), None), 1,
                             out=lambda *a: None)
    stage = driver.by_name["eps/l2-s0/score"]
    samples = tmp_path / "runs" / "samples" / "eps" / "l2-s0"

    def leftovers(key):  # what a killed attempt under `key` left
        samples.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            (samples / f"{i:06d}.png").write_bytes(b"")
        (samples / "000005.tmp-123.png").write_bytes(b"")  # cli.atomic_path's name, a write under way
        os.makedirs(os.path.dirname(driver.attempt(stage)), exist_ok=True)
        open(driver.attempt(stage), "w").write(key + "\n")

    sample_cmd = driver.argv(stage)[0]
    assert sample_cmd[0] == "sample.py" and sample_cmd[-1] == "--resume"  # (on a new folder, a plain call)
    assert "--resume" not in stage.cmds[0]  # (no part of the stage's key: keys of finished scores stay)
    leftovers(stage.key)
    assert driver.state(stage) == (f"at sample 5 of {stage.units}", stage.units - 5)
    assert driver.progress(dict(stage=stage, start=time.time())).startswith(f"eps/l2-s0/score (sample 5/{stage.units}, ")
    assert not any(c.startswith("rm ") for c in driver.commands(stage))
    driver.prepare_scratch(stage)
    assert len(list(samples.glob("0*.png"))) == 6
    leftovers("another-key")
    assert driver.state(stage) == ("to do", stage.units)
    assert driver.commands(stage)[0].startswith("rm -rf ")
    driver.prepare_scratch(stage)
    assert not samples.exists() and open(driver.attempt(stage)).read().strip() == stage.key
    leftovers(stage.key)
    driver.finish(dict(stage=stage, start=time.time(), capture=None, threads=1, written=5))
    assert not os.path.exists(driver.attempt(stage))  # done: a later attempt (after a change) starts afresh
    assert json.load(open(driver.paths.record(stage)))["units"] == stage.units - 5  # the rate: samples it drew


def test_schedule_projects_jobs_side_by_side():
    S = plan.Stage
    stages = [S("a", "x", []), S("b", "x", []), S("c", "x", [], deps=["a"]), S("d", "x", [], deps=["a", "b"])]
    secs = dict(a=10, b=4, c=5, d=1)
    assert protocol.schedule(stages, secs, 1) == 20
    assert protocol.schedule(stages, secs, 2) == 15  # a | b, then c after a; d after a and b


def readme_results():
    text = open(os.path.join(HERE, "README.md")).read()
    start = text.index("\n## Results\n")
    return text[start:text.index("\n## ", start + 1)]  # up to the next section


def test_readme_tables_are_the_results_files(capsys):
    """Every table in the README's Results is the output of the command in the comment above it,
    on committed files: no number typed by hand. A table without such a comment fails."""
    import glob
    import metrics
    lines = readme_results().splitlines()
    checked = 0
    for i, line in enumerate(lines):
        if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
            continue  # not the first row of a table
        header = lines[i - 1] if i else ""
        if line.startswith("| protocol |") or "![](" in lines[i + 2]:
            continue  # the list of protocols and the figure layout hold no results
        m = re.fullmatch(r"<!-- table: python metrics.py table (.+) -->", header)
        assert m, f"the Results table at '{line[:60]}' has no '<!-- table: ... -->' command above it"
        argv = m[1].split()
        runs = [p for a in argv if not a.startswith("--") and a != argv[argv.index("--baseline") + 1]
                for p in sorted(glob.glob(os.path.join(HERE, a)))]
        assert runs, m[1]
        capsys.readouterr()
        metrics.main(["table", *runs, *argv[argv.index("--baseline"):argv.index("--baseline") + 2]])
        expected = capsys.readouterr().out.strip().splitlines()
        table = []
        for row in lines[i:]:
            if not row.startswith("|"):
                break
            table.append(row)
        assert table == expected, f"{m[1]}:\n" + "\n".join(expected)
        checked += 1
    assert checked >= 3
