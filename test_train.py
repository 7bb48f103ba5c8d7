"""train.py and sample.py: each paradigm trained and sampled, work never lost (resume, atomic and
finite checkpoints, refusals), post-training, bad input as one line, two torchrun ranks."""
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid
import sample
import train
from lpl import LatentPerceptualLoss
from conftest import _ColourMeans, load, one_line_error, read_log, run_cli, train_args, write_pngs


# ---------------------------------------------------------------- train.py and sample.py end to end
@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_train_each_paradigm_with_lpl_then_sample(assets, tmp_path, paradigm):
    run = tmp_path / paradigm
    train.main(train_args(assets, run, "--paradigm", paradigm, "--steps", "3", "--loss", "lpl", "--lpl-weight", "3",
                          "--lpl-tau", "100", "--sample-every", "3"))
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss_lpl"]) and r["loss_lpl"] > 0 and r["lpl_frac"] > 0 for r in log)
    for r in log:  # the share of w·L_LPL in the total loss, as the paper's rule for w_LPL counts it
        assert r["lpl_share"] == pytest.approx(3 * r["loss_lpl"] / (r["loss_diff"] + 3 * r["loss_lpl"]))
    assert (run / "ckpt.pt").exists() and (run / "samples-0000003.png").exists()
    assert not (run / ".lock").exists()
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["paradigm"] == paradigm and "ema" in ckpt and "opt" in ckpt
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(out), "--steps", "2"])
    assert Image.open(out).size == (8 * 18 + 2, 3 * 18 + 2)  # 3 classes x 8, 16 px + 2 px padding
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out-dir", str(tmp_path / "pngs"), "--n", "5",
                 "--steps", "2", "--classes", "1"])
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [sample.MANIFEST, *(f"{i:06d}.png" for i in range(5))]


# ---------------------------------------------------------------- classifier-free guidance training
def test_labels_dropped_once_per_sample_in_every_block():
    """diffusers' DiT drops labels independently in each block's embedding (13 draws for DiT-S/2);
    here a sample must be conditional in every block or unconditional in every block, and the null
    class must come only from the trainer's single draw."""
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8,
                                   num_embeds_ada_norm=10)).train()
    seen = []
    tables = [m.embedding_table for m in model.modules() if isinstance(m, train_embedding_class())]
    assert len(tables) == 2 and all(t.num_embeddings == 11 for t in tables)  # the null row is kept
    for t in tables:
        t.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    torch.manual_seed(0)
    y = train.drop_labels(torch.randint(0, 10, (4000,)), 10, 0.1)
    assert 0.08 < (y == 10).float().mean() < 0.12
    for _ in range(3):
        seen.clear()
        model(torch.randn(4000, 4, 8, 8), timestep=torch.full((4000,), 500), class_labels=y)
        assert len(seen) == 3  # two blocks and the final layer
        assert all(torch.equal(s, y) for s in seen)
    assert torch.equal(train.drop_labels(y, 10, 0.0), y)


def train_embedding_class():
    from diffusers.models.embeddings import LabelEmbedding
    return LabelEmbedding


# ---------------------------------------------------------------- work is never lost
def test_resume_continues_exactly(assets, tmp_path):
    lpl = ["--loss", "lpl", "--lpl-tau", "20", "--ckpt-every", "2"]
    train.main(train_args(assets, tmp_path / "full", "--steps", "4", *lpl))
    train.main(train_args(assets, tmp_path / "cut", "--steps", "2", *lpl))
    assert load(tmp_path / "cut" / "ckpt.pt")["step"] == 2
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:  # rows a killed run wrote after its checkpoint
        f.write(json.dumps(dict(step=3, loss_diff=9.0, loss_lpl=9.0)) + "\n")
    train.main(["--resume", str(tmp_path / "cut"), "--steps", "4", "--log-every", "1"])
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert any(r["loss_lpl"] > 0 for r in full[2:])  # LPL is active after the resume
    for a, b in zip(full, cut):
        assert (a["loss_diff"], a["loss_lpl"]) == (b["loss_diff"], b["loss_lpl"])
    assert load(tmp_path / "cut" / "ckpt.pt")["step"] == 4


def test_resume_writes_into_the_directory_it_is_given(assets, tmp_path, monkeypatch):
    """A copy of a run resumes into the copy; a run made with a relative --run-dir resumes in place."""
    monkeypatch.chdir(tmp_path)
    train.main(train_args(assets, "orig", "--steps", "2", "--ckpt-every", "1"))  # relative --run-dir
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    monkeypatch.chdir(assets)  # elsewhere
    train.main(["--resume", str(tmp_path / "copy"), "--steps", "4"])
    assert load(tmp_path / "copy" / "ckpt.pt")["step"] == 4
    assert load(tmp_path / "orig" / "ckpt.pt")["step"] == 2  # the original is untouched
    assert not (assets / "orig").exists()
    train.main(["--resume", str(tmp_path / "orig"), "--steps", "3"])
    assert load(tmp_path / "orig" / "ckpt.pt")["step"] == 3


def test_resume_refuses_changed_settings_and_accepts_safe_ones(assets, tmp_path):
    run = tmp_path / "r"
    train.main(train_args(assets, run, "--steps", "2"))
    msg = one_line_error(train.main, ["--resume", str(run), "--steps", "4", "--lr", "1e-5", "--loss", "lpl"])
    assert "--loss, --lr would change them" in msg and "--init-from" in msg
    one_line_error(train.main, ["--resume", str(run), "--steps", "2"])  # already there
    assert load(run / "ckpt.pt")["step"] == 2
    # the run's own command again, plus --resume and safe overrides, is fine
    train.main(train_args(assets, run, "--steps", "3", "--resume", str(run), "--log-every", "5"))
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["log_every"] == 5 and ckpt["args"]["lr"] == 1e-4


