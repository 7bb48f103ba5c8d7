# The whole pipeline in miniature, in a few minutes on 2 CPU cores, offline: CI runs it.
# data.py toy makes 3 classes of 16 px PNGs and a tiny random autoencoder; a DiT-T/2 base run, then
# post-trainings with and without LPL at two training seeds, each scored by FID and the spectrum
# error, the seed table and its figures, and the analyses of protocols/where-lpl-acts.py in miniature. The numbers mean nothing (a random autoencoder, 30 steps):
# it shows that every stage runs, resumes and lands in results/smoke/.
description = "every stage of a protocol on toy data, in minutes"
data = "toy"
autoencoder = "toy"
reference = dict(n=48)
studies = dict(
    eps=dict(
        base=["--image-size", "16", "--model", "DiT-T/2", "--batch-size", "16", "--steps", "30",
              "--log-every", "10", "--ckpt-every", "10", "--sample-every", "1000"],
        post=["--steps", "20", "--ema-decay", "0.9", "--log-every", "5", "--ckpt-every", "5",
              "--sample-every", "1000"],
        arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl", "--lpl-calibration-batches", "2"]},
        seeds=[0, 1],
        baseline="l2",
        denoise=dict(n=8, levels=[0.5, 2], fid=["lpl"]),  # one-step ẑ0 of held-out images (FID: lpl's only)
        hybrids={"l2-hi-lpl-lo": dict(high="l2", low="lpl", switch=0.5)},  # l2 above σ/α 0.5, lpl below
        variants={"seed1": dict(arms=["l2", "lpl"], seed=1)},  # every run sampled again: the sampling noise
    ),
)
score = dict(n=24, steps=5, cfg=1.5, seed=0, spectrum_n=24)
figures = True
