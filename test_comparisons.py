"""comparisons.py: min-SNR, the RGB loss, Self-Perceptual and Cas-DM, each a switch of train.py."""

import pytest
import torch
from PIL import Image

import comparisons
import sample
import train
from conftest import load, one_line_error, read_log, tiny_vae, train_args
from lpl import LatentPerceptualLoss, z0_from_prediction


# ================================================================ the paper's comparisons (--loss rgb / self-perceptual, --reweight, Fig. 13)
@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_min_snr_weights_are_min_snr_gamma_in_x0_space(paradigm):
    """Hang et al.: ε-prediction weights are min(SNR, γ)/SNR on known timesteps; for every paradigm
    the weighted MSE of its target equals min(SNR, γ)·‖ẑ0 − z0‖² for the same error in x0."""
    sched = train.ddpm_scheduler(paradigm if paradigm != "flow" else "eps")
    if paradigm == "flow":
        t = torch.tensor([0.02, 0.1, 0.5, 0.9, 1.0])
        alpha, sigma = 1 - t, t
    else:
        t = torch.tensor([0, 10, 200, 500, 999])
        abar = sched.alphas_cumprod[t]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    snr = alpha.double() ** 2 / sigma.double() ** 2
    w = comparisons.min_snr_weights(alpha, sigma, paradigm, gamma=5.0)
    if paradigm == "eps":
        torch.testing.assert_close(w, (snr.clamp(max=5) / snr).float())
        assert w[0] < 0.01 and w[-1] == 1  # t = 0: SNR ≈ 1000, weight 5/1000; t = 999: SNR < 5, weight 1
    torch.manual_seed(0)
    z0, eps, err = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2), 0.1 * torch.randn(5, 4, 2, 2)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z_t = a * z0 + s * eps
    z0_hat = z0 + err
    eps_hat = (z_t - a * z0_hat) / s  # the same z_t, explained by ẑ0
    target, pred = {"eps": (eps, eps_hat), "v": (a * eps - s * z0, a * eps_hat - s * z0_hat),
                    "flow": (eps - z0, eps_hat - z0_hat)}[paradigm]
    weighted = w * (pred - target).square().flatten(1).sum(1)
    x0_space = (snr.clamp(max=5) * err.double().square().flatten(1).sum(1)).float()
    keep = alpha > 0  # α = 0 (flow at t = 1): the model's output says nothing of z0, weight 0
    torch.testing.assert_close(weighted[keep], x0_space[keep], rtol=1e-4, atol=1e-6)
    assert (w[~keep] == 0).all()


@pytest.mark.parametrize("paradigm", ["eps", "v", "flow"])
def test_eps_from_prediction_recovers_the_noise(paradigm):
    torch.manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alpha, sigma = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.2, 0.5, 0.9])
    if paradigm != "flow":  # variance preserving
        sigma = (1 - alpha ** 2).sqrt()
    else:
        sigma = 1 - alpha
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z_t = a * z0 + s * eps
    out = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[paradigm]
    torch.testing.assert_close(comparisons.eps_from_prediction(out, z_t, alpha, sigma, paradigm), eps)


def test_rgb_loss_equals_a_direct_pixel_mse():
    vae = tiny_vae(blocks=2).requires_grad_(False)  # as train.py's load_vae returns it
    vae.config.scaling_factor, vae.config.shift_factor = 0.7, 0.1
    torch.manual_seed(0)
    z0 = torch.randn(3, 4, 4, 4)
    z0_hat = (z0 + 0.2 * torch.randn_like(z0)).requires_grad_()
    loss = comparisons.rgb_loss(vae, z0_hat, z0)
    with torch.no_grad():
        x, x_hat = vae.decode(z0 / 0.7 + 0.1).sample, vae.decode(z0_hat / 0.7 + 0.1).sample
    torch.testing.assert_close(loss, ((x_hat - x) ** 2).mean((1, 2, 3)))
    loss.sum().backward()
    assert z0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in vae.parameters())
    assert torch.equal(comparisons.rgb_loss(vae, z0, z0), torch.zeros(3))


