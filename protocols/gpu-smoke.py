# The first thing to run on any GPU, under 5 minutes there: bench.py's ratios under bf16, a DiT-S/2
# trained a few hundred steps with LPL (bf16 autocast on CUDA), and a small FID, all on data.py's
# toy data (nothing to download). It runs on a CPU too (python protocol.py protocols/gpu-smoke.py
# --device cpu; CI does), so that no line of it is untested.
description = "bench, LPL under bf16 and a small FID: minutes on a GPU"
data = "toy"
autoencoder = "toy"
bench = ["--dtype", "bf16", "--batch-size", "16", "--image-size", "64", "--warmup", "1", "--reps", "3"]
reference = dict(n=96)
studies = dict(
    lpl=dict(base=["--image-size", "16", "--model", "DiT-S/2", "--batch-size", "32", "--steps", "200",
                   "--loss", "lpl", "--lpl-calibration-batches", "2", "--log-every", "50", "--ckpt-every", "100",
                   "--sample-every", "1000"],
             score_base=True),
)
score = dict(n=64, steps=25, cfg=1.5, seed=0, spectrum_n=64)
