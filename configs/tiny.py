"""Tiny BAGEL for CPU tests and smoke runs: 2 layers, hidden 64, 512-token rows.

Command:  python -m bagel_jax.train --config=configs/tiny.py --workdir=/tmp/tiny --config.data.synthetic_examples=200
          (the model and budgets only: data comes from data.data_dir, default <workdir>/data; with
          data.synthetic_examples > 0 the trainer builds the synthetic shapes and their tokenizer there first;
          configs/tiny_shapes.py is this config with its data set up)
Expected: a few CPU seconds per step; both losses (ce, mse) fall within the first 30 steps.
"""

from bagel_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "tiny"
    m = c.model
    m.update(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=1_000_000.0,
        dtype="float32",
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
    )
    m.vit.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14, num_positions=64)
    m.vae.update(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, dtype="float32")
    c.data.update(
        seq_len=512,
        und_len=384,
        gen_len=128,
        max_vit_patches=128,
        max_vae_images=8,
        vae_image_size=(64, 64),
        batch_size=2,
        vit_transform=(112, 56, 14),
        vae_transform=(64, 32, 16),
    )
    c.train.update(steps=30, lr=1e-3, warmup_steps=2, ema_decay=0.99, log_every=1, checkpoint_every=10)
    return c