def test_fresh_run_never_overwrites_a_run(assets, tmp_path):
    train.main(train_args(assets, tmp_path / "r", "--steps", "1"))
    assert "already holds a run" in one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "1"))
    assert load(tmp_path / "r" / "ckpt.pt")["step"] == 1


def test_non_finite_weights_are_never_saved(assets, tmp_path, monkeypatch):
    """A finite loss can still give non-finite weights (7e28 did): the checkpoint must keep the last
    finite state, and the message must say which."""
    step = torch.optim.AdamW.step
    calls = [0]

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "5", "--ckpt-every", "1"))
    assert "not finite at step 3" in msg and "checkpoint of step 2 is kept" in msg
    ckpt = load(tmp_path / "r" / "ckpt.pt")
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_nan_loss_stops_before_the_update(assets, tmp_path, monkeypatch):
    calls, mse = [], F.mse_loss

    def diverging(*a, **k):  # the loss turns NaN at the fourth step (--lr is bounded now, so no 1e20)
        calls.append(1)
        return mse(*a, **k) * (float("nan") if len(calls) >= 4 else 1.0)
    monkeypatch.setattr(train.F, "mse_loss", diverging)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "nan", "--steps", "20", "--ckpt-every", "1"))
    assert "not finite" in msg
    ckpt = load(tmp_path / "nan" / "ckpt.pt")  # readable, not half-written, and finite
    assert ckpt["step"] >= 1 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert not (tmp_path / "nan" / "ckpt.pt.tmp").exists()


def interrupt_at_step(monkeypatch, n):
    """Ctrl-C during the n-th optimizer step (before it updates)."""
    step, calls = torch.optim.AdamW.step, [0]

    def interrupted(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)


def test_interrupt_keeps_the_checkpoint_and_says_how_to_resume(assets, tmp_path, monkeypatch):
    interrupt_at_step(monkeypatch, 3)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "5", "--ckpt-every", "1"))
    assert "interrupted" in msg and "(2 steps)" in msg and "--resume" in msg
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_run_without_ckpt_every_loses_at_most_a_tenth_of_itself(assets, tmp_path, monkeypatch):
    """--ckpt-every's default follows --steps (min(5000, steps / 10)): at a fixed 5000 a 2,000-step
    post-training run kept nothing until its end."""
    interrupt_at_step(monkeypatch, 8)
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "20"))
    assert "(6 steps)" in msg and load(tmp_path / "r" / "ckpt.pt")["args"]["ckpt_every"] is None


