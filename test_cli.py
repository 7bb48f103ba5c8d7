"""The command-line contract of every entry point, generated from the parsers themselves.

For every option (and positional argument) of train.py, sample.py, train_vae.py, bench.py, data.py,
metrics.py (each subcommand) and protocol.py, the values of its kind are tried: 0, -1, nan, inf,
2^64, an empty string and a wrong type for numbers; for paths a missing one, a folder where a file is
expected and the reverse, a file of another kind. Each call must end in one of two ways:
- refused with exactly one line saying what is wrong (no traceback), or
- accepted, reaching the point where the work starts (patched to stop there, so the test stays fast);
and nothing that existed before the call may have changed. A new option is covered without a case.
"""
import argparse
import contextlib
import hashlib
import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import cli
import data
import fid
import metrics
import protocol
import sample
import train
import train_vae
from conftest import tiny_vae, write_pngs

HERE = os.path.dirname(os.path.abspath(__file__))


class Reached(Exception):
    """The work would start here: the input was accepted."""


def stop(*a, **k):
    raise Reached


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Inputs of every kind: a tiny autoencoder, an image folder, a run with a checkpoint and a log,
    a statistics file, and files of the wrong kinds."""
    root = tmp_path_factory.mktemp("cli")
    tiny_vae(blocks=2).save_pretrained(root / "vae")
    write_pngs(root / "images", per_class=4)
    train.main(["--data", str(root / "images"), "--vae", str(root / "vae"), "--image-size", "16", "--model", "DiT-T/2",
                "--batch-size", "8", "--steps", "2", "--log-every", "1", "--sample-every", "1000",
                "--run-dir", str(root / "runs" / "l2-s0")])
    (root / "runs" / "l2-s0" / "score.txt").write_text("FID 100.0 (x)\nspectrum error 0.5 (x)\n")
    np.savez(root / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    (root / "text.png").write_text("not an image")
    (root / "junk.pt").write_bytes(b"junk")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "one.png")
    (root / "out").mkdir()
    return root


def entry_points(s):
    """name -> (main, parser, valid argv, patches that stop at the start of the work)."""
    ckpt = str(s / "runs" / "l2-s0" / "ckpt.pt")
    out = str(s / "out")
    eps = {
        "train.py": (train.main, train.build_parser(),
                     ["--data", str(s / "images"), "--vae", str(s / "vae"), "--image-size", "16", "--model", "DiT-T/2",
                      "--batch-size", "8", "--run-dir", f"{out}/run"], [(train, "train")]),
        "sample.py": (sample.main, parser_of(sample.get_args), ["--ckpt", ckpt, "--out", f"{out}/g.png"],
                      [(sample, "generate")]),
        "train_vae.py": (train_vae.main, parser_of(train_vae.get_args),
                         ["--data", str(s / "images"), "--test-data", str(s / "images"), "--out", f"{out}/vae"],
                         [(train_vae, "build_vae")]),
        "bench.py": (bench.main, parser_of(bench.get_args), ["--vae", str(s / "vae"), "--model", "DiT-T/2",
                                                             "--image-size", "16"], [(bench, "LatentPerceptualLoss")]),
        "data.py toy": (data.main, subparser(data.main, "toy"), ["toy", f"{out}/toy"], [(data, "make_toy")]),
        "protocol.py": (protocol.main, parser_of(protocol.main),
                        [os.path.join(HERE, "protocols/smoke.py"), "--work", f"{out}/pw", "--results", f"{out}/pr"],
                        [(protocol.Driver, "run")]),
    }
    metric_argv = {
        "fid": [str(s / "images"), str(s / "stats.npz")],
        "stats": [str(s / "images"), f"{out}/s.npz"],
        "spectrum": [str(s / "images"), str(s / "images")],
        "outliers": [str(s / "one.png"), "--vae", str(s / "vae"), "--out", f"{out}/o.png"],
        "diff": [str(s / "one.png"), str(s / "one.png"), "--out", f"{out}/d.png"],
        "sigma-bias": [str(s / "images"), "--vae", str(s / "vae"), "--n", "4"],
        "inflation": [str(s / "images"), ckpt, "--n", "4"],
        "denoise": [ckpt, "--data", str(s / "images"), "--n", "4"],
        "table": [str(s / "runs" / "l2-s0")],
        "curves": [str(s / "runs" / "l2-s0" / "log.jsonl"), "--out", f"{out}/c.png"],
    }
    stops = [(metrics, n) for n in ("InceptionFeatures", "outlier_maps", "sigma_bias", "inflation", "plot_curves",
                                    "plot_seeds", "plot_spectra", "folder_spectrum", "seed_table", "denoise_reference",
                                    "denoise_table")]
    for cmd, argv in metric_argv.items():
        eps[f"metrics.py {cmd}"] = (metrics.main, subparser(metrics.main, cmd), [cmd, *argv], stops)
    return eps


def parser_of(fn):
    """The parser a get_args / main builds, caught at its parse_args call."""
    caught = []
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        caught.append(self)
        raise Reached
    argparse.ArgumentParser.parse_args = grab
    try:
        with contextlib.suppress(Reached):
            fn([])
    finally:
        argparse.ArgumentParser.parse_args = orig
    return caught[0]


def subparser(main, name):
    p = parser_of(main)
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def values_for(action, s):
    """The values of the option's kind to try."""
    t = action.type
    if action.choices is not None:
        return ["", "no-such-choice", *map(str, list(action.choices)[:2])]
    if isinstance(t, (cli.Int, cli.Float)):
        return ["0", "-1", "nan", "inf", "-inf", str(2 ** 64), "", "abc", "1e3", "0.5", "7"]
    if isinstance(t, cli.Path):
        return ["", str(s / "missing"), str(s / "images"), str(s / "one.png"), str(s / "text.png"),
                str(s / "junk.pt"), str(s / "stats.npz"), str(s / "vae"), str(s / "missing" / "deeper" / "x.png"),
                str(s / "one.png" / "under-a-file")]
    if isinstance(t, (cli.Name, cli.Device)):
        return ["", "a/b", "x" * 300, "cpu", "cuda:7", "tpu"]
    raise AssertionError(f"{action.option_strings or action.dest} has no checked type")


