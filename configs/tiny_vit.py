"""Tiny SigLIP NaViT pretrained on the synthetic shapes scenes: the vision-tower stage for tiny BAGEL runs.

Command:  python -m bagel_jax.train.vit_train --config=configs/tiny_vit.py --workdir=/tmp/tiny_vit
Then:     python -m bagel_jax.train --config=configs/tiny_repro.py --workdir=/tmp/bagel_repro \\
              --config.model.vit.init_from=/tmp/tiny_vit --config.model.vae.init_from=/tmp/tiny_vae
Expected: see docs/EXPERIMENTS.md (2.2, the ViT stage): held-out per-cell accuracy (shape and colour of each of the
          9 grid cells) near 1.0 within a few hundred steps (800 steps: 1.0, 20 s); export/ is a transformers
          SiglipVisionModel checkpoint.
Model:    model.vit of configs/tiny_repro.py (3 layers × 64, patch 14), images resized by data.vit_transform
          (42, 42, 14: every scene 42 px, 3×3 patches, one per grid cell) exactly as BAGEL feeds its ViT; two
          linear heads on per-cell mean-pooled patch features (discarded at export).
Data:     the scenes of tiny_repro's t2i split (data.seed 42, 20000 scenes), rendered on the fly; held-out accuracy
          on 256 scenes drawn with vit_stage.eval_seed 1042.
"""

import os

from bagel_jax.launch_utils import load_config


def get_config(arg=None):
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_repro.py"))
    c.name = "tiny_vit"
    c.evals = {}
    c.data.update(batch_size=32, num_workers=0)
    c.train.update(
        steps=800,
        lr=1e-3,
        min_lr=1e-5,
        schedule="cosine",
        warmup_steps=50,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.0,
        ema_decay=0.99,
        log_every=50,
        checkpoint_every=400,
        keep_checkpoints=1,
        sample_every=0,
    )
    c.vit_stage.update(eval_every=200, eval_images=256, eval_seed=1042, eval_batch=64, export="params")
    return c
