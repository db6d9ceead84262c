"""shapes-future-frame: predict the next frame of a moving-shapes clip, scored with the shape detector.

Each example is a clip of ``data/builders/moving_shapes.py`` with 2 context frames (1–2 shapes, each one cell further
per frame) and its caption ("the red circle moves right"); the truth is the frame after the last context frame. The
generated frame is reduced by ``detector.detect_objects`` to (shape, colour, cell) and compared with the truth:

* ``next_frame``: every shape is at its next cell with the right shape and colour, and nothing else is there (the
  issue's goal: ≥ 0.8 for a trained tiny model);
* ``objects``: the fraction of the clips' shapes found at their next cell with the right shape and colour;
* ``copy_baseline``: ``next_frame`` of returning the last context frame (0 by construction: every shape moves), a
  property of the examples that shows the metric cannot be passed by copying.

``inferencer_future_fn(inf)`` generates the next frame the way training lays the clip out (records.py): the context
frames as one clean ``Video`` split (``frame_delta`` RoPE steps) + their ViT images, the caption, then the noised
frame; CFG contexts as the reference builds them (``cfg_text``: without the caption; ``cfg_img``: the caption only).
It runs the cache-free sampler (the KV-cached programs take image contexts only).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

from bagel_jax.data.builders import moving_shapes
from bagel_jax.eval import canvas, detector
from bagel_jax.eval.batched import call_all

_SALT = 0xF0F0
_NOISE_SALT = 0xF0F1
CONTEXT_FRAMES = 2


def make_examples(num_examples: int, seed: int = 0, min_px: int = 64, max_px: int = 96) -> list[moving_shapes.Clip]:
    """Clips of CONTEXT_FRAMES + 1 frames; example i depends only on (seed, i)."""
    return [
        moving_shapes.draw_clip(np.random.default_rng([seed, _SALT, i]), CONTEXT_FRAMES + 1, min_px, max_px)
        for i in range(num_examples)
    ]


def judge(clip: moving_shapes.Clip, detected) -> tuple[bool, int]:
    """(the whole next frame right, how many of its shapes are right) for the detections of a generated frame."""
    truth = clip.frames[CONTEXT_FRAMES]
    found = collections.Counter(detected)
    return found == collections.Counter(truth), sum(min(found[o], 1) for o in truth)


def inferencer_future_fn(inf, **sample_kw) -> Callable:
    """``future_fn`` from an ``Inferencer``; ``sample_kw``: num_timesteps, timestep_shift, cfg_* (the edit defaults
    apply otherwise)."""
    import jax

    from bagel_jax.data import images as img_lib
    from bagel_jax.data.sample import Video
    from bagel_jax.infer.api import EDIT_DEFAULTS
    from bagel_jax.infer.image import ImageSampler, decode_latents_batch

    sampler = ImageSampler(inf.model, inf.params, inf.tokenizer)
    kw = {**EDIT_DEFAULTS, **sample_kw}

    def future_fn(frames, frame_indexes, caption, seed):
        vae = [img_lib.resize(np.asarray(f, np.uint8), inf.vae_rule, name="context frame") for f in frames]
        vit = [img_lib.resize(v, inf.vit_rule, name="context frame") for v in vae]
        clip = Video(vae, list(frame_indexes), vae="clean", vit=True, vit_pixels=vit, name="context clip")
        text = inf.pre.text(caption)
        res = sampler.sample([clip, text], [clip], [text], vae[-1].shape[:2], rng=jax.random.key(seed), **kw)
        cfg = inf.model.cfg
        return decode_latents_batch(cfg.vae, inf.params["vae"], res.latents[None], res.grid_hw, cfg.latent_patch_size)[
            0
        ]

    return future_fn


class ShapesFutureFrame:
    """Evaluator: ``run(future_fn)`` with ``future_fn(frames: list of uint8 [H, W, 3], frame_indexes: list[int],
    caption: str, seed: int) -> image`` (the next frame, ``frame_indexes[-1] + 1``)
    → {"next_frame", "objects", "copy_baseline"}."""

    fn_name = "future_fn"

    def __init__(self, num_examples: int = 32, seed: int = 0, min_px: int = 64, max_px: int = 96):
        if num_examples < 1:
            raise ValueError(f"num_examples: must be >= 1, got {num_examples}")
        self.examples = make_examples(num_examples, seed, min_px, max_px)
        self.seeds = [canvas.noise_seed(seed, _NOISE_SALT, i) for i in range(num_examples)]

    def score(self, images) -> dict[str, float]:
        images = list(images)
        if len(images) != len(self.examples):
            raise ValueError(f"images: expected {len(self.examples)} (one per example), got {len(images)}")
        verdicts = [judge(c, detector.detect_objects(img)) for c, img in zip(self.examples, images)]
        copies = [judge(c, c.frames[CONTEXT_FRAMES - 1])[0] for c in self.examples]
        total = sum(len(c.frames[CONTEXT_FRAMES]) for c in self.examples)
        return {
            "next_frame": float(np.mean([ok for ok, _ in verdicts])),
            "objects": sum(n for _, n in verdicts) / total,
            "copy_baseline": float(np.mean(copies)),
        }

    def run(self, future_fn: Callable[[list, list, str, int], object]) -> dict[str, float]:
        frames = [[c.render(t) for t in range(CONTEXT_FRAMES)] for c in self.examples]
        indexes = [list(range(CONTEXT_FRAMES))] * len(self.examples)
        return self.score(call_all(future_fn, frames, indexes, [c.caption for c in self.examples], self.seeds))
