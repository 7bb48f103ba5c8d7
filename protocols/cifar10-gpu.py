# The main job: the paper's protocol on one GPU. CIFAR-10 at 64 px through the SD VAE (factor 8,
# 8x8x4 latents), DiT-S/2, batch 128: pre-train 50,000 steps with the plain diffusion loss, then
# post-train from that checkpoint 20,000 steps with and without LPL (w_LPL by the one-fifth rule,
# σ̂ constant), at three training seeds, and score each by FID of 10,000 samples (50 DDIM steps,
# guidance 1.5) against the whole training set.
#   python protocol.py protocols/cifar10-gpu.py            # one GPU
#   python protocol.py protocols/cifar10-gpu.py --jobs 4   # one stage per GPU on 4 GPUs
description = "the main job: SD VAE, 64 px, DiT-S/2, l2 against LPL at three training seeds"
data = "data/cifar10-png"
data_hint = ("git clone --depth 1 https://github.com/cyizhuo/CIFAR-10-dataset data/cifar10-png "
             "(or give --data FOLDER with train/ and test/)")
autoencoder = "stabilityai/sd-vae-ft-ema"
reference = dict(n=50000)
studies = dict(
    eps=dict(
        base=["--image-size", "64", "--model", "DiT-S/2", "--steps", "50000", "--log-every", "100",
              "--ckpt-every", "5000", "--sample-every", "10000"],
        post=["--steps", "20000", "--ema-decay", "0.9995", "--log-every", "100", "--ckpt-every", "2000",
              "--sample-every", "20000"],
        arms={"l2": ["--loss", "l2"], "lpl": ["--loss", "lpl"]},
        seeds=[0, 1, 2],
        baseline="l2",
        score_base=True,
    ),
)
score = dict(n=10000, steps=50, cfg=1.5, seed=0, spectrum_n=10000)
figures = True
