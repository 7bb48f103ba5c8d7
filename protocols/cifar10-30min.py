# What a laptop shows in about half an hour of 2 CPU cores: the CPU study scaled down. A small
# autoencoder (train_vae.py's recipe, 400 steps), a DiT-XS/2 base of 300 steps, then 150 steps of
# each arm (l2, LPL with σ̂ constant, LPL with σ̂ differentiated) at one training seed, each scored
# on 128 samples, with the decoder-feature scale σ(ϕ̂)/σ(ϕ) of every checkpoint.
# What to read: the order of the arms in σ(ϕ̂)/σ(ϕ) and in the spectrum error (the study's
# finding: the gradient through σ̂ inflates the features and moves the spectrum furthest). FID at
# n = 128 is noise: do not read it.
#   python protocol.py protocols/cifar10-30min.py --jobs 2
description = "the CPU study in miniature: three arms, one seed, about 30 minutes on 2 cores"
data = "data/cifar10-png"
data_hint = ("git clone --depth 1 https://github.com/cyizhuo/CIFAR-10-dataset data/cifar10-png "
             "(or give --data FOLDER with train/ and test/)")
autoencoder = "train_vae"
autoencoder_args = ["--steps", "400"]
reference = dict(n=500)
studies = dict(
    eps=dict(base=["--image-size", "32", "--model", "DiT-XS/2", "--lr", "3e-4", "--steps", "300",
                   "--log-every", "25", "--ckpt-every", "100", "--sample-every", "100000"],
             post=["--steps", "150", "--ema-decay", "0.99", "--log-every", "25", "--ckpt-every", "50",
                   "--sample-every", "100000"],
             arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl"],
                   "lpl-grad": ["--loss", "lpl", "--no-lpl-detach-sigma"]},
             seeds=[0], baseline="l2", inflation=True),
)
score = dict(n=128, steps=25, cfg=1.5, seed=0, spectrum_n=128)
figures = True
# Seconds per unit as measured for cifar10-cpu (2 cores of an AMD EPYC VM), until this machine has its own.
timings = {"vae_step": 0.94, "ref_image": 0.52, "score_sample": 0.6,
           "train:DiT-XS/2:l2": 1.7, "train:DiT-XS/2:lpl": 2.55}
