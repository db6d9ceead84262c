"""Tiny BAGEL trained on the synthetic shapes data on CPU (the data is built into the workdir on first start).

Command:  python -m bagel_jax.train --config=configs/tiny_shapes.py --workdir=/tmp/bagel_tiny
Expected: ~80 s on 2 CPU cores (about 35 s of it compiling): ce falls from 6.28 (≈ ln 512, random) to ~3.4 by
          step 30; mse (flow) starts at ~1.2 and falls slowly (llm2vae is zero-initialised like the
          reference); metrics.jsonl, TensorBoard events and checkpoints 10/20/30 in the workdir.
Longer:   --config.train.steps=2000 --config.data.synthetic_examples=2000 --config.train.sample_every=500
"""

import os

from bagel_jax.launch_utils import load_config


def get_config(arg=None):
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.name = "tiny_shapes"
    c.data.update(
        builder="synthetic_shapes",
        data_dir="",
        synthetic_examples=200,
        num_workers=0,
        mixture=dict(t2i=1.0, vlm=1.0, edit=0.5, video=0.0, web=0.0),
    )
    c.train.update(
        steps=30,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=10,
        sample_every=0,
        sample_prompts=("a red circle", "two blue squares"),
        sample_question="What color is the shape?",
    )
    return c
