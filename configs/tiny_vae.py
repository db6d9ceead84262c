"""Tiny FLUX-architecture VAE on the synthetic shapes images: the autoencoder stage for tiny BAGEL runs.

Command:  python -m bagel_jax.train.vae_train --config=configs/tiny_vae.py --workdir=/tmp/tiny_vae
Then:     python -m bagel_jax.train --config=configs/tiny_shapes.py --workdir=/tmp/bagel_tiny \\
              --config.model.vae.init_from=/tmp/tiny_vae
          (loads /tmp/tiny_vae/export/ae.safetensors into params['vae'] and sets model.vae.scale_factor /
          shift_factor from export/vae.json)
Expected: 1500 steps in ~20 min on 2 shared CPU cores (0.5-0.8 s/step; measured 1182 s at load ~5).
          Held-out PSNR (64 images, posterior mean) 23.7 / 27.9 / 30.4 / 32.3 / 33.6 / 33.9 dB at steps
          250 / 500 / 750 / 1000 / 1250 / 1500 (EMA 33.7, sampled latent 33.9); train-batch PSNR 34.4.
          Latents: mean -0.174, std 1.239 → scale_factor 0.807, shift_factor -0.174. Colours and shapes are
          reproduced faithfully; with vae_stage.loss="l1" the same run reaches 25.9 dB and miscolours small shapes.
Model:    model.vae of configs/tiny.py (ch 32, ch_mult (1, 1, 1, 1), 1 res block, z 16: 8× down, 378k params);
          64×64 canvas, images resized by data.vae_transform (64, 32, 16) exactly as BAGEL feeds its VAE.
Loss:     L2 + 1e-6 · per-element KL (no LPIPS / GAN terms, which FLUX's own training used); AdamW 1e-3,
          cosine to 1e-5 after 100 warmup steps, batch 8; the final (non-EMA) weights are exported.
Data:     2000 t2i images (data.seed 42: its first 200 are the tiny_shapes run's); held-out PSNR on 64 images
          rendered with vae_stage.eval_seed 1042.
:repro    the small-scale reproduction's VAE (configs/tiny_repro.py's commands): only what that run feeds its VAE,
          square scenes at 48 px, 1000 steps: 245 s on 2 idle cores (0.19 s/step), held-out PSNR 33.3 dB (EMA 32.6).
"""

import os

from bagel_jax.launch_utils import load_config


def get_config(arg=None):
    # same model.vae and data transforms as the BAGEL run that will use this VAE
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_shapes.py"))
    c.name = "tiny_vae"
    c.data.update(batch_size=8, synthetic_examples=2000, num_workers=0)
    c.train.update(
        steps=1500,
        lr=1e-3,
        min_lr=1e-5,
        schedule="cosine",
        warmup_steps=100,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        ema_decay=0.995,
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        sample_every=0,
    )
    c.vae_stage.update(
        loss="l2",
        kl_weight=1e-6,
        eval_every=250,
        eval_images=64,
        eval_seed=1042,
        eval_batch=16,
        stats_images=256,
        export="params",
    )  # the section only the VAE stage reads
    if arg == "repro":  # the reproduction's VAE images only: square scenes at 48 px (configs/tiny_repro.py)
        c.name = "tiny_vae_repro"
        c.data.update(synthetic_square=True, vae_transform=(48, 48, 16), vae_image_size=(48, 48))
        c.train.update(steps=1000)
    elif arg not in (None, ""):
        raise ValueError(f"configs/tiny_vae.py: unknown argument {arg!r} (none, or 'repro' for the 48-px scenes)")
    return c