def test_self_perceptual_is_zero_at_the_target_and_never_updates_its_frozen_copy():
    torch.manual_seed(0)
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=4,
                                   num_embeds_ada_norm=3))
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: make them do something
        torch.nn.init.normal_(p, std=0.05)
    for paradigm in ("eps", "v", "flow"):
        sched = None if paradigm == "flow" else train.ddpm_scheduler(paradigm)
        sp = comparisons.SelfPerceptual(model, 1, paradigm, sched)
        z0, eps, y = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
        alpha, sigma, _ = train.sample_t(paradigm, 4, "cpu", sched)
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        z_t = a * z0 + s * eps
        out = {"eps": eps, "v": a * eps - s * z0, "flow": eps - z0}[paradigm].clone().requires_grad_()
        loss = sp(out, z_t, z0, eps, alpha, sigma, y)
        loss.sum().backward()
        assert loss.shape == (4,) and loss.abs().max() < 1e-8 and out.grad.abs().max() < 1e-6, paradigm
        out2 = (out.detach() + 0.3 * torch.randn_like(out)).requires_grad_()
        loss = sp(out2, z_t, z0, eps, alpha, sigma, y)
        loss.sum().backward()
        assert (loss > 0).all() and out2.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in sp.net.parameters())


def test_self_perceptual_and_rgb_and_min_snr_train_and_resume(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    assert "needs --init-from" in one_line_error(train.main, train_args(assets, tmp_path / "x", "--loss", "self-perceptual"))
    assert "--sp-layer must be in 1..2" in one_line_error(
        train.main, train_args(assets, tmp_path / "x", "--loss", "self-perceptual", "--init-from", pre, "--sp-layer", "3"))
    run = tmp_path / "sp"
    train.main(train_args(assets, run, "--loss", "self-perceptual", "--init-from", pre, "--steps", "2",
                          "--ckpt-every", "1", "--sp-layer", "1"))
    ck, init = load(run / "ckpt.pt"), load(pre)
    for k, v in ck["sp_net"].items():  # the frozen network is the --init-from model, untouched by training
        assert torch.equal(v, init["model"][k]), k
    assert any(not torch.equal(ck["model"][k], init["model"][k]) for k in init["model"])
    assert all("loss_sp" in r for r in read_log(run))
    train.main(["--resume", str(run), "--steps", "3"])
    assert all(torch.equal(v, init["model"][k]) for k, v in load(run / "ckpt.pt")["sp_net"].items())
    run = tmp_path / "rgb"
    train.main(train_args(assets, run, "--loss", "rgb", "--init-from", pre, "--steps", "2", "--lpl-tau", "100",
                          "--reweight", "min-snr"))
    log = read_log(run)
    assert all(r["loss_rgb"] > 0 and 0 < r["aux_share"] < 1 and r["lpl_frac"] == 1 for r in log)


# ---------------------------------------------------------------- Cas-DM (comparisons.CasDM)
def _cas_batch(paradigm, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = train.ddpm_scheduler(paradigm)
    cas = comparisons.CasDM((4, 8, 8), paradigm, sched, width=8)
    for p in cas.phi.parameters():  # a ϕ that does something (its output layer starts at zero)
        torch.nn.init.normal_(p, std=0.05, generator=g)
    t = torch.tensor([0, 1, 10, 200, 600, 999])[:B]
    abar = sched.alphas_cumprod[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z0, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    z_t = alpha.view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * eps
    return cas, sched, t, alpha, sigma, z0, eps, z_t


@pytest.mark.parametrize("paradigm", ["eps", "v"])
def test_cas_dm_losses_reach_phi_only_and_l_mu_only_r(paradigm):
    """No gradient of ϕ's losses reaches θ's output (exactly zero); L^μ's reaches r_t's channel only
    (μ's stop-gradients); L^x0 and the metric reach ϕ's x'0 channels."""
    cas, sched, t, alpha, sigma, z0, eps, z_t = _cas_batch(paradigm)
    out = torch.randn_like(z0).requires_grad_()  # θ's output
    phi_out = []
    cas.phi.conv_out.register_forward_hook(lambda m, a, o: o.retain_grad() or phi_out.append(o))
    loss_x0, loss_mu, x0_prime, r = cas.losses(out, z_t, z0, alpha, sigma, t)
    lpl = LatentPerceptualLoss(tiny_vae(blocks=2))
    (loss_x0 + loss_mu + lpl(x0_prime, z0).mean()).backward()
    assert out.grad is None or torch.equal(out.grad, torch.zeros_like(out))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cas.phi.conv_out.parameters())
    out.grad, phi_out = None, []
    cas.phi.zero_grad()
    loss_x0, loss_mu, x0_prime, r = cas.losses(out, z_t, z0, alpha, sigma, t)
    loss_mu.backward()
    g = phi_out[0].grad  # (B, C + 1, h, w)
    assert torch.equal(g[:, :4], torch.zeros_like(g[:, :4])) and g[:, 4].abs().sum() > 0
    # L^μ is Eq. 12 with Eq. 7's posterior mean, written here from DDPM's β_t directly
    abar = sched.alphas_cumprod.double()
    beta = sched.betas.double()[t]
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar])[t]  # ᾱ_{t-1}, ᾱ_{-1} = 1
    c0 = (a_prev.sqrt() * beta / (1 - abar[t])).float().view(-1, 1, 1, 1)
    ct = ((1 - beta).sqrt() * (1 - a_prev) / (1 - abar[t])).float().view(-1, 1, 1, 1)
    x0_star = z0_from_prediction(out.detach(), z_t, alpha, sigma, paradigm)
    mix = r.detach() * (c0 * x0_prime.detach() + ct * z_t) + (1 - r.detach()) * (c0 * x0_star + ct * z_t)
    torch.testing.assert_close(loss_mu.detach(), ((c0 * z0 + ct * z_t) - mix).square().mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss_x0.detach(), (x0_prime.detach() - z0).square().mean())


