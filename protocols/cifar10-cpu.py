# The second CPU protocol of the README's Results: CIFAR-10 at 32 px through the project's own
# autoencoder (train_vae.py's recipe: f4, 8x8x4 latents), DiT-XS/2, batch 128.
#   eps: a base model of 4,000 steps at lr 3e-4, then 2,000 post-training steps (lr 1e-4, EMA 0.999)
#        of five arms: l2, LPL with σ̂ constant (the default), LPL with σ̂ differentiated, and Cas-DM
#        with LPL as its metric and without a metric (comparisons.CasDM); each checkpoint's σ(ϕ̂)/σ(ϕ)
#        on 512 test images (metrics.py inflation; for Cas-DM, of ϕ's x'0).
#   v, flow: base models of 1,500 steps, 600 post-training steps, l2 and LPL (σ̂ constant).
# Each arm at training seeds 0, 1, 2 (runs of one seed share batches, t and noise); w_LPL by the
# one-fifth rule. Scored alike: 2,000 samples, 25 DDIM / Euler steps, guidance 1.5, sampling seed 0,
# EMA weights, FID against 5,000 random training images, spectrum error against 2,000.
# About 30 hours on 2 CPU cores (python protocol.py protocols/cifar10-cpu.py --jobs 2).
description = "the README's CPU study: eps, v and flow; l2 against LPL; three training seeds"
data = "data/cifar10-png"
data_hint = ("git clone --depth 1 https://github.com/cyizhuo/CIFAR-10-dataset data/cifar10-png "
             "(or give --data FOLDER with train/ and test/)")
autoencoder = "train_vae"
autoencoder_args = []  # train_vae.py's defaults: 3,000 steps, batch 64, seed 0
reference = dict(n=5000)
_base = ["--image-size", "32", "--model", "DiT-XS/2", "--lr", "3e-4", "--log-every", "50",
         "--ckpt-every", "250", "--sample-every", "100000"]
_post = ["--ema-decay", "0.999", "--log-every", "50", "--ckpt-every", "200", "--sample-every", "100000"]
studies = dict(
    v=dict(base=_base + ["--paradigm", "v", "--steps", "1500"], post=_post + ["--steps", "600"],
           arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl"]}, seeds=[0, 1, 2], baseline="l2",
           score_base=True),
    flow=dict(base=_base + ["--paradigm", "flow", "--steps", "1500"], post=_post + ["--steps", "600"],
              arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl"]}, seeds=[0, 1, 2], baseline="l2",
              score_base=True),
    eps=dict(base=_base + ["--steps", "4000"], post=_post + ["--steps", "2000"],
             arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl", "--lpl-detach-sigma"],
                   "lpl-grad": ["--loss", "lpl", "--no-lpl-detach-sigma"],
                   # Cas-DM (An et al.): LPL on a second network's x0, none of its gradient in the DiT
                   "cas-lpl": ["--loss", "cas-dm"], "cas-none": ["--loss", "cas-dm", "--cas-metric", "none"]},
             seeds=[0, 1, 2], baseline="l2", score_base=True, inflation=True),
)
score = dict(n=2000, steps=25, cfg=1.5, seed=0, spectrum_n=2000)
figures = True
# Seconds per unit measured on 2 cores of an AMD EPYC VM, two 1-thread jobs side by side (the
# second protocol's logs); they project the wall time until this machine has measured its own.
timings = {"vae_step": 0.94, "ref_image": 0.52, "score_sample": 0.6,
           "train:DiT-XS/2:l2": 1.7, "train:DiT-XS/2:lpl": 2.55, "train:DiT-XS/2:cas-dm": 3.0}
