"""The figures of the results, from numbers metrics.py computes: power spectra, same-noise
differences, loss curves, every run's FID and spectrum error by training seed, and the decoder's
outlier maps (the paper's Fig. 13). Each is written whole or not at all."""
import numpy as np
import torch

from cli import atomic_path, fail


def plot_spectra(spectra, ref_label, path):
    """spectra: {label: (n,) power}, the reference among them. Left: power against radial frequency,
    log-log; right: each spectrum divided by the reference's, where 1 is the data and small
    differences that overlap on the left are visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(8.5, 3.2), dpi=120)
    f = np.arange(1, len(spectra[ref_label]) + 1)
    for i, (label, p) in enumerate(spectra.items()):
        style = dict(color="black", lw=1.2) if label == ref_label else dict(color=f"C{i}")
        ax.loglog(f, p.numpy(), label=label, **style)
        ax_r.semilogx(f, (p / spectra[ref_label]).numpy(), label=label, **style)
    ax.set_xlabel("radial frequency (cycles per image)")
    ax.set_ylabel("mean power")
    ax.legend(frameon=False, fontsize=7)
    ax_r.set_xlabel("radial frequency (cycles per image)")
    ax_r.set_ylabel(f"power / power of {ref_label}")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # whole or not at all
        fig.savefig(tmp)
    plt.close(fig)


def difference_image(a, b, gain=8.0, zoom=1):
    """Two images of one layout (uint8 (3, H, W), e.g. grids of two models from the same noise) ->
    uint8 (3, zoom·H, 3·zoom·W): a, b and their difference amplified, 128 + gain·(b − a), side by side."""
    if a.shape != b.shape:
        fail(f"the images differ in size ({tuple(a.shape[1:])} and {tuple(b.shape[1:])}): compare grids of one layout")
    d = (128 + gain * (b.float() - a.float())).round().clamp(0, 255).to(torch.uint8)
    out = torch.cat([a, b, d], -1)  # (3, H, 3W)
    return out.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)


def plot_curves(logs, path):
    """logs: {label: rows of log.jsonl}. Left: the diffusion loss (and the weighted LPL term of runs
    that have one); right: LPL's share of the total loss, w_LPL·L_LPL / L_tot, with the paper's 1/5."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with_lpl = {k: rows for k, rows in logs.items() if any("lpl_share" in r for r in rows)}
    fig, axes = plt.subplots(1, 2 if with_lpl else 1, figsize=(8 if with_lpl else 4.5, 3.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for label, rows in logs.items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss_diff"] for r in rows], label=f"{label}: L_Diff")
        if label in with_lpl:
            share = [r["lpl_share"] for r in rows]  # w·L_LPL = L_Diff · share / (1 − share)
            ax.plot(steps, [r["loss_diff"] * s / (1 - s) for r, s in zip(rows, share)], "--",
                    label=f"{label}: w_LPL·L_LPL")
    ax.set_xlabel("step (from the start of pre-training)")
    ax.set_ylabel("loss (batch mean)")
    ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=7)
    if with_lpl:
        ax = axes[0, 1]
        for label, rows in with_lpl.items():
            ax.plot([r["step"] for r in rows], [r["lpl_share"] for r in rows], label=label)
        ax.axhline(0.2, color="gray", lw=0.8, ls=":", label="1/5 (the paper's rule)")
        ax.set_xlabel("step")
        ax.set_ylabel("w_LPL·L_LPL / L_tot")
        ax.set_ylim(0, max(0.5, max(r["lpl_share"] for rows in with_lpl.values() for r in rows) * 1.1))
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # whole or not at all
        fig.savefig(tmp)
    plt.close(fig)


def plot_seeds(arms, path):
    """FID and spectrum error of every run of read_runs: one column per arm, one colour per
    training seed, the runs of one seed joined by a line (they share batches, t and noise, so a
    gap is real where the lines agree), and each arm's mean ± std (black) beside its seeds."""
    import statistics
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.6 * len(arms), 3.4), dpi=120)
    columns = list(arms.values())  # {seed: scores} per arm, in the order given
    seeds = sorted({s for runs in columns for s in runs})
    for ax, k, name in zip(axes, (0, 1), ("FID", "spectrum error")):
        for s in seeds:  # colour C<seed>: the same seed has the same colour in every figure
            xs = [i for i, runs in enumerate(columns) if s in runs and runs[s][k] is not None]
            ax.plot(xs, [columns[i][s][k] for i in xs], "o-", color=f"C{s % 10}", lw=0.8, ms=5,
                    alpha=0.8, label=f"training seed {s}")
        for i, runs in enumerate(columns):
            v = [r[k] for r in runs.values() if r[k] is not None]  # a score.txt without a spectrum line
            if v:
                ax.errorbar(i + 0.18, statistics.mean(v), yerr=statistics.stdev(v) if len(v) > 1 else 0,
                            fmt="_", color="black", ms=10, capsize=3)
        ax.set_xticks(range(len(arms)), list(arms), rotation=15, fontsize=8)
        ax.set_xlim(-0.4, len(arms) - 0.4)
        ax.set_ylabel(f"{name} (lower is better)")
    axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # whole or not at all
        fig.savefig(tmp)
    plt.close(fig)