@pytest.mark.parametrize("paradigm", ["eps", "v"])
def test_cas_dm_sampler_is_ddim_at_r_0_bit_for_bit_and_at_r_1_with_the_identity(paradigm):
    cas, sched, t, alpha, sigma, z0, eps, z_t = _cas_batch(paradigm)
    sched.set_timesteps(25)
    x0_sched = type(sched).from_config(sched.config, prediction_type="sample")
    x0_sched.set_timesteps(25)
    D, z = torch.randn_like(z0), torch.randn_like(z0)
    for ts in sched.timesteps[[0, 5, 24]]:
        ddim = sched.step(D, ts, z).prev_sample
        x0_prime, _ = cas.refine(torch.randn_like(z0), ts.expand(len(z)))
        assert torch.equal(comparisons.cas_step(sched, x0_sched, D, x0_prime, torch.zeros(len(z), 1, 8, 8), ts, z), ddim)
        abar = sched.alphas_cumprod[ts]
        x0_star = z0_from_prediction(D, z, abar.sqrt(), (1 - abar).sqrt(), paradigm)  # ϕ the identity on x0*
        got = comparisons.cas_step(sched, x0_sched, D, x0_star, torch.ones(len(z), 1, 8, 8), ts, z)
        torch.testing.assert_close(got, ddim, rtol=1e-4, atol=1e-4)
    # a fresh ϕ (zero output layer) is the identity on x0* at r = 1/2: generate() equals plain DDIM
    model = train.build_model(dict(train.MODELS["DiT-T/2"], in_channels=4, out_channels=4, sample_size=8,
                                   num_embeds_ada_norm=3))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh = comparisons.CasDM((4, 8, 8), paradigm, train.ddpm_scheduler(paradigm), width=8)
    y = torch.tensor([0, 1, 2])
    plain = train.generate(model, paradigm, y, 3, (4, 8, 8), steps=5, generator=torch.Generator().manual_seed(0))
    cascaded = train.generate(model, paradigm, y, 3, (4, 8, 8), steps=5, generator=torch.Generator().manual_seed(0),
                              cas=fresh)
    torch.testing.assert_close(cascaded, plain, rtol=1e-4, atol=1e-4)