def test_second_run_on_a_directory_is_refused(assets, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lock = train.lock_run_dir(str(run))  # a run in progress
    try:
        assert "another train.py" in one_line_error(train.main, train_args(assets, run, "--steps", "1"))
        assert (run / ".lock").exists()  # the other run's lock is left alone
    finally:
        lock.close()


def test_failed_run_leaves_no_empty_directory(assets, tmp_path):
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--steps", "1", "--batch-size", "1000"))
    assert "fewer than --batch-size" in msg and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- post-training
def test_init_from_starts_a_new_run_from_weights(assets, tmp_path, capsys):
    pre = load(assets / "runs" / "pre" / "ckpt.pt")
    train.main(train_args(assets, tmp_path / "post", "--steps", "1", "--init-from",
                          str(assets / "runs" / "pre" / "ckpt.pt"), "--loss", "lpl", "--lpl-tau", "100"))
    post = load(tmp_path / "post" / "ckpt.pt")
    assert post["step"] == 1 and post["args"]["init_from"]
    moved = [not torch.equal(pre["model"][k], post["model"][k]) for k in pre["model"]]
    assert any(moved)
    fresh = train.build_model(pre["model_config"]).state_dict()
    k = "transformer_blocks.0.attn1.to_q.weight"  # post-training started from pre's weights, not afresh
    assert (post["model"][k] - pre["model"][k]).abs().max() < (post["model"][k] - fresh[k]).abs().max()
    # EMA warm-up: the first step's decay is 1/10, so the EMA mostly follows this run, not pre's EMA
    for k in pre["ema"]:
        torch.testing.assert_close(post["ema"][k], 0.1 * pre["ema"][k] + 0.9 * post["model"][k])
    # the grid names both step counts: the post-training's own and the pre-training's before it
    sample.main(["--ckpt", str(tmp_path / "post" / "ckpt.pt"), "--out", str(tmp_path / "g.png"), "--steps", "1"])
    assert f"at step 1 after {pre['step']} of pre-training" in capsys.readouterr().out


def test_default_lpl_weight_gives_lpl_a_fifth_of_the_loss(assets, tmp_path):
    """The one-fifth rule (Section 4.3): without --lpl-weight, w_LPL is measured on the starting model
    so that w·L_LPL / (L_Diff + w·L_LPL) = 1/5. With a learning rate too small to move the model, the
    share over the run's own (other) batches must come out near 1/5; the weight is in the checkpoint."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    run = tmp_path / "auto"
    train.main(train_args(assets, run, "--init-from", pre, "--loss", "lpl", "--lpl-tau", "1000", "--lr", "1e-12",
                          "--steps", "40", "--log-every", "40", "--lpl-calibration-batches", "40"))
    w = load(run / "ckpt.pt")["args"]["lpl_weight"]
    (row,) = read_log(run)
    assert row["lpl_weight"] == w > 0
    assert abs(row["lpl_share"] - 0.2) < 0.03, row  # 1/4 or 1/2 (a rule written wrong) would fail


def test_lpl_weight_calibration_leaves_the_run_as_with_that_weight_given(assets, tmp_path):
    """The calibration batches are drawn from their own generator: a run with the measured weight
    given explicitly trains on the same batches, times and noise, and so logs the same losses."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    common = ("--init-from", pre, "--loss", "lpl", "--lpl-tau", "100", "--steps", "3")
    train.main(train_args(assets, tmp_path / "auto", *common))
    w = load(tmp_path / "auto" / "ckpt.pt")["args"]["lpl_weight"]
    train.main(train_args(assets, tmp_path / "given", *common, "--lpl-weight", repr(w)))
    for a, b in zip(read_log(tmp_path / "auto"), read_log(tmp_path / "given"), strict=True):
        assert a["loss_diff"] == b["loss_diff"] and a["loss_lpl"] == b["loss_lpl"]


def test_lpl_weight_factor_scales_the_rule(assets, tmp_path):
    """--lpl-weight-factor 0.5 halves the weight the one-fifth rule measures (the same calibration
    batches), and is refused beside an explicit --lpl-weight."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    common = ("--init-from", pre, "--loss", "lpl", "--lpl-tau", "100", "--steps", "1")
    train.main(train_args(assets, tmp_path / "rule", *common))
    train.main(train_args(assets, tmp_path / "half", *common, "--lpl-weight-factor", "0.5"))
    w, w_half = (load(tmp_path / r / "ckpt.pt")["args"]["lpl_weight"] for r in ("rule", "half"))
    assert w_half == w * 0.5
    assert "--lpl-weight-factor" in one_line_error(train.main, train_args(
        assets, tmp_path / "both", *common, "--lpl-weight", "1", "--lpl-weight-factor", "0.5"))


@pytest.mark.parametrize("loss", ["l2", "lpl"])
def test_log_step_measurements_equal_a_direct_computation_and_change_no_bit(assets, tmp_path, monkeypatch, loss):
    """At each log step an l2 run logs L_LPL of its ẑ0 (lpl_probe, no gradient) and an LPL run its
    loss there with |∇L_LPL| / |∇L_Diff| and their cosine over the DiT's parameters. (1) Measuring at
    every step leaves the weights bit-equal to measuring at the last step only; (2) the values equal
    batch_loss and two separate autograd.grad calls on the model before the step, on its batch."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    common = ["--init-from", pre, "--loss", loss] + (["--lpl-weight", "0.5", "--lpl-tau", "100"] if loss == "lpl" else [])
    runs, fit, batches, draw = [], train.Run.fit, [], train.Run.draw
    monkeypatch.setattr(train.Run, "fit", lambda self: (runs.append(self), fit(self))[1])
    train.main(train_args(assets, tmp_path / "two", "--steps", "2", *common))
    monkeypatch.setattr(train.Run, "draw", lambda self, step, gen=None: batches.append(draw(self, step, gen)) or batches[-1])
    train.main(train_args(assets, tmp_path / "every", "--steps", "3", *common))  # --log-every 1
    monkeypatch.setattr(train.Run, "draw", draw)
    train.main(train_args(assets, tmp_path / "last", "--steps", "3", *common, "--log-every", "3"))
    a, b = load(tmp_path / "every" / "ckpt.pt"), load(tmp_path / "last" / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = read_log(tmp_path / "every")
    assert all("lpl_probe" in r and ("lpl_grad_ratio" in r) == (loss == "lpl") for r in rows)
    assert read_log(tmp_path / "last")[-1]["lpl_probe"] == rows[-1]["lpl_probe"]

    run = runs[0]  # after 2 steps: its model is the one step 3 starts from
    z0, y, alpha, sigma, t_model, eps, _ = batches[-1]  # step 3's batch (the global random stream's draws)
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    out = run.model(z_t, timestep=t_model, class_labels=y).sample.float()
    lpl = LatentPerceptualLoss(run.vae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the toy autoencoder's latents are far from unit scale)
        l_lpl = lpl.batch_loss(out, z_t, z0, alpha, sigma, "eps", tau=100.0 if loss == "lpl" else 4.0)
    assert math.isclose(rows[-1]["lpl_probe"], l_lpl.item(), rel_tol=1e-5)
    if loss == "lpl":
        params = list(run.model.parameters())
        flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])  # noqa: E731
        g_lpl = flat(torch.autograd.grad(l_lpl, params, retain_graph=True, allow_unused=True))
        g_diff = flat(torch.autograd.grad(F.mse_loss(out, eps), params, allow_unused=True))
        assert math.isclose(rows[-1]["lpl_grad_ratio"], (g_lpl.norm() / g_diff.norm()).item(), rel_tol=1e-4)
        assert math.isclose(rows[-1]["lpl_grad_cos"], F.cosine_similarity(g_lpl, g_diff, dim=0).item(),
                            rel_tol=1e-3, abs_tol=1e-5)


def test_init_from_checks_what_the_checkpoint_was_trained_on(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    other = tmp_path / "two-classes"
    write_pngs(other, classes=("a", "b"))
    cases = {
        "latents (4, 8, 8)": ["--vae", str(assets / "vae8")],  # (another --image-size is a post-training at
        # that resolution now: test_post_training_at_a_higher_resolution_carries_every_weight_and_scales_tau)
        "trained on 3 classes": ["--data", str(other)],
        "does not match": ["--model", "DiT-S/2"],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(train.main, train_args(assets, tmp_path / "r", "--init-from", pre, *extra))
    train.main(train_args(assets, tmp_path / "ok", "--init-from", pre, "--steps", "1", "--model", "DiT-T/2"))
    # data, VAE and image size default to the pre-training's (the defaults would be CIFAR-10 and the SD VAE)
    train.main(["--init-from", pre, "--run-dir", str(tmp_path / "short"), "--steps", "1", "--batch-size", "8",
                "--sample-every", "1000"])
    args = load(tmp_path / "short" / "ckpt.pt")["args"]
    assert (args["data"], args["vae"], args["image_size"]) == (str(assets / "data"), str(assets / "vae"), 16)


# ---------------------------------------------------------------- bad input: one line, before the work
def test_bad_input_is_one_line(assets, tmp_path):
    bad = tmp_path / "bad"
    write_pngs(bad, classes=("a", "b"), per_class=2)
    (bad / "a" / "broken.png").write_bytes((bad / "a" / "0.png").read_bytes()[:60])  # truncated
    notimg = tmp_path / "notimg"
    write_pngs(notimg, classes=("a",), per_class=2)
    (notimg / "a" / "x.png").write_text("hello")
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "train_data_batch_1.npz", data=np.zeros((4, 100), np.uint8), labels=np.ones(4))
    (tmp_path / "file").write_text("")
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    from diffusers import UNet2DModel  # a diffusers model, but no autoencoder
    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, sample_size=8,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    (tmp_path / "notrun").mkdir()
    torch.save({"weights": 1}, tmp_path / "notrun" / "ckpt.pt")
    r = str(tmp_path / "run")
    cases = {
        "broken.png": ["--data", str(bad)],
        "x.png": ["--data", str(notimg)],
        "train_data_batch_1.npz is not an ImageNet": ["--data", str(npz)],
        "argument --image-size: '0' is not an integer >= 1": ["--image-size", "0"],
        "argument --image-size: '-16' is not an integer >= 1": ["--image-size", "-16"],
        "must be a multiple of 4": ["--image-size", "2"],  # f2 VAE x patch 2
        "argument --batch-size: '0' is not an integer >= 1": ["--batch-size", "0"],
        "argument --lr: '-1' is not a finite number > 0": ["--lr", "-1"],
        "argument --lr: 'nan' is not a finite number": ["--lr", "nan"],
        "argument --lpl-tau: 'nan' is not a finite number": ["--lpl-tau", "nan"],
        "argument --lpl-tau: '0' is not a finite number > 0": ["--lpl-tau", "0"],
        "argument --sp-layer: '0' is not an integer >= 1": ["--loss", "self-perceptual", "--init-from", str(assets / "runs" / "pre"),
                                    "--sp-layer", "0"],
        "argument --lr: '-1e-4' is not a finite number > 0": ["--lr", "-1e-4"],  # argparse reads -1e-4 as a number
        "num_blocks must be in 1..3": ["--loss", "lpl", "--lpl-blocks", "9"],
        "argument --log-every: '0' is not an integer >= 1": ["--log-every", "0"],
        "argument --ckpt-every: '0' is not an integer >= 1": ["--ckpt-every", "0"],
        "argument --steps: '0' is not an integer >= 1": ["--steps", "0"],
        "argument --steps: '-3' is not an integer >= 1": ["--steps", "-3"],
        "argument --lpl-weight: '-1' is not a finite number > 0": ["--lpl-weight", "-1"],
        "argument --lpl-weight: 'nan' is not a finite number": ["--lpl-weight", "nan"],
        "argument --ema-decay: '1.5' is not a finite number >= 0 and <= 1": ["--ema-decay", "1.5"],
        "argument --device: 'tpu9' is not a device": ["--device", "tpu9"],
        "cannot be written": ["--run-dir", str(tmp_path / "file" / "run")],
        "is missing, not an existing folder or 'cifar10'": ["--data", str(tmp_path / "nope")],
        "no images": ["--data", str(assets / "empty")],
        "is missing, not an existing folder or a Hugging Face id": ["--vae", str(tmp_path / "no-vae")],
        "cannot load the VAE": ["--vae", str(assets / "empty")],
        "is a UNet2DModel; the trainer takes the autoencoders lpl.py supports": ["--vae", str(tmp_path / "unet")],
        "corrupted or not a train.py checkpoint": ["--init-from", str(tmp_path / "junk.pt")],
        "is not a train.py checkpoint (no 'args'": ["--init-from", str(tmp_path / "other.pt")],
    }
    if not torch.cuda.is_available():
        cases["0 CUDA device(s) are visible"] = ["--device", "cuda"]
    if not torch.backends.mps.is_available():
        cases["MPS is not available"] = ["--device", "mps"]
    for expected, extra in cases.items():
        argv = train_args(assets, r, "--steps", "1", *extra)
        if "--run-dir" in extra:
            argv = train_args(assets, extra[1], "--steps", "1")
        assert expected in one_line_error(train.main, argv), expected
        assert not os.path.exists(r), expected  # nothing left behind
    assert "is not a train.py checkpoint" in one_line_error(train.main, ["--resume", str(tmp_path / "notrun")])


def test_bad_sample_input_is_one_line_before_sampling(assets, tmp_path):
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    nan = load(ckpt)
    nan["ema"] = {k: torch.full_like(v, float("nan")) for k, v in nan["ema"].items()}
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "dir.png").mkdir()
    cases = {
        "argument --n: '0' is not an integer >= 1": ["--n", "0"],
        "argument --n: '-2' is not an integer >= 1": ["--n", "-2"],
        "argument --batch-size: '0' is not an integer >= 1": ["--batch-size", "0"],
        "argument --steps: '0' is not an integer >= 1": ["--steps", "0"],
        "argument --cfg: 'nan' is not a finite number": ["--cfg", "nan"],
        "does not exist": ["--out", str(tmp_path / "missing" / "grid.png")],
        "does not end in .png": ["--out", str(tmp_path / "grid")],
        "is a folder, not a file name": ["--out", str(tmp_path / "dir.png")],  # an existing folder
        "8 latent channels": ["--vae", str(assets / "vae8")],
        "--classes must be in 0..2": ["--classes", "3"],
        "argument --per-class: '0' is not an integer >= 1": ["--per-class", "0"],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(sample.main, ["--ckpt", ckpt, *extra]), expected
    assert "non-finite weights" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "nan.pt")])
    # FID's inputs are checked before any sampling: nothing is written
    net = tmp_path / "net.pt"
    torch.jit.script(_ColourMeans()).save(str(net))
    metrics_inception = fid.inception_path
    fid.inception_path = lambda: str(net)
    try:
        write_pngs(tmp_path / "big", classes=("a",), per_class=2, size=32)
        np.savez(tmp_path / "wrong-dim.npz", mu=np.zeros(5), sigma=np.eye(5))
        np.savez(tmp_path / "no-sigma.npz", mu=np.zeros(3))
        (tmp_path / "used").mkdir()
        (tmp_path / "used" / "000000.png").write_bytes(b"old")
        out = str(tmp_path / "s")
        fid_cases = {
            "the samples 16x16": ["--fid-ref", str(tmp_path / "big")],
            "holds statistics of 5-d features, the FID network gives 3-d": ["--fid-ref", str(tmp_path / "wrong-dim.npz")],
            "is not an FID statistics file": ["--fid-ref", str(tmp_path / "no-sigma.npz")],
            "holds no images": ["--fid-ref", str(assets / "empty")],
            "--fid needs --n >= 2": ["--n", "1", "--fid-ref", str(assets / "data")],
        }
        for expected, extra in fid_cases.items():
            assert expected in one_line_error(sample.main, ["--ckpt", ckpt, "--fid", "--out-dir", out, *extra]), expected
            assert not os.path.exists(out), expected
        msg = one_line_error(sample.main, ["--ckpt", ckpt, "--out-dir", str(tmp_path / "used"), "--n", "2"])
        assert "is not empty" in msg and os.listdir(tmp_path / "used") == ["000000.png"]  # never mixed, never lost
    finally:
        fid.inception_path = metrics_inception


    huge = load(ckpt)  # finite weights whose output overflows (--cfg is bounded now, so no 1e30 guidance)
    huge["ema"] = {k: v * 1e30 if k.startswith("proj_out") else v for k, v in huge["ema"].items()}
    torch.save(huge, tmp_path / "huge.pt")
    assert "non-finite latents" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "huge.pt"), "--steps", "2",
                                                               "--out", str(tmp_path / "h.png")])