def options(parser):
    """Every option and positional argument of a parser, but help and subcommand choices."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def tree_state(root):
    """Every file under root with its content hash: what a call may not change."""
    state = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with contextlib.suppress(OSError):
                state[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return state


def call(main, argv, patches, monkeypatch):
    """('refused', message) | ('accepted', None); anything else fails the test."""
    with monkeypatch.context() as m:
        for mod, name in patches:
            m.setattr(mod, name, stop)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        except Reached:
            return "accepted", None
        except SystemExit as e:
            msg = e.code if isinstance(e.code, str) else err.getvalue().strip()
            if e.code in (0, None):
                return "accepted", None
            return "refused", msg
    return "accepted", None


def with_value(argv, action, value):
    if action.option_strings:
        flag = action.option_strings[-1]
        if action.nargs == 0:
            return [*argv, flag]
        return [*argv, flag, value]
    # a positional: replace it in the argv (its index among the positionals of the base argv)
    return None


def test_every_option_declares_what_it_accepts(sandbox):
    for name, (_, parser, _, _) in entry_points(sandbox).items():
        for action in options(parser):
            if action.nargs == 0 or action.choices is not None:
                continue  # a switch, or argparse's own check of the choices
            assert isinstance(action.type, cli.Checked), \
                f"{name} {action.option_strings or action.dest}: a plain {action.type} (use a checked type from cli.py)"


CONTRACT = ["train.py", "sample.py", "train_vae.py", "bench.py", "data.py toy", "protocol.py",
            "metrics.py fid", "metrics.py stats", "metrics.py spectrum", "metrics.py outliers",
            "metrics.py diff", "metrics.py sigma-bias", "metrics.py inflation", "metrics.py denoise",
            "metrics.py table", "metrics.py curves"]


def test_the_contract_covers_every_subcommand():
    """A new metrics.py or data.py subcommand joins the contract below, or this fails."""
    for script, main in (("metrics.py", metrics.main), ("data.py", data.main)):
        sub = next(a for a in parser_of(main)._actions if isinstance(a, argparse._SubParsersAction))
        missing = {f"{script} {name}" for name in sub.choices} - set(CONTRACT)
        assert not missing, missing


@pytest.mark.parametrize("name", CONTRACT)
def test_every_value_of_every_option_is_one_line_or_accepted_and_nothing_changes(sandbox, monkeypatch, name):
    main, parser, base, patches = entry_points(sandbox)[name]
    assert call(main, base, patches, monkeypatch)[0] == "accepted", f"{name}'s base command must be valid"
    positionals = [a for a in options(parser) if not a.option_strings]
    before, cases = tree_state(sandbox), 0
    for action in options(parser):
        if action.dest == "help" or (action.option_strings and action.option_strings[-1] in ("--resume",)):
            continue  # --resume is its own mode: tested below
        for value in values_for(action, sandbox) if action.nargs != 0 else [None]:
            if action.option_strings:
                argv = with_value(base, action, value)
                if name == "train.py" and action.dest in train.REQUIRES:  # give what the option acts with
                    other, allowed, _ = train.REQUIRES[action.dest]
                    argv += [f"--{other.replace('_', '-')}", sorted(allowed)[0]]
                if name == "train.py" and action.dest == "sp_layer" or (name == "train.py" and action.dest == "loss"
                                                                          and value == "self-perceptual"):
                    argv += ["--init-from", str(sandbox / "runs" / "l2-s0")]
            else:
                k = positionals.index(action) + (1 if name.startswith(("metrics.py", "data.py")) else 0)
                argv = list(base)
                argv[k] = value
            outcome, msg = call(main, argv, patches, monkeypatch)
            cases += 1
            if outcome == "refused":
                assert msg and "\n" not in msg and "error:" in msg and "Traceback" not in msg, (argv, msg)
            else:  # accepted: the value must be of the kind the option declares
                t = action.type
                if isinstance(t, (cli.Int, cli.Float)) and value is not None:
                    assert math.isfinite(float(value)) and abs(float(value)) < 2 ** 63, (argv, "accepted")
            assert tree_state(sandbox) == before or only_new_files(before, tree_state(sandbox)), argv
    assert cases >= len(options(parser))


def only_new_files(before, after):
    """Accepted calls may create outputs; they never change or remove what was there."""
    return all(after.get(p) == h for p, h in before.items())


def test_train_options_that_act_only_with_another_are_refused_without_it(sandbox, monkeypatch):
    """The options of a loss or a reweighting, given without it, would be ignored in silence: every
    one of train.REQUIRES is refused in one line naming it, generated from the table."""
    main, parser, base, patches = entry_points(sandbox)["train.py"]
    by_dest = {a.dest: a for a in options(parser)}
    for dest, (other, allowed, hint) in train.REQUIRES.items():
        action = by_dest[dest]
        value = None if action.nargs == 0 else (list(action.choices)[-1] if action.choices else "2")
        argv = with_value(base, action, value)
        outcome, msg = call(main, argv, patches, monkeypatch)
        assert outcome == "refused" and any(o in msg for o in action.option_strings) and hint in msg, (dest, msg)
    for dest, (other, allowed, hint) in train.REQUIRES_TOO.items():  # the second condition, with the first met
        action = by_dest[dest]
        value = None if action.nargs == 0 else (list(action.choices)[-1] if action.choices else "2")
        first, ok, _ = train.REQUIRES[dest]
        wrong = next(c for c in by_dest[other].choices if c not in allowed)
        argv = with_value(base, action, value) + [f"--{first.replace('_', '-')}", sorted(ok)[0],
                                                  f"--{other.replace('_', '-')}", wrong]
        outcome, msg = call(main, argv, patches, monkeypatch)
        assert outcome == "refused" and any(o in msg for o in action.option_strings) and hint in msg, (dest, msg)
        ok_argv = with_value(base, action, value) + [f"--{first.replace('_', '-')}", sorted(ok)[0]]
        outcome, msg = call(main, ok_argv, patches, monkeypatch)  # with both conditions met, this rule is silent
        assert outcome == "accepted" or hint not in msg, (ok_argv, msg)


def test_sample_options_of_the_other_mode_are_refused(sandbox, monkeypatch):
    main, parser, base, patches = entry_points(sandbox)["sample.py"]
    ckpt = str(sandbox / "runs" / "l2-s0" / "ckpt.pt")
    for extra, flag in ((["--fid-ref", str(sandbox / "stats.npz")], "--fid-ref"),
                        (["--out-dir", str(sandbox / "out" / "s"), "--per-class", "2"], "--per-class"),
                        (["--out-dir", str(sandbox / "out" / "s"), "--label-rows"], "--label-rows")):
        outcome, msg = call(main, ["--ckpt", ckpt, *extra], patches, monkeypatch)
        assert outcome == "refused" and flag in msg, msg


def test_checked_types_refuse_what_they_do_not_accept():
    assert cli.Int(1)("3") == 3
    for bad in ("0", "-1", "1.5", "", "x", str(2 ** 64)):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.Int(1)(bad)
    assert cli.Float(0, 1)("0.5") == 0.5
    for bad in ("nan", "inf", "-inf", "1.01", "-0.1", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.Float(0, 1)(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.Float(0, lo_open=True)("0")
    assert cli.SEED(str(2 ** 31 - 1)) == 2 ** 31 - 1
    with pytest.raises(argparse.ArgumentTypeError):
        cli.SEED(str(2 ** 31))
    assert cli.Path("dir", hub=True)("stabilityai/sd-vae-ft-ema") == "stabilityai/sd-vae-ft-ema"
    with pytest.raises(argparse.ArgumentTypeError):
        cli.Path("dir", hub=True)("./not/here")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.Path("new-file", ext=(".npz",))("stats")  # numpy would write stats.npz, reported as stats


def test_seed_bound_holds_through_the_trainer_s_derived_seeds():
    """train.py seeds its epoch order with seed·1000 + epoch and its calibration with seed + 1,000,003:
    at the largest accepted seed both stay inside torch's generator range."""
    s = cli.SEED.hi
    torch.Generator().manual_seed(s * 1000 + 10 ** 6)
    torch.Generator().manual_seed(s + 1_000_003)
    torch.manual_seed(s)