def test_cas_dm_post_trains_resumes_samples_and_refuses_what_it_cannot_do(assets, tmp_path):
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    run = tmp_path / "cas"
    train.main(train_args(assets, run, "--loss", "cas-dm", "--init-from", pre, "--steps", "2", "--ckpt-every", "1",
                          "--lpl-tau", "100", "--cas-width", "8"))
    ck, init = load(run / "ckpt.pt"), load(pre)
    assert set(ck["cas"]) == {"config", "phi", "ema"} and ck["args"]["lpl_weight"] > 0  # λ^metric by the rule
    log = read_log(run)
    assert all(r["loss_lpl"] > 0 and r["loss_x0"] > 0 and r["loss_mu"] >= 0 and 0 < r["lpl_share"] < 1 for r in log)
    assert any(not torch.equal(ck["model"][k], init["model"][k]) for k in init["model"])  # θ trains (L_Diff)
    train.main(["--resume", str(run), "--steps", "3"])
    ck3 = load(run / "ckpt.pt")
    assert ck3["step"] == 3 and any(not torch.equal(ck3["cas"]["phi"][k], ck["cas"]["phi"][k]) for k in ck["cas"]["phi"])
    sample.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "grid.png"), "--steps", "2"])
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    run = tmp_path / "cas-none"
    train.main(train_args(assets, run, "--loss", "cas-dm", "--cas-metric", "none", "--init-from", pre, "--steps", "1"))
    assert "loss_lpl" not in read_log(run)[0] and "loss_x0" in read_log(run)[0]
    assert "only with --loss lpl, rgb or cas-dm (--cas-metric lpl); this run has --loss cas-dm --cas-metric none" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--loss", "cas-dm", "--cas-metric", "none", "--lpl-tau", "2", "--init-from", pre))
    assert "--cas-width acts only with --loss cas-dm" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--cas-width", "8"))
    flow = tmp_path / "flow-pre"
    train.main(train_args(assets, flow, "--paradigm", "flow", "--steps", "1"))
    assert "use a --paradigm eps or v model" in one_line_error(train.main, train_args(
        assets, tmp_path / "x", "--loss", "cas-dm", "--init-from", str(flow / "ckpt.pt")))



def test_inflation_of_a_cas_dm_run_measures_phis_x0_prime(assets, tmp_path, capsys):
    """Cas-DM's LPL acts on ϕ's x'0, not the DiT's ẑ0 (its sampler mixes the two by r_t), so
    metrics.py inflation measures x'0 (ϕ's EMA, which samples). With ϕ's output zero, x'0 = ẑ0."""
    import metrics
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    run = tmp_path / "cas"
    train.main(train_args(assets, run, "--loss", "cas-dm", "--init-from", pre, "--steps", "1", "--lpl-tau", "100",
                          "--cas-width", "8"))
    ck = load(run / "ckpt.pt")
    out = ck["cas"]["ema"]
    zero, shifted, plain = (dict(ck, cas=dict(ck["cas"], ema=dict(out))) for _ in range(3))
    zero["cas"]["ema"]["conv_out.weight"] = torch.zeros_like(out["conv_out.weight"])
    zero["cas"]["ema"]["conv_out.bias"] = torch.zeros_like(out["conv_out.bias"])
    shifted["cas"]["ema"]["conv_out.weight"] = zero["cas"]["ema"]["conv_out.weight"]
    shifted["cas"]["ema"]["conv_out.bias"] = torch.full_like(out["conv_out.bias"], 0.5)
    del plain["cas"]
    for name, c in (("zero", zero), ("shifted", shifted), ("plain", plain)):
        torch.save(c, tmp_path / f"{name}.pt")
    capsys.readouterr()
    metrics.main(["inflation", str(assets / "data"), *(str(tmp_path / f"{n}.pt") for n in ("zero", "shifted", "plain")),
                  "--n", "5"])
    lines = capsys.readouterr().out.splitlines()
    zero, shifted, plain = [line.split("  ")[0] for line in lines]
    assert zero.replace("x′0", "ẑ0") == plain and zero.startswith("x′0") and shifted != zero
    assert "mean r_t 0.5000" in lines[0] and f"mean r_t {torch.sigmoid(torch.tensor(0.5)).item():.4f}" in lines[1]