def test_interrupted_sampling_resumes_to_the_samples_and_scores_of_one_call(assets, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a batch, then --resume: the PNGs, the FID and the spectrum error are
    those of one uninterrupted call, only the batches not written whole are drawn again, and the FID
    features of those written are not computed again (kept in FEATURES)."""
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    torch.jit.script(_ColourMeans()).save(str(tmp_path / "net.pt"))
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "net.pt"))
    args = ["--ckpt", ckpt, "--n", "7", "--batch-size", "2", "--steps", "2", "--fid", "--fid-ref", str(assets / "data")]

    def scores(out):  # the FID and spectrum lines (the first call also says where it kept the reference's statistics)
        return [line for line in out.splitlines() if line.startswith(("FID ", "spectrum error "))]
    sample.main([*args, "--out-dir", str(tmp_path / "whole")])
    whole = scores(capsys.readouterr().out)
    assert len(whole) == 2

    out = tmp_path / "cut"
    save, calls = sample.save_image, [0]

    def cut(*a, **k):  # Ctrl-C while writing the 4th sample: batch 0 whole, batch 1 half written
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return save(*a, **k)
    monkeypatch.setattr(sample, "save_image", cut)
    assert "--resume" in one_line_error(sample.main, [*args, "--out-dir", str(out)])
    monkeypatch.setattr(sample, "save_image", save)
    assert sorted(os.listdir(out)) == [sample.FEATURES, sample.MANIFEST, "000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(out / sample.FEATURES)) == ["000000000-000000002.pt", "settings.json"]  # batch 0's
    msg = one_line_error(sample.main, [*args, "--out-dir", str(out)])  # without --resume: never mixed
    assert "is not empty" in msg and "--resume" in msg
    (out / "000003.tmp-999.png").write_bytes(b"half")  # what a SIGKILL leaves of a write (cli.atomic_path's name)
    lock = train.lock_run_dir(str(out))  # another call writing there
    try:
        assert "another sample.py is writing" in one_line_error(sample.main, [*args, "--out-dir", str(out), "--resume"])
    finally:
        lock.close()

    generate, drawn = sample.generate, []
    monkeypatch.setattr(sample, "generate", lambda model, paradigm, y, *a, **k: drawn.append(len(y)) or generate(
        model, paradigm, y, *a, **k))
    features, measured = fid.InceptionFeatures.__call__, []
    monkeypatch.setattr(fid.InceptionFeatures, "__call__", lambda self, x, *a, **k: measured.append(len(x)) or features(
        self, x, *a, **k))
    capsys.readouterr()
    sample.main([*args, "--out-dir", str(out), "--resume"])
    assert scores(capsys.readouterr().out) == whole
    assert drawn == [2, 2, 1]  # batches 1-3 (samples 2-6), not batch 0
    assert measured == [2, 2, 1]  # and batch 0's FID features read back from FEATURES, not computed
    for i in range(7):
        assert (out / f"{i:06d}.png").read_bytes() == (tmp_path / "whole" / f"{i:06d}.png").read_bytes(), i
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))  # the cut write gone, no lock left
    assert sample.FEATURES not in os.listdir(out)  # the features go once the FID is printed
    drawn.clear(), measured.clear()
    sample.main([*args, "--out-dir", str(out), "--resume"])  # a finished folder: scored again, nothing drawn
    assert drawn == [] and measured == [2, 2, 2, 1] and scores(capsys.readouterr().out) == whole
    sample.main([*args[:-3], "--out-dir", str(tmp_path / "new"), "--resume"])  # a new folder: a plain call
    assert len(drawn) == 4 and len(os.listdir(tmp_path / "new")) == 8


def test_resume_refuses_samples_drawn_with_any_other_setting(assets, tmp_path):
    """Every setting the samples depend on (the manifest's keys) is checked: one of them changed, the
    folder would mix two calls' samples. The test covers each key the manifest records."""
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    other = load(ckpt)
    other["ema"] = {k: v + 1e-3 for k, v in other["ema"].items()}
    torch.save(other, tmp_path / "other.pt")
    base = {"--ckpt": ckpt, "--n": "3", "--batch-size": "2", "--steps": "1", "--cfg": "1.5", "--seed": "0",
            "--classes": "0"}
    out = tmp_path / "s"

    def call(**changed):
        return [a for k, v in {**base, **changed}.items() for a in (k, v)] + ["--out-dir", str(out), "--resume"]
    sample.main(call())
    (out / "000002.png").unlink()
    changes = {"weights": {"--ckpt": str(tmp_path / "other.pt")}, "n": {"--n": "4"}, "classes": {"--classes": "1"},
               "steps": {"--steps": "2"}, "cfg": {"--cfg": "2"}, "seed": {"--seed": "1"},
               "batch_size": {"--batch-size": "3"}}
    manifest = json.loads((out / sample.MANIFEST).read_text())
    assert set(manifest) == set(changes) | {"device"}  # (one device here: cpu)
    for key, change in changes.items():
        msg = one_line_error(sample.main, call(**change))
        assert f"drawn with other settings ({key} " in msg, msg
    assert sorted(os.listdir(out)) == [sample.MANIFEST, "000000.png", "000001.png"]  # refused before any work
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "000000.png").write_bytes(b"old")
    foreign = call()[:-3] + ["--out-dir", str(tmp_path / "foreign"), "--resume"]
    assert f"no readable {sample.MANIFEST}" in one_line_error(sample.main, foreign)
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert "holds files sample.py does not write (notes.txt)" in one_line_error(sample.main, foreign)
    for f in out.glob("0*.png"):  # the settings only, no sample yet: a call from the start under new ones
        f.unlink()
    sample.main(call(**changes["seed"]))
    assert json.loads((out / sample.MANIFEST).read_text())["seed"] == 1 and len(list(out.glob("0*.png"))) == 3
    assert "--resume continues the samples of an --out-dir" in one_line_error(sample.main, ["--ckpt", ckpt, "--resume"])


def test_grid_has_a_row_per_class_and_is_reproducible(assets, tmp_path):
    """--per-class K: one row of K per class; the noise comes from --seed alone, so grids of two
    models (baseline, LPL) with one seed start from the same noise, image by image."""
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--per-class", "3", "--steps", "2"])
    assert Image.open(tmp_path / "g.png").size == (3 * 18 + 2, 3 * 18 + 2)  # 16 px images, 2 px padding
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "h.png"), "--per-class", "3", "--steps", "2"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "h.png")))
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "l.png"), "--per-class", "3", "--steps", "2", "--label-rows"])
    labelled = np.asarray(Image.open(tmp_path / "l.png"))
    w = labelled.shape[1] - (3 * 18 + 2)  # a column of names ("cat", "dog", "ship") left of the same grid
    assert w > 0 and np.array_equal(labelled[:, w:], np.asarray(Image.open(tmp_path / "g.png")))
    assert (labelled[:, :w] < 128).any() and (labelled[:, :w] == 255).mean() > 0.5  # dark text on white