def plot_denoise(deltas, baseline, path):
    """metrics.py denoise's paired differences (metrics.denoise_deltas) against the noise level σ/α:
    one panel per metric, a colour per training seed, a marker per arm; the zero line is the
    baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({k for seeds in deltas.values() for lv in seeds.values() for r in lv.values() for k in r},
                   key=["latent MSE", "L_LPL", "PSNR", "FID", "spectrum error"].index)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.6, 2.8), dpi=120, squeeze=False)
    for ax, k in zip(axes[0], names):
        for j, (arm, seeds) in enumerate(deltas.items()):
            for s, levels in sorted(seeds.items()):
                lv = sorted(levels)
                ax.plot(lv, [levels[x][k] for x in lv], marker="os^vDP*"[j % 7], color=f"C{s % 10}", lw=0.8, ms=4,
                        alpha=0.8, label=f"{arm}, seed {s}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("σ/α")
        ax.set_title(f"{k}{' %' if k in ('latent MSE', 'L_LPL') else ' (dB)' if k == 'PSNR' else ''} − {baseline}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(frameon=False, fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


# ------------------------------------------------------------------------------ outlier maps (Fig. 13)
def outlier_maps(vae, x, path, channels=4):
    """The paper's Fig. 13 for one image x (1, 3, H, W) uint8: encode it, decode it through the
    taps LatentPerceptualLoss uses, and plot for each tapped layer the `channels` channels with the
    most masked positions, with Algorithm 1's mask in red. Returns each layer's masked fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lpl import LatentPerceptualLoss
    from data import encode_latents
    lpl = LatentPerceptualLoss(vae)
    with torch.no_grad():
        p = next(vae.parameters())
        z = encode_latents(vae, x.to(p) / 127.5 - 1)  # (1, C, h, w), in the diffusion model's scale
        feats = lpl.features(z)
    keeps = [lpl.outlier_mask(f)[0] for f in feats]  # ρ_l, (C_l, H_l, W_l) bool: True = kept
    masked = [1 - keep.float().mean().item() for keep in keeps]  # per layer, over all channels
    fig, axes = plt.subplots(len(feats), channels + 1, figsize=(1.6 * (channels + 1), 1.7 * len(feats)),
                             dpi=100, squeeze=False)
    for row, (f, keep, frac) in enumerate(zip(feats, keeps, masked)):
        f = f[0].float()  # (C_l, H_l, W_l)
        order = (~keep).flatten(1).float().mean(1).argsort(descending=True)[:channels]
        ax = axes[row, 0]
        if row == 0:
            ax.imshow(x[0].permute(1, 2, 0).numpy())
        else:
            ax.set_axis_off()
        ax.set_title(f"block {row + 1}: {f.shape[0]}x{f.shape[1]}x{f.shape[2]}\n{100 * frac:.2f}% masked", fontsize=7)
        for c, ax in zip(order.tolist(), axes[row, 1:]):
            ax.imshow(f[c].numpy(), cmap="gray")
            red = np.zeros((*f.shape[1:], 4))
            red[..., 0], red[..., 3] = 1.0, 0.6 * (~keep[c]).numpy()
            ax.imshow(red)
            ax.set_title(f"ch {c}: {100 * (~keep[c]).float().mean():.1f}%", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("red: positions Algorithm 1 masks (ρ = 0), on the target's decoder features", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # whole or not at all
        fig.savefig(tmp)
    plt.close(fig)
    return masked
