"""fid.py, metrics.py, figures.py and bench.py: Fréchet distance and the Inception input, spectra,
the seed table, inflation, the outlier map, FID offline with a stand-in network."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import metrics
import sample
import train
from conftest import _ColourMeans, one_line_error, run_cli, tiny_vae, train_args, write_pngs
from lpl import LatentPerceptualLoss, detect_outliers


# ---------------------------------------------------------------- bench.py
def test_bench_runs_and_prints_the_ratios():
    r = run_cli("bench.py", "--batch-size", "4", "--image-size", "16", "--lpl-fraction", "0.5",
                "--model", "DiT-T/2", "--reps", "1", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("step-time ratio LPL / baseline", "efficiency (LPL - baseline) / limit",
                 "memory ratio LPL / baseline", "no sample under threshold / baseline",
                 "grad checkpointing: memory"):
        assert line in r.stdout
    assert "2/4 samples under the threshold" in r.stdout
    r = run_cli("bench.py", "--batch-size", "4", "--image-size", "16", "--lpl-fraction", "0.1", "--model", "DiT-T/2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("bench.py: error: --lpl-fraction 0.100 puts 0 of 4 samples under the threshold; "
                                "it must select 1 to 4: raise --lpl-fraction or --batch-size")
    r = run_cli("bench.py", "--vae", "/nonexistent/vae")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "is missing, not an existing folder" in r.stderr


# ---------------------------------------------------------------- FID, spectra, tables
def fid_of_features(f1, f2):
    return fid.frechet_distance(*fid.gaussian_stats(f1), *fid.gaussian_stats(f2))


def test_frechet_distance_of_known_gaussians():
    """N(0, I) vs N(a·1, s²I) in D dims: FID = D·(a² + (1 − s)²), and 0 for equal statistics."""
    D, a, s = 16, 0.3, 2.0
    mu1, mu2 = np.zeros(D), np.full(D, a)
    assert fid.frechet_distance(mu1, np.eye(D), mu2, s * s * np.eye(D)) == pytest.approx(D * (a * a + (1 - s) ** 2))
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D))
    sigma = A @ A.T
    assert abs(fid.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8
    feats = rng.normal(size=(500, D))
    mu, cov = fid.gaussian_stats(feats)
    torch.testing.assert_close(torch.from_numpy(cov), torch.from_numpy(np.cov(feats.T)))


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5  # rank-9 covariances
    v = fid_of_features(f1, f2)
    assert math.isfinite(v) and v > 0


def test_tf1_resize_matrix_equals_a_direct_loop():
    """TensorFlow 1 resize_bilinear (align_corners=False), written per output pixel."""
    for n_in, n_out in ((32, 299), (16, 299), (299, 299), (7, 3)):
        ref = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = i * n_in / n_out
            lo = math.floor(src)
            hi = min(lo + 1, n_in - 1)
            ref[i, lo] += 1 - (src - lo)
            ref[i, hi] += src - lo
        torch.testing.assert_close(fid.tf1_resize_matrix(n_in, n_out), ref)
    assert torch.equal(fid.tf1_resize_matrix(299, 299), torch.eye(299, dtype=torch.float64))


def test_inception_features_feed_the_network_299px_in_tf_range(tmp_path):
    """A stand-in TorchScript network (the channel means) shows what the FID network receives."""
    class Means(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-2:] == (299, 299)
            return x.mean((2, 3))
    torch.jit.script(Means()).save(str(tmp_path / "net.pt"))
    ext = fid.InceptionFeatures(str(tmp_path / "net.pt"))
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    x[0], x[1, 1] = 255, 128
    out = ext(x)
    torch.testing.assert_close(out, torch.tensor([[127 / 128] * 3, [-1.0, 0.0, -1.0]], dtype=torch.float64))
    # and end to end on folders: FID of a folder against itself is 0
    write_pngs(tmp_path / "imgs", classes=("a",), per_class=5)
    stats = fid.gaussian_stats(fid.features_of_files(fid.image_files(str(tmp_path / "imgs")), ext))
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6


def test_spectrum_of_white_noise_is_flat_and_an_image_against_itself_is_zero():
    torch.manual_seed(0)
    noise = torch.randn(256, 3, 32, 32)
    p = metrics.radial_power_spectrum(noise)
    assert p.shape == (16,)
    assert (p / p.mean() - 1).abs().max() < 0.1  # flat: white noise has the same power at every frequency
    assert p.mean() == pytest.approx(1.0, rel=0.05)  # unit variance, orthonormal FFT
    smooth = torch.nn.functional.avg_pool2d(noise, 3, 1, 1)  # a low-pass filter removes high frequencies
    ps = metrics.radial_power_spectrum(smooth)
    assert ps[-1] < 0.1 * ps[0]
    assert metrics.spectrum_error(p, p) == 0
    assert metrics.spectrum_error(2 * p, p) == pytest.approx(math.log(2))


def test_sample_fid_offline_with_a_stand_in_network(assets, tmp_path, monkeypatch, capsys):
    """sample.py --fid end to end, with a stand-in network (colour means and stds): the FID it prints
    equals the FID computed independently from the PNGs it wrote."""
    class Moments(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    torch.jit.script(Moments()).save(str(tmp_path / "net.pt"))
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "net.pt"))
    ckpt = str(assets / "runs" / "pre" / "ckpt.pt")
    msg = one_line_error(sample.main, ["--ckpt", ckpt, "--fid", "--out-dir", str(tmp_path / "s"), "--fid-ref",
                                       str(tmp_path / "nope")])
    assert "does not exist" in msg and not (tmp_path / "s").exists()
    metrics.main(["stats", str(assets / "data"), str(tmp_path / "ref.npz")])
    for i, ref in enumerate((str(assets / "data"), str(tmp_path / "ref.npz"))):  # the data folder, or its statistics
        capsys.readouterr()
        sample.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / f"s{i}"), "--n", "12", "--steps", "2", "--fid",
                     "--fid-ref", ref])
        printed = float(capsys.readouterr().out.split("FID ")[1].split()[0])
        if i == 0:  # the data folder's statistics are kept next to the run directory, once
            (kept,) = [p for p in (assets / "runs").glob("fid-stats-*.npz") if p.stat().st_mtime > os.path.getmtime(tmp_path / "net.pt")]
            mtime = kept.stat().st_mtime_ns
            sample.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / "again"), "--n", "2", "--steps", "1", "--fid",
                         "--fid-ref", ref])
            assert kept.stat().st_mtime_ns == mtime
        ext = fid.InceptionFeatures(str(tmp_path / "net.pt"))
        feats = fid.features_of_files(fid.image_files(str(tmp_path / f"s{i}")), ext)
        ref_feats = fid.features_of_files(fid.image_files(str(assets / "data")), ext)
        assert printed == pytest.approx(fid_of_features(feats, ref_feats), abs=1e-4)


def test_curves_plot_from_train_logs(assets, tmp_path):
    run = tmp_path / "lplrun"
    train.main(train_args(assets, run, "--steps", "3", "--loss", "lpl", "--lpl-tau", "100", "--init-from",
                          str(assets / "runs" / "pre" / "ckpt.pt")))
    # a post-training run's curves continue its pre-training's (2 steps)
    assert metrics.run_start(str(run / "ckpt.pt")) == 2 and metrics.run_start(str(tmp_path / "none.pt")) == 0
    metrics.main(["curves", str(run / "log.jsonl"), str(assets / "runs" / "pre" / "log.jsonl"),
                  "--out", str(tmp_path / "c.png")])
    w, h = Image.open(tmp_path / "c.png").size
    assert w > h > 100  # two panels side by side
    (tmp_path / "bad.jsonl").write_text("{not json")
    assert "cannot read" in one_line_error(metrics.main, ["curves", str(tmp_path / "bad.jsonl")])


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_inflation_measures_the_scale_of_z0_hat_on_lpl_samples_only(c):
    from types import SimpleNamespace
    vae = tiny_vae(blocks=3)
    lpl = LatentPerceptualLoss(vae)
    z0 = torch.randn(6, 4, 4, 4)
    abar = train.ddpm_scheduler("eps").alphas_cumprod
    tau, scale = 4.0, 4 / 64

    def oracle(z_t, timestep, class_labels):  # an ε prediction whose ẑ0 is exactly c·z0
        a, s = abar[timestep].sqrt().view(-1, 1, 1, 1), (1 - abar[timestep]).sqrt().view(-1, 1, 1, 1)
        assert (s / a <= tau * scale).all()  # only LPL's samples are measured
        return SimpleNamespace(sample=(z_t - a * c * z0) / s)

    slope, ratio = metrics.inflation(oracle, "eps", lpl, z0, torch.zeros(6, dtype=torch.long), tau, scale)
    assert slope == pytest.approx(c, abs=1e-4)
    assert ratio == pytest.approx(1.0, abs=1e-4) if c == 1 else ratio > 1.05  # features grow with ẑ0


def test_inflation_cli_measures_each_checkpoint_on_the_same_draws(assets, tmp_path, capsys):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    metrics.main(["inflation", str(assets / "data"), pre, pre, "--n", "5"])
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and "5 samples under τ 4" in first
    write_pngs(tmp_path / "other", classes=("zebra",), per_class=2)
    assert "classes the checkpoints do not know (zebra)" in one_line_error(
        metrics.main, ["inflation", str(tmp_path / "other"), pre])


def test_seed_table_is_mean_and_sample_std_per_arm_and_paired_by_seed(tmp_path, capsys):
    def run(name, score, spectrum, s_per_step, share=None, loss_diff=0.2, more=()):
        (tmp_path / name).mkdir()
        extra = {} if share is None else {"lpl_share": share}
        rows = [{"step": 50 * i, "loss_diff": loss_diff, "s_per_step": s, **extra}  # the first interval is warm-up,
                for i, s in enumerate((99.0, s_per_step, 40.0, s_per_step), 1)]  # the third was paused
        rows += [{"step": 50 * i, "loss_diff": 1.0, "s_per_step": s_per_step} for i in more]  # a longer log
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "score.txt").write_text(  # sample.py's lines, then metrics.py spectrum's
            f"wrote 100 samples to x\nFID {score} (100 samples against ref)\nspectrum error 9.0 (sample.py)\n"
            f"spectrum error {spectrum}  x against ref\n")
    for seed, score in enumerate((10.0, 12.0, 14.0)):  # L_Diff 1% and 3% above l2's at seeds 0 and 1
        run(f"lpl-s{seed}", score, 0.5 + 0.1 * seed, 3.0, share=0.2, loss_diff=0.2 * (1.01 + 0.02 * seed))
    run("l2-s0", 11.0, 0.6, 2.0)
    run("l2-s1", 11.0, 0.6, 2.0, more=(5, 6))  # steps lpl-s1 has not logged: not compared
    (tmp_path / "l2-s2").mkdir()  # still training: no score.txt yet
    metrics.main(["table", *(str(p) for p in sorted(tmp_path.iterdir())), "--baseline", "l2",
                  "--plot", str(tmp_path / "seeds.png")])
    assert Image.open(tmp_path / "seeds.png").size[0] > 300  # every run, joined by seed (one seed only in lpl)
    *rows, note = capsys.readouterr().out.splitlines()
    assert note == "(not scored yet, left out: l2-s2)"
    cells = {c[0]: c for c in ([c.strip() for c in r.split("|")[1:-1]] for r in rows[2:])}
    # lpl: FID 12 ± 2 (sample std of 10, 12, 14); against l2 at seeds 0 and 1: -1 and +1, so 0 ± √2
    assert cells["lpl"] == ["lpl", "0, 1, 2", "12.00 ± 2.00", "10.00, 12.00, 14.00", "0.600 ± 0.100", "3.00",
                            "0.200", "+0.00 ± 1.41", "-0.050 ± 0.071", "+2.00 ± 1.41%"]
    assert cells["l2"] == ["l2", "0, 1", "11.00 ± 0.00", "11.00, 11.00", "0.600 ± 0.000", "2.00", "", "", "", ""]
    assert "not named ARM-sSEED" in one_line_error(metrics.main, ["table", str(tmp_path)])
    assert "is a file, not an existing folder" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0" / "log.jsonl")])
    assert "none of the arms" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0"), "--baseline", "x"])
    (tmp_path / "l2-s1" / "score.txt").write_text("FID 11.0 (100 samples against ref)\n")  # no spectrum line
    metrics.main(["table", str(tmp_path / "l2-s0"), str(tmp_path / "l2-s1"), "--plot", str(tmp_path / "s2.png")])
    assert capsys.readouterr().out.splitlines()[-1].split("|")[5].strip() == "0.600"  # the one spectrum error
    assert Image.open(tmp_path / "s2.png").size[0] > 300  # plotted without the missing spectrum
    (tmp_path / "l2-s0" / "score.txt").write_text("spectrum error 0.5\n")
    assert "no 'FID ...' line" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0")])


def test_metrics_cli(tmp_path, capsys):
    write_pngs(tmp_path / "a", classes=("x",), per_class=6)
    write_pngs(tmp_path / "b", classes=("y",), per_class=6, seed=1)
    metrics.main(["spectrum", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a"), "--plot", str(tmp_path / "s.png")])
    errors = [float(line.split()[2]) for line in capsys.readouterr().out.splitlines() if line.startswith("spectrum error")]
    assert errors[0] == 0 and errors[1] > 0  # each folder against the last one: a against itself is 0
    assert Image.open(tmp_path / "s.png").size[0] > 100
    a, b = (tmp_path / "a" / "x" / "0.png"), (tmp_path / "a" / "x" / "1.png")
    metrics.main(["diff", str(a), str(b), "--gain", "2", "--zoom", "3", "--out", str(tmp_path / "d.png")])
    d = np.asarray(Image.open(tmp_path / "d.png")).astype(int)  # a | b | 128 + 2 (b - a), each 3x upscaled
    xa, xb = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
    assert d.shape == (48, 144, 3) and (d[::3, :48:3] == xa).all() and (d[::3, 48:96:3] == xb).all()
    assert (d[::3, 96::3] == np.clip(128 + 2 * (xb - xa), 0, 255)).all()
    assert "must share one size" in one_line_error(metrics.main, ["spectrum", str(tmp_path), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "empty"), str(tmp_path / "b")])
    assert "asked for 9 images" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "a"), str(tmp_path / "b"), "--n", "9"])


def test_outlier_map_command_reports_what_detect_outliers_masks(assets, tmp_path, capsys):
    from diffusers import AutoencoderKL
    metrics.main(["outliers", str(assets / "data"), "--index", "3", "--vae", str(assets / "vae"),
                  "--image-size", "32", "--out", str(tmp_path / "maps.png"), "--channels", "2"])
    printed = [float(line.split()[2].rstrip("%")) / 100 for line in capsys.readouterr().out.splitlines()
               if line.startswith("block")]
    assert Image.open(tmp_path / "maps.png").size[0] > 100
    vae = AutoencoderKL.from_pretrained(str(assets / "vae")).eval()
    x = torch.from_numpy(np.asarray(Image.open(fid.image_files(str(assets / "data"))[3]).convert("RGB")
                                    .resize((32, 32), resample=3)).copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z = vae.encode(x / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
        lpl = LatentPerceptualLoss(vae)
        expected = [1 - detect_outliers(f, down_f=512 / f.shape[-1]).float().mean().item() for f in lpl.features(z)]
    assert printed == pytest.approx(expected, abs=1e-5) and len(printed) == 3
    assert "argument --image-size: '0' is not an integer >= 8" in one_line_error(metrics.main, [
        "outliers", str(assets / "data"), "--image-size", "0"])
    assert "--index must be in 0..23" in one_line_error(metrics.main, ["outliers", str(assets / "data"), "--index", "99",
                                                                       "--vae", str(assets / "vae")])


def test_fid_of_one_image_is_an_error_not_a_hang(tmp_path):
    net = tmp_path / "net.pt"
    torch.jit.script(_ColourMeans()).save(str(net))
    ext = fid.InceptionFeatures(str(net))
    write_pngs(tmp_path / "one", classes=("a",), per_class=1)
    write_pngs(tmp_path / "many", classes=("a",), per_class=4)
    def folder_stats(folder):
        return fid.gaussian_stats(fid.features_of_files(fid.image_files(str(folder)), ext))
    assert "at least 2 images" in one_line_error(folder_stats, tmp_path / "one")
    mu, sigma = folder_stats(tmp_path / "many")
    assert "not finite" in one_line_error(fid.frechet_distance, mu, sigma * np.nan, mu, sigma)
    assert "differ in dimension" in one_line_error(fid.frechet_distance, mu, sigma, mu[:2], sigma[:2, :2])


def test_stats_killed_and_resumed_equal_one_call_and_compute_only_what_was_not_kept(tmp_path, monkeypatch, capsys):
    """metrics.py stats keeps its features as they come (a 50,000-image reference takes hours on a
    CPU): a call interrupted at its 3rd batch, continued with --resume, computes only the batches not
    kept and writes statistics equal to one call's to the last bit; a finished output is checked and
    kept; other settings, and a plain call over kept features, are refused in one line."""
    torch.jit.script(_ColourMeans()).save(str(tmp_path / "net.pt"))
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "net.pt"))
    monkeypatch.setattr(metrics, "STATS_BATCH", 2)
    write_pngs(tmp_path / "imgs", classes=("a", "b"), per_class=5)  # 10 images: 5 batches
    calls = []
    real = fid.InceptionFeatures.__call__

    def counted(self, x, *a, **k):
        calls.append(len(x))
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C, or the SIGINT a driver's stop sends
        return real(self, x, *a, **k)
    monkeypatch.setattr(fid.InceptionFeatures, "__call__", counted)
    stop_at = None
    metrics.main(["stats", str(tmp_path / "imgs"), str(tmp_path / "one.npz")])
    assert calls == [2] * 5 and not (tmp_path / "one.features").exists()
    one = np.load(tmp_path / "one.npz")

    out, keep = tmp_path / "ref.npz", tmp_path / "ref.features"
    calls.clear()
    stop_at = 3
    msg = one_line_error(metrics.main, ["stats", str(tmp_path / "imgs"), str(out)])
    assert "features of 4 of 10 images are kept" in msg and "--resume" in msg and not out.exists()
    assert sorted(p.name for p in keep.glob("*.pt")) == ["000000000-000000004.pt"]  # the two whole batches
    (keep / "000000004-000000006.tmp-99.pt").write_bytes(b"cut")  # what a kill during a write leaves
    assert "--resume" in one_line_error(metrics.main, ["stats", str(tmp_path / "imgs"), str(out)])
    assert "other settings (images 10, here 9, files_digest" in one_line_error(  # the features are not theirs
        metrics.main, ["stats", str(tmp_path / "imgs"), str(out), "--resume", "--n", "9"])
    calls.clear()
    stop_at = None
    metrics.main(["stats", str(tmp_path / "imgs"), str(out), "--resume"])
    assert calls == [2] * 3, calls  # batches 3, 4, 5 only
    got = np.load(out)
    assert all(np.array_equal(got[k], one[k]) for k in ("mu", "sigma", "size")) and not keep.exists()
    calls.clear()
    capsys.readouterr()
    with monkeypatch.context() as m:  # finished: checked, kept, nothing computed (the network not even loaded)
        m.setattr(metrics, "InceptionFeatures", None)
        metrics.main(["stats", str(tmp_path / "imgs"), str(out), "--resume"])
    assert "already holds these statistics" in capsys.readouterr().out and calls == []
    assert "exists" in one_line_error(metrics.main, ["stats", str(tmp_path / "imgs"), str(out)])
    assert "exists and holds the statistics of other" in one_line_error(
        metrics.main, ["stats", str(tmp_path / "imgs"), str(out), "--resume", "--n", "4"])
    assert fid.load_stats(str(out))[0].shape == (3,)  # readers of the statistics are unchanged


def test_a_cached_reference_killed_midway_is_continued_by_the_next_call(tmp_path, monkeypatch):
    """sample.py --fid-ref FOLDER computes the folder's statistics once into a cache; a call killed
    midway leaves its features there, and the next call computes only the rest (same statistics)."""
    write_pngs(tmp_path / "imgs", classes=("a",), per_class=250, size=8)  # 3 batches of 100
    torch.jit.script(_ColourMeans()).save(str(tmp_path / "net.pt"))
    ext = fid.InceptionFeatures(str(tmp_path / "net.pt"))
    calls = []
    real = fid.InceptionFeatures.__call__

    def counted(self, x, *a, **k):
        calls.append(len(x))
        if len(calls) == 2 and stop:
            raise KeyboardInterrupt
        return real(self, x, *a, **k)
    monkeypatch.setattr(fid.InceptionFeatures, "__call__", counted)
    (tmp_path / "c1").mkdir(), (tmp_path / "c2").mkdir()
    stop = True
    assert "--resume" in one_line_error(fid.cached_folder_stats, str(tmp_path / "imgs"), ext, str(tmp_path / "c1"))
    stop, calls[:] = False, []
    mu, sigma = fid.cached_folder_stats(str(tmp_path / "imgs"), ext, str(tmp_path / "c1"))
    assert calls == [100, 50] and not list((tmp_path / "c1").glob("*.features"))
    calls[:] = []
    mu1, sigma1 = fid.cached_folder_stats(str(tmp_path / "imgs"), ext, str(tmp_path / "c2"))
    assert calls == [100, 100, 50] and np.array_equal(mu, mu1) and np.array_equal(sigma, sigma1)


def test_metrics_cli_checks_its_inputs(tmp_path):
    write_pngs(tmp_path / "a16", classes=("a",), per_class=2, size=16)
    write_pngs(tmp_path / "a32", classes=("a",), per_class=2, size=32)
    assert ".npz" in one_line_error(metrics.main, ["stats", str(tmp_path / "a16"), str(tmp_path / "ref")])
    assert "different sizes" in one_line_error(metrics.main, ["spectrum", str(tmp_path / "a16"), str(tmp_path / "a32")])


def test_bench_checks_its_inputs():
    import bench
    for argv, expected in ((["--reps", "0"], "argument --reps: '0' is not an integer >= 1"),
                           (["--image-size", "0"], "argument --image-size: '0' is not an integer >= 8"),
                           (["--image-size", "20"], "must be a multiple of 16"),
                           (["--lpl-fraction", "0"], "argument --lpl-fraction: '0' is not a finite number > 0")):
        assert expected in one_line_error(bench.main, argv), argv


# ---------------------------------------------------------------- metrics.py denoise
@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_level_time_is_the_nearest_step_of_the_models_own_grid(paradigm):
    """flow: t = r/(1+r) exactly; eps/v: the DDPM step whose σ/α is nearest in log, found by a loop."""
    from model import ddpm_scheduler
    sched = None if paradigm == "flow" else ddpm_scheduler(paradigm)
    for r in (0.01, 0.1, 0.37, 1.0, 5.0):
        a, s, t = metrics.level_time(paradigm, r, sched)
        if paradigm == "flow":
            assert a + s == pytest.approx(1) and s / a == pytest.approx(r) and t == pytest.approx(1000 * s)
            continue
        abar = sched.alphas_cumprod.double()
        best = min(range(1000), key=lambda i: abs(math.log(((1 - abar[i]) / abar[i]).sqrt().item() / r)))
        assert t == best and a == pytest.approx(abar[t].sqrt().item()) and s == pytest.approx((1 - abar[t]).sqrt().item())


class _Oracle(torch.nn.Module):
    """A 'model' that outputs the exact noise of each batch denoise() draws (its seed, its batches)."""

    def __init__(self, shape, seed, batch):
        super().__init__()
        self.eps, self.batch, self.calls = torch.randn(shape, generator=torch.Generator().manual_seed(seed)), batch, 0

    def forward(self, z_t, timestep, class_labels):
        from types import SimpleNamespace
        chunks = self.eps.split(self.batch)
        out = chunks[self.calls % len(chunks)]
        self.calls += 1
        return SimpleNamespace(sample=out)


def test_denoise_of_an_exact_model_is_exact_and_every_model_gets_the_same_noise():
    """A model that predicts the true ε: ẑ0 = z0 up to rounding, so latent MSE ~0, L_LPL ~0, the decoded
    images equal decode(z0)'s (PSNR at its cap, spectrum error 0). A real model measured twice, and
    with the levels in another order, gives the same numbers: the noise depends on the seed alone."""
    vae = tiny_vae(blocks=2)
    lpl = LatentPerceptualLoss(vae)
    torch.manual_seed(0)
    z0, y = torch.randn(10, 4, 8, 8), torch.zeros(10, dtype=torch.long)
    ext = _ColourMeans()
    ref = metrics.denoise_reference(vae, z0, lambda x: ext(x.float()).double())
    rows = metrics.denoise(_Oracle(z0.shape, 3, 4), "eps", vae, lpl, z0, y, [0.1, 1.0], seed=3,
                           extractor=lambda x: ext(x.float()).double(), ref=ref, batch=4)
    for r in rows.values():
        assert r["latent MSE"] < 1e-10 and r["L_LPL"] < 1e-6 and r["PSNR"] == 200 and r["spectrum error"] == 0
        assert abs(r["FID"]) < 1e-6
    from model import build_model
    from train import MODELS
    torch.manual_seed(1)
    net = build_model(dict(MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8, num_embeds_ada_norm=1)).eval()
    one = metrics.denoise(net, "eps", vae, lpl, z0, y, [0.1, 1.0], seed=5, ref=ref, batch=4)
    again = metrics.denoise(net, "eps", vae, lpl, z0, y, [1.0, 0.1], seed=5, ref=ref, batch=3)
    for lv in (0.1, 1.0):
        for k, v in one[lv].items():
            assert again[lv][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (lv, k)
    other = metrics.denoise(net, "eps", vae, lpl, z0, y, [0.1], seed=6, ref=ref)
    assert other[0.1]["latent MSE"] != one[0.1]["latent MSE"]  # (the seed does draw the noise)


def test_denoise_cli_pairs_checkpoints_and_its_table_gives_paired_differences(assets, tmp_path, capsys):
    """The command on two checkpoints (the same one twice: equal lines), read back into a table of the
    baseline's values and paired differences that equal the files' numbers; bad input is one line."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    metrics.main(["denoise", pre, pre, "--data", str(assets / "data"), "--n", "6", "--levels", "0.5", "2", "--no-fid"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[:2] == lines[2:] and "level 0.5" in lines[0] and "FID" not in lines[0]
    for arm, seed, factor in (("l2", 0, 1.0), ("l2", 1, 1.0), ("lpl", 0, 0.9), ("lpl", 1, 0.8)):
        run = tmp_path / f"{arm}-s{seed}"
        run.mkdir()
        # numbers of our own: latent MSE = factor·(seed+1)/100, PSNR = 20·factor + seed
        text = "\n".join(l.split("latent MSE")[0] + f"latent MSE {factor * (seed + 1) / 100:.6f}, L_LPL 1.0, PSNR "
                         f"{20 * factor + seed:.4f} dB, spectrum error 0.5  {pre}" for l in lines[:2])
        (run / "denoise.txt").write_text(text + "\n")
    capsys.readouterr()
    metrics.main(["table", *map(str, sorted(tmp_path.glob("*-s*"))), "--baseline", "l2", "--denoise",
                  "--plot", str(tmp_path / "d.png")])
    out = capsys.readouterr().out
    assert "| l2 | 0, 1 | 0.5 | 0.0150 ± 0.0071 | 1.0000 ± 0.0000 | 20.50 ± 0.71 | 0.5000 ± 0.0000 |" in out, out
    # lpl − l2 at one seed: MSE −10% and −20%, PSNR −2 and −4 dB
    assert "| lpl | 0, 1 | 0.5 | -15.00 ± 7.07 | +0.00 ± 0.00 | -3.00 ± 1.41 | +0.0000 ± 0.0000 |" in out, out
    assert (tmp_path / "d.png").stat().st_size > 0
    for argv, says in ((["--levels", "0.5", "0.5"], "names a level twice"), (["--levels", "0"], "--levels"),
                       (["--n", "1000"], "fewer than --n 1000"), (["--n", "1"], "--n")):
        assert says in one_line_error(metrics.main, ["denoise", pre, "--data", str(assets / "data"), "--no-fid", *argv])
    assert "--baseline" in one_line_error(metrics.main, ["table", str(tmp_path / "l2-s0"), "--denoise"])