def test_ctrl_c_and_a_full_disk_end_in_one_line_with_nothing_half_written(sandbox, monkeypatch):
    """cli.entry, which every script's __main__ goes through: Ctrl-C and ENOSPC are one line; an
    output being written when the disk fills is dropped whole, and what existed is untouched."""
    import errno
    out = sandbox / "out" / "full.npz"

    def half_then_full(path, **arrays):
        open(path, "wb").write(b"PK\x03\x04 half")  # what a writer leaves when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(metrics, "kept_features", lambda *a, **k: torch.randn(4, 2))
    monkeypatch.setattr(metrics, "stats_settings", lambda *a, **k: {})
    monkeypatch.setattr(metrics, "InceptionFeatures", lambda **k: None)
    monkeypatch.setattr(np, "savez", half_then_full)
    with pytest.raises(SystemExit) as e:
        cli.entry(lambda: metrics.main(["stats", str(sandbox / "images"), str(out)]))
    assert "disk is full" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not out.exists() and not list(out.parent.glob("full.tmp-*")), "a half-written output was left"

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupt)
    run = sandbox / "out" / "interrupted"
    write_pngs(sandbox / "out" / "own-images", per_class=4)  # (the shared folder may hold other calls' outputs)
    argv = entry_points(sandbox)["train.py"][2][:-1] + [str(run)]
    argv[1] = str(sandbox / "out" / "own-images")
    with pytest.raises(SystemExit) as e:
        cli.entry(lambda: train.main(argv))
    assert "interrupted" in str(e.value.code) and "\n" not in str(e.value.code) and not run.exists()