LOSS_ARGS = {"l2": [], "lpl": ["--lpl-tau", "100"], "rgb": ["--lpl-tau", "100"], "self-perceptual": ["--sp-layer", "1"],
             "cas-dm": ["--lpl-tau", "100", "--cas-width", "8"]}


ARMS = [["--loss", x, *LOSS_ARGS[x]] for x in train.LOSSES if x != "l2"] + [
    ["--loss", "cas-dm", "--cas-metric", "none"], ["--reweight", "min-snr"],  # and the LPL ablations
    ["--loss", "lpl", "--lpl-tau", "100", "--lpl-normalization", "separate",
     "--lpl-layer-weights", "uniform", "--lpl-no-outliers", "--lpl-blocks", "1", "--lpl-grad-checkpointing"],
    ["--loss", "lpl", "--lpl-tau", "100", "--no-lpl-detach-sigma"],
    ["--loss", "lpl", "--lpl-tau", "100", "--lpl-normalization", "channel", "--lpl-weight-factor", "0.5"]]


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: " ".join(a[:4]))
def test_every_arm_at_a_seed_draws_l2s_batches_times_noise_and_label_drops(assets, tmp_path, monkeypatch, arm):
    """Runs of one --seed are paired (the Results' "same seed" columns): whatever else an arm builds
    or draws (Cas-DM's ϕ initialised, Self-Perceptual's t'), its steps see the l2 arm's z0, y, t and ε.
    ϕ's init drew from the run's stream and shifted every t and ε of the Cas-DM arms."""
    assert set(LOSS_ARGS) == set(train.LOSSES)
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    seen = {}
    draw = train.Run.draw

    def recorded(self, step, gen=None):
        out = draw(self, step, gen)
        if gen is None:
            seen.setdefault(self.args.run_dir, []).append([v.clone() for v in out[:6]])
        return out
    monkeypatch.setattr(train.Run, "draw", recorded)
    for name, extra in (("l2", []), ("arm", arm)):
        train.main(train_args(assets, tmp_path / name, "--init-from", pre, "--steps", "3", "--seed", "1",
                              "--label-dropout", "0.5", *extra))
    l2, other = seen[str(tmp_path / "l2")], seen[str(tmp_path / "arm")]
    assert len(l2) == len(other) == 3
    for a, b in zip(l2, other):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_cas_dm_trains_its_dit_exactly_as_l2_does(assets, tmp_path):
    """Cas-DM's θ learns from L^ε alone (Eq. 14): from one --init-from and --seed, its DiT after k
    steps is the l2 arm's bit for bit, ϕ's losses and metric included. So the two arms differ only by
    ϕ's mixing at sampling, and nothing of ϕ's gradient, optimizer or RNG use leaks into θ."""
    pre = str(assets / "runs" / "pre" / "ckpt.pt")
    for name, extra in (("l2", ["--loss", "l2"]), ("cas", ["--loss", "cas-dm", "--lpl-tau", "100", "--cas-width", "8"])):
        train.main(train_args(assets, tmp_path / name, "--init-from", pre, "--steps", "3", "--seed", "1", *extra))
    l2, cas = load(tmp_path / "l2" / "ckpt.pt"), load(tmp_path / "cas" / "ckpt.pt")
    assert [r["loss_diff"] for r in read_log(tmp_path / "cas")] == [r["loss_diff"] for r in read_log(tmp_path / "l2")]
    for k in ("model", "ema"):
        assert all(torch.equal(cas[k][p], l2[k][p]) for p in l2[k]), k
    assert any(not torch.equal(cas["cas"]["phi"][p], v) for p, v in cas["cas"]["ema"].items())  # while ϕ learns