def test_help_shows_every_default(capsys):
    """Every option of the three scripts has help text that ends with its default."""
    import re

    import bench
    for get_args in (train.get_args, sample.get_args, bench.get_args):
        with pytest.raises(SystemExit):
            get_args(["--help"])
        out = capsys.readouterr().out
        blocks = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]  # one per option
        assert len(blocks) > 5
        for block in blocks:
            assert block.startswith("-h") or "default" in block.lower() or "(required)" in block, block


@pytest.mark.parametrize("case", ["missing data", "corrupted ckpt", "bad type"])
def test_cli_errors_are_one_line(assets, tmp_path, case):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    argv = {
        "missing data": ["train.py", *train_args(assets, tmp_path / "r", "--data", str(tmp_path / "nope"))],
        "corrupted ckpt": ["sample.py", "--ckpt", str(tmp_path / "bad.pt")],
        "bad type": ["train.py", "--batch-size", "many"],
    }[case]
    r = run_cli(*argv)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ================================================================ torchrun: DistributedDataParallel on CPU (gloo)
def torchrun(args, nproc=2):
    """train.py under torchrun, as a user runs it; returns the finished process."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_ranks_equal_one_rank_and_resume_exactly(assets, tmp_path):
    """2 ranks x 4 samples follow 1 rank x 8 sample for sample (loss after N steps and weights, to
    float tolerance, LPL's batch expectation included); resume under 2 ranks is exact; rank 0 alone
    writes."""
    extra = ("--steps", "3", "--loss", "lpl", "--lpl-tau", "2", "--device", "cpu", "--ckpt-every", "1")
    train.main(train_args(assets, tmp_path / "one", *extra))
    p = torchrun(train_args(assets, tmp_path / "two", *extra))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 ranks x 4 samples" in p.stdout and p.stdout.count("done: 3 steps") == 1
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert any(0 < r["lpl_frac"] < 1 for r in one)  # some samples under τ, not all: the ranks select differently
    for a, b in zip(one, two):
        for k in ("loss_diff", "loss_lpl", "lpl_frac", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    w1, w2 = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    for k in w1["model"]:
        torch.testing.assert_close(w2["model"][k], w1["model"][k], rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "log.jsonl", "samples-0000003.png"]
    # stopped after 2 steps and resumed under 2 ranks = the uninterrupted 2-rank run
    p = torchrun(train_args(assets, tmp_path / "res", *extra[:-2], "--steps", "2"))
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(["--resume", str(tmp_path / "res"), "--steps", "3"])
    assert p.returncode == 0, p.stderr[-2000:]
    keys = ("step", "loss_diff", "loss_lpl", "lpl_frac", "grad_norm", "ema_decay")
    assert [[r[k] for k in keys] for r in read_log(tmp_path / "res")] == [[r[k] for k in keys] for r in two]
    w3 = load(tmp_path / "res" / "ckpt.pt")
    assert all(torch.equal(w3["model"][k], w2["model"][k]) for k in w2["model"])
    # a global batch the ranks cannot share is refused before any work, in one line from rank 0
    p = torchrun(train_args(assets, tmp_path / "odd", "--batch-size", "7", "--device", "cpu"))
    assert p.returncode != 0 and "error: --batch-size 7 (the global batch) must be a multiple of the 2 ranks" in p.stderr
    assert not (tmp_path / "odd").exists()


def test_fail_on_a_rank_other_than_0_waits_for_rank_0_to_say_why(monkeypatch, capsys):
    """torchrun stops every rank once one exits: a rank that left at once could cut rank 0 off before
    it printed the error (seen in CI). Rank 0 exits with the message; the others wait, then exit 1."""
    import cli
    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setattr(cli, "RANK", 1)
    with pytest.raises(SystemExit) as e:
        cli.fail("--batch-size 7 is bad")
    assert e.value.code == 1 and waits and waits[0] >= 10
    monkeypatch.setattr(cli, "RANK", 0)
    waits.clear()
    with pytest.raises(SystemExit) as e:
        cli.fail("--batch-size 7 is bad")
    assert e.value.code == "error: --batch-size 7 is bad" and not waits


def test_resume_from_another_folder_trains_on_its_own_data_or_refuses(assets, tmp_path, monkeypatch):
    """Paths given relative to where a run started are stored absolute, so --resume from any folder
    finds the same data, VAE and latent cache; data that changed since is refused, never trained on."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(assets / "data", start / "data")
    shutil.copytree(assets / "vae", start / "vae")
    write_pngs(elsewhere / "data", classes=("x", "y", "z"), seed=7)  # other images under the same relative name
    monkeypatch.chdir(start)
    common = ["--data", "data", "--vae", "vae", "--image-size", "16", "--model", "DiT-T/2", "--batch-size", "8",
              "--sample-every", "1000", "--log-every", "1", "--loss", "lpl", "--lpl-tau", "20"]
    train.main([*common, "--run-dir", "runs/full", "--steps", "3"])  # uninterrupted, for comparison
    train.main([*common, "--run-dir", "runs/r", "--steps", "1"])
    saved = load(start / "runs" / "r" / "ckpt.pt")["args"]
    assert saved["data"] == str(start / "data") and saved["vae"] == str(start / "vae")
    monkeypatch.chdir(elsewhere)
    train.main(["--resume", str(start / "runs" / "r"), "--steps", "3"])
    assert len(list((start / "runs").glob("latents-*.pt"))) == 1  # the run's own latents, not new ones
    assert not list(elsewhere.rglob("*.pt"))  # nothing written where it was resumed from
    assert read_log(start / "runs" / "r") == [{**row, "s_per_step": r["s_per_step"]} for row, r in
                                              zip(read_log(start / "runs" / "full"), read_log(start / "runs" / "r"))]
    resumed, full = load(start / "runs" / "r" / "ckpt.pt"), load(start / "runs" / "full" / "ckpt.pt")
    assert resumed["step"] == 3 and all(torch.equal(resumed["model"][k], full["model"][k]) for k in full["model"])
    write_pngs(start / "data", classes=("cat",), per_class=1, seed=9)  # the data changed since (a date alone would not)
    msg = one_line_error(train.main, ["--resume", str(start / "runs" / "r"), "--steps", "4"])
    assert "are not those" in msg and "resumes only on its own data" in msg
    shutil.rmtree(start / "vae")
    msg = one_line_error(train.main, ["--resume", str(start / "runs" / "r"), "--steps", "4"])
    assert "does not exist" in msg and "--vae" in msg and load(start / "runs" / "r" / "ckpt.pt")["step"] == 3


def test_init_from_is_checked_before_the_work(assets, tmp_path):
    pre = assets / "runs" / "pre"
    bad = load(pre / "ckpt.pt")
    bad["model"] = {k: v * float("inf") if v.is_floating_point() else v for k, v in bad["model"].items()}
    torch.save(bad, tmp_path / "inf.pt")
    msg = one_line_error(train.main, train_args(assets, tmp_path / "r", "--init-from", str(tmp_path / "inf.pt")))
    assert "non-finite model weights" in msg and not (tmp_path / "r").exists()
    train.main(train_args(assets, tmp_path / "r", "--init-from", str(pre), "--steps", "1"))  # a run directory
    assert load(tmp_path / "r" / "ckpt.pt")["args"]["init_from"] == str(pre / "ckpt.pt")


def test_post_training_at_a_higher_resolution_carries_every_weight_and_scales_tau(assets, tmp_path, monkeypatch):
    """--init-from with a larger --image-size (the paper's 256 -> 512 px post-training): the model is
    built at the new latent width, every learned weight comes over (one step at lr 1e-4 moves none by
    more than ~lr), τ scales by the new width / 64, and the checkpoint samples at the new size."""
    pre = load(assets / "runs" / "pre" / "ckpt.pt")
    scales = []
    real_mask = train.lpl_mask
    monkeypatch.setattr(train, "lpl_mask", lambda a, s, tau, r: scales.append(r) or real_mask(a, s, tau, r))
    run = tmp_path / "big"
    train.main(["--init-from", str(assets / "runs" / "pre" / "ckpt.pt"), "--image-size", "32", "--steps", "1",
                "--loss", "lpl", "--lpl-weight", "1", "--run-dir", str(run), "--batch-size", "8", "--sample-every", "1000"])
    ck = load(run / "ckpt.pt")
    assert tuple(ck["latent_shape"]) == (4, 16, 16) and ck["model_config"]["sample_size"] == 16
    assert tuple(pre["latent_shape"]) == (4, 8, 8)
    assert ck["model"].keys() == pre["model"].keys()
    for k, v in pre["model"].items():
        assert (ck["model"][k] - v).abs().max() <= 2e-4, k  # carried over, then one small step
    assert scales and set(scales) == {16 / 64}
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "g.png"), "--per-class", "1", "--steps", "2"])
    assert Image.open(tmp_path / "g.png").size == (1 * 34 + 2, 3 * 34 + 2)  # 32 px images, one per class
    msg = one_line_error(train.main, ["--init-from", str(assets / "runs" / "pre" / "ckpt.pt"), "--vae",
                                      str(assets / "vae8"), "--run-dir", str(tmp_path / "c8"), "--steps", "1"])
    assert "use the same VAE" in msg