def test_train_vae_never_writes_over_a_folder_that_holds_something(sandbox):
    target = sandbox / "out" / "trained-vae"
    tiny_vae(blocks=2).save_pretrained(target)
    before = tree_state(target)
    with pytest.raises(SystemExit) as e:
        train_vae.main(["--data", str(sandbox / "images"), "--test-data", str(sandbox / "images"), "--out", str(target)])
    assert "not empty" in str(e.value.code) and tree_state(target) == before


def test_outputs_that_exist_are_refused_not_replaced(sandbox):
    existing = sandbox / "one.png"
    for argv in (["diff", str(existing), str(existing), "--out", str(existing)],
                 ["stats", str(sandbox / "images"), str(sandbox / "stats.npz")],
                 ["curves", str(sandbox / "runs" / "l2-s0" / "log.jsonl"), "--out", str(existing)]):
        with pytest.raises(SystemExit) as e:
            metrics.main(argv)
        assert "exists" in str(e.value.code), argv
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(sandbox / "runs" / "l2-s0" / "ckpt.pt"), "--out", str(existing)])
    assert "exists" in str(e.value.code)


# ------------------------------------------------------------------------------ data read for what it is
def test_float_tiffs_in_0_1_read_as_what_they_show(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.float32).reshape(16, 16) / 255)  # 0..1
    Image.fromarray(ramp, "F").save(tmp_path / "f.tiff")
    Image.fromarray(ramp * 255, "F").save(tmp_path / "f255.tiff")
    expected = np.stack([np.round(ramp * 255).astype(np.uint8)] * 3, -1)
    for name in ("f.tiff", "f255.tiff"):
        np.testing.assert_array_equal(np.asarray(data.load_rgb(tmp_path / name)), expected, err_msg=name)
    Image.fromarray(ramp * 1000, "F").save(tmp_path / "big.tiff")
    with pytest.raises(ValueError):
        data.load_rgb(tmp_path / "big.tiff")


