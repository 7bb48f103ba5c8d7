# Where LPL acts (README, "Where LPL acts"): cifar10-cpu's eps study made again on one machine, with the
# measurements that say what LPL trains and where along sampling its FID effect lies, and the
# settings that could flip the sign of that effect.
#   The same autoencoder, reference, base (4,000 steps) and post-training (2,000 steps, lr 1e-4, EMA
#   0.999) as protocols/cifar10-cpu.py: its l2 and lpl arms are cifar10-cpu's eps arms run again here,
#   compared with each other only, never with cifar10-cpu's committed numbers (bits differ between
#   CPU types). Arms at training seeds 0, 1, 2 (one seed: the same batches, t and noise), in the order
#   the driver runs them:
#     l2, lpl            cifar10-cpu's (lpl: σ̂ constant, w_LPL by the one-fifth rule, τ = 4 scaled)
#     lpl-half-w         w_LPL half the rule's (Fig. 9 varies w)
#     lpl-tau-unscaled   τ = 4 applied at 8x8 latents as if they were 64x64 (--lpl-tau 32): ~75% of a batch
#     lpl-channel        the authors' normalization (lpl.py normalization="channel")
#   Every checkpoint: metrics.py denoise (one-step ẑ0 of 2,000 test images at σ/α 0.1-2; without its
#   FID, 10,000 Inception passes a checkpoint, ~45 min at the reference's 0.27 s an image: by hand), σ(ϕ̂)/σ(ϕ),
#   and the logs' lpl_probe and LPL's gradient against L_Diff's. Scores as cifar10-cpu (2,000 samples,
#   25 DDIM steps, guidance 1.5, sampling seed 0), and besides: l2 above / lpl below σ/α = 0.5 (τ's
#   8x8 value) and the reverse, as soon as l2 and lpl are trained; once every arm is: every run at
#   sampling seed 1 (the sampler's own noise, which a paired difference must exceed), then l2 and lpl
#   at 100 sampling steps (Fig. 8: LPL's gains grow with the steps).
#   About 29 h with --jobs 2 on 2 cores of an AMD EPYC VM, as --dry-run projects it from that machine's rates.
#   python protocol.py protocols/where-lpl-acts.py --jobs 2
description = "where LPL acts: what it trains, where along sampling its FID effect lies, which setting flips it"
data = "data/cifar10-png"
data_hint = ("git clone --depth 1 https://github.com/cyizhuo/CIFAR-10-dataset data/cifar10-png "
             "(or give --data FOLDER with train/ and test/)")
autoencoder = "train_vae"
autoencoder_args = []  # train_vae.py's defaults, as cifar10-cpu
reference = dict(n=5000)
_base = ["--image-size", "32", "--model", "DiT-XS/2", "--lr", "3e-4", "--log-every", "50",
         "--ckpt-every", "250", "--sample-every", "100000"]
_post = ["--ema-decay", "0.999", "--log-every", "50", "--ckpt-every", "200", "--sample-every", "100000"]
_tau_eff = 0.5  # τ = 4 at 64x64 latents, scaled by 8/64: where LPL acts at 8x8 latents
studies = dict(
    eps=dict(base=_base + ["--steps", "4000"], post=_post + ["--steps", "2000"],
             arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl", "--lpl-detach-sigma"],
                   "lpl-half-w": ["--loss", "lpl", "--lpl-weight-factor", "0.5"],
                   "lpl-tau-unscaled": ["--loss", "lpl", "--lpl-tau", "32"],
                   "lpl-channel": ["--loss", "lpl", "--lpl-normalization", "channel"]},
             seeds=[0, 1, 2], baseline="l2", score_base=True, inflation=True,
             denoise=dict(n=2000, levels=[0.1, 0.25, 0.5, 1, 2], fid=[]),
             hybrids={"l2-hi-lpl-lo": dict(high="l2", low="lpl", switch=_tau_eff),
                      "lpl-hi-l2-lo": dict(high="lpl", low="l2", switch=_tau_eff)},
             variants={"seed1": dict(arms=["l2", "lpl", "lpl-half-w", "lpl-tau-unscaled", "lpl-channel"], seed=1),
                       "steps100": dict(arms=["l2", "lpl"], steps=100)}),
)
score = dict(n=2000, steps=25, cfg=1.5, seed=0, spectrum_n=2000)
figures = True
timings = {"vae_step": 0.94, "ref_image": 0.52, "score_sample": 0.6,
           "train:DiT-XS/2:l2": 1.7, "train:DiT-XS/2:lpl": 2.55}