@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_switching_models_along_sampling_has_its_exact_properties(paradigm):
    """generate(A, model_low=B, switch=S): B = A gives A's latents bit for bit; S = 0 gives A's; S above
    every finite σ/α of the sampler gives B's (the first step of v and flow, at pure noise, σ/α = ∞,
    stays A's); and B
    takes exactly the steps at σ_t/α_t <= S (counted against the schedule, computed apart)."""
    from model import build_model, ddpm_scheduler, generate
    cfg = dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8, num_embeds_ada_norm=3)
    torch.manual_seed(0)
    A, B = build_model(cfg).eval(), build_model(cfg).eval()
    with torch.no_grad():  # (a new DiT's output layer is zero: every model would predict the same)
        for p in [*A.parameters(), *B.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    calls = {"A": [], "B": []}
    for name, net in (("A", A), ("B", B)):
        net.register_forward_hook(lambda m, args, kw, out, name=name: calls[name].append(float(kw["timestep"][0])),
                                  with_kwargs=True)
    y, steps = torch.tensor([0, 1, 2]), 10

    def run(**kw):
        return generate(A if kw.pop("a", True) else B, paradigm, y, 3, (4, 8, 8), steps, 1.5,
                        generator=torch.Generator().manual_seed(1), **kw)
    za, zb = run(), run(a=False)
    assert torch.equal(run(model_low=A, switch=5.0), za)
    assert torch.equal(run(model_low=B, switch=0.0), za)
    if paradigm == "flow":
        ratios = [t / (1 - t) for t in torch.linspace(1, 0, steps + 1)[:-1].tolist() if t < 1]
    else:
        sched = ddpm_scheduler(paradigm)
        sched.set_timesteps(steps)
        abar = sched.alphas_cumprod[sched.timesteps]
        ratios = [math.sqrt((1 - a) / a) for a in abar.tolist() if a > 0]
    calls["A"].clear(), calls["B"].clear()
    z_top = run(model_low=B, switch=max(ratios) * 1.01)
    if paradigm == "eps":
        assert torch.equal(z_top, zb)
    else:  # v (zero terminal SNR) and flow start at pure noise, σ/α = ∞: that one step stays A's
        assert len(calls["A"]) == 1 and len(calls["B"]) == steps - 1 and not torch.equal(z_top, zb)
    S = sorted(ratios)[3]  # the 4 lowest-noise steps go to B
    calls["A"].clear(), calls["B"].clear()
    z_mid = run(model_low=B, switch=S)
    assert len(calls["B"]) == 4 and len(calls["A"]) == steps - 4
    assert not torch.equal(z_mid, za) and not torch.equal(z_mid, zb)


def test_sample_ckpt_low_on_the_command_line(assets, tmp_path):
    """The same checkpoint as --ckpt-low writes the plain call's PNGs byte for byte; a checkpoint of
    another model is refused in one line before sampling."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    sample.main(["--ckpt", pre, "--out-dir", str(tmp_path / "plain"), "--n", "4", "--steps", "3"])
    sample.main(["--ckpt", pre, "--ckpt-low", pre, "--switch", "1", "--out-dir", str(tmp_path / "mixed"), "--n", "4",
                 "--steps", "3"])
    for f in sorted(os.listdir(tmp_path / "plain")):
        if f.endswith(".png"):
            assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "mixed" / f).read_bytes()
    train.main(train_args(assets, tmp_path / "other", "--steps", "1", "--model", "DiT-XS/2"))
    msg = one_line_error(sample.main, ["--ckpt", pre, "--ckpt-low", str(tmp_path / "other" / "ckpt.pt"), "--switch", "1",
                                       "--out-dir", str(tmp_path / "x"), "--n", "2"])
    assert "model_config" in msg and not (tmp_path / "x").exists()
    assert "--switch" in one_line_error(sample.main, ["--ckpt", pre, "--ckpt-low", pre, "--out", str(tmp_path / "g.png")])