def test_a_data_folder_of_two_kinds_is_refused(sandbox, tmp_path):
    mixed = tmp_path / "mixed"
    write_pngs(mixed, per_class=2)
    np.savez(mixed / "train_data_batch_1.npz", data=np.zeros((4, 12288), np.uint8), labels=np.ones(4, np.int64))
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(mixed), "--vae", str(sandbox / "vae"), "--image-size", "16", "--model", "DiT-T/2",
                    "--batch-size", "8", "--steps", "1", "--run-dir", str(tmp_path / "run")])
    assert "both .npz batches" in str(e.value.code) and "class folders" in str(e.value.code)


def test_imagenet_labels_beyond_1000_are_refused_not_a_huge_model(sandbox, tmp_path):
    big = tmp_path / "npz"
    big.mkdir()
    np.savez(big / "train_data_batch_1.npz", data=np.zeros((4, 12288), np.uint8), labels=np.array([1, 2, 3, 1_000_000]))
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(big), "--vae", str(sandbox / "vae"), "--image-size", "16", "--model", "DiT-T/2",
                    "--batch-size", "8", "--steps", "1", "--run-dir", str(tmp_path / "run")])
    assert "labels': 1..1000" in str(e.value.code)


def test_latent_cache_is_keyed_by_content_and_a_foreign_one_is_refused(sandbox, tmp_path):
    """Touching an image (same content, new date) keeps the cache and lets a run resume; a cache file
    of the same name and shape but another key inside is encoded again, not trained on."""
    images = tmp_path / "images"
    write_pngs(images, per_class=4)
    argv = ["--data", str(images), "--vae", str(sandbox / "vae"), "--image-size", "16", "--model", "DiT-T/2",
            "--batch-size", "8", "--log-every", "1", "--sample-every", "1000"]
    train.main([*argv, "--steps", "1", "--run-dir", str(tmp_path / "a")])
    (cache,) = tmp_path.glob("latents-*.pt")
    first = torch.load(cache)
    os.utime(next(images.glob("*/*.png")), (1, 1))  # a new date, the same bytes
    train.main(["--resume", str(tmp_path / "a"), "--steps", "2"])  # resumes: the data is the same
    assert list(tmp_path.glob("latents-*.pt")) == [cache]
    foreign = dict(first, z=torch.zeros_like(first["z"]), key="another")
    torch.save(foreign, cache)
    train.main([*argv, "--steps", "1", "--run-dir", str(tmp_path / "b")])
    assert torch.equal(torch.load(cache)["z"], first["z"]), "the foreign cache was trained on"


def test_values_no_option_type_can_see_are_refused_once_known(sandbox, tmp_path, monkeypatch):
    """A 1x1 image has no spectrum (it was NaN); FID statistics of images of another size than the
    samples compare nothing (they were accepted)."""
    tiny = tmp_path / "px" / "a"
    tiny.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((1, 1, 3), 40 * i, np.uint8)).save(tiny / f"{i}.png")
    with pytest.raises(SystemExit) as e:
        metrics.main(["spectrum", str(tmp_path / "px"), str(tmp_path / "px")])
    assert "at least 2x2" in str(e.value.code)
    big = tmp_path / "big" / "a"
    big.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(big / f"{i}.png")

    class Moments(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    torch.jit.script(Moments()).save(str(tmp_path / "net.pt"))
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "net.pt"))
    metrics.main(["stats", str(tmp_path / "big"), str(tmp_path / "big.npz")])
    assert fid.stats_size(str(tmp_path / "big.npz")) == (32, 32)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(sandbox / "runs" / "l2-s0" / "ckpt.pt"), "--n", "4", "--out-dir",
                     str(tmp_path / "s"), "--fid", "--fid-ref", str(tmp_path / "big.npz")])
    assert "32x32 images, the samples are 16x16" in str(e.value.code)


def test_a_second_train_on_a_run_folder_stops_before_any_work(sandbox, tmp_path, monkeypatch):
    """The run folder is locked before any check or scan: a second identical command stops at once
    (it used to scan the data for minutes, then open log.jsonl with 'w' over the first run's)."""
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss_diff": 0.5}\n')
    scanned = []
    monkeypatch.setattr(train, "image_dataset", lambda *a: scanned.append(1) or stop())
    monkeypatch.setattr(train, "load_vae", lambda *a: scanned.append(1) or stop())
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still working
        with pytest.raises(SystemExit) as e:
            train.main(["--data", str(sandbox / "images"), "--vae", str(sandbox / "vae"), "--run-dir", str(run)])
    assert "another train.py is writing" in str(e.value.code) and not scanned
    assert (run / "log.jsonl").read_text() == '{"step": 1, "loss_diff": 0.5}\n'
