"""Small-scale reproduction: a tiny BAGEL on synthetic shapes that learns to answer, draw and edit, measured.

Commands (2 CPU cores; README "Reproduce at small scale"):
  python -m bagel_jax.train.vae_train --config=configs/tiny_vae.py:repro --workdir=/tmp/tiny_vae  # ~3 min
  python -m bagel_jax.train.vit_train --config=configs/tiny_vit.py --workdir=/tmp/tiny_vit        # ~0.5 min
  python -m bagel_jax.train --config=configs/tiny_repro.py --workdir=/tmp/bagel_repro \\
      --config.model.vae.init_from=/tmp/tiny_vae --config.model.vit.init_from=/tmp/tiny_vit       # ~17 min
  python -m bagel_jax.eval.runner --workdir=/tmp/bagel_repro --config=configs/tiny_repro.py:report  # trained (EMA)
  python -m bagel_jax.eval.runner --workdir=/tmp/bagel_repro --config=configs/tiny_repro.py:report \
      --params=untrained                                                        # the step-0 baseline
Expected: see the README's table (shapes-GenEval overall, shapes-VQA, shapes-edit; trained vs untrained)
          and wall time; the evals below also run during training and land in metrics.jsonl / TensorBoard.
Model:    4 MoT layers, hidden 128 (4 heads, 2 KV heads), ViT 3 layers × 64 (pretrained by the ViT stage); the
          tiny VAE's 8× latents, 2×2 patches. One token per grid cell on both sides (docs/DESIGN_NOTES.md 17): a
          scene is 3×3 ViT patches (42 px) and 3×3 generation tokens (48 px). Interpolated position ids on 16-wide
          tables (note 18): the three cells of a side are ids 0, 5, 10, far enough apart in the sin-cos tables for
          the model to tell positions apart.
"""

import os

from bagel_jax.launch_utils import load_config


def get_config(arg=None):
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_shapes.py"))
    c.name = "tiny_repro"
    # interpolated position ids on a 16-wide table (docs/DESIGN_NOTES.md 18): the 3 tokens of a side get ids 0, 5, 10
    # of the fixed sin-cos tables, not 0, 1, 2, whose vectors are nearly equal (cosine 0.88–0.98)
    c.model.update(
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        interpolate_pos=True,
        # training flow times shifted as the sampler's (3.0): the steps where a scene's layout is decided (high noise)
        # are trained as often as the sampler visits them; GenEval 0.729 in-run at 2000 steps against 0.417 unshifted
        # (docs/EXPERIMENTS.md); the future-frame task's main lever too (DESIGN_NOTES 37)
        timestep_shift=3.0,
        max_latent_size=16,
        vit_max_num_patch_per_side=16,
    )
    c.model.vit.update(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, num_positions=256)
    c.data.update(
        batch_size=4,
        synthetic_examples=20000,
        # VQA-heavy: at vlm 1.5 counting stayed at its prior (VQA count 0.54) through 3000 steps; at 3.0 it is learnt by
        # 2000 (count 1.0, VQA 0.958, GenEval 0.734); at 4.5 GenEval falls to 0.568 (docs/EXPERIMENTS.md)
        mixture=dict(t2i=2.0, vlm=3.0, edit=0.5, video=0.0, web=0.0),
        # half the questions count (count, colour, position = 2 : 1 : 1; uniform before), and 4000 steps: each answer
        # kind is learnt at a step that moves with float rounding alone (uniform: counting at step 2000-3000, or not
        # by 3000; 3 : 1 : 1: position half learnt by 3000); this leaves each room (docs/DESIGN_NOTES.md 62)
        synthetic_question_weights=(2.0, 1.0, 1.0),
        synthetic_square=True,  # a grid cell is the same latent tokens / ViT patches in every image
        # one token per grid cell: every image 42 px for the ViT (3×3 patches of 14 px) and 48 px for
        # the VAE (6×6 latents, 2×2 latent patches: 3×3 generation tokens of 16 px)
        vit_transform=(42, 42, 14),
        vae_transform=(48, 48, 16),
        vae_image_size=(48, 48),
    )
    c.train.update(
        steps=4000,
        lr=1e-3,
        min_lr=1e-5,
        schedule="cosine",
        warmup_steps=100,
        ema_decay=0.995,
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        sample_every=1000,
    )
    if arg in (None, ""):  # in-run held-out sets: small, for a trend (~2 min per GenEval round)
        c.evals.geneval = dict(type="shapes_geneval", num_examples=8, every=2000, square=True)
        c.evals.vqa = dict(type="shapes_vqa", num_examples=48, every=500, square=True)
        c.evals.edit = dict(type="shapes_edit", num_examples=16, every=4000, square=True)
    elif arg == "report":  # the README's numbers: GenEval 16 prompts per category × 4 images (as GenEval), VQA 144
        c.evals.geneval = dict(type="shapes_geneval", num_examples=16, samples_per_prompt=4, every=0, square=True)
        c.evals.vqa = dict(type="shapes_vqa", num_examples=144, every=0, square=True)
        c.evals.edit = dict(type="shapes_edit", num_examples=48, every=0, square=True)
    else:
        raise ValueError(f"configs/tiny_repro.py: unknown argument {arg!r} (none, or 'report' for the README's evals)")
    return c
