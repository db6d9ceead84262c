"""``Inferencer``: understanding, text-to-image and editing on one loaded model — the calls shared by the
CLI, the trainer's periodic samples and the shapes evaluators (``answer_fn`` / ``generate_fn`` / ``edit_fn``).

Cache-free reference path (recomputes the context every step). Defaults follow the reference's
notebook/app (bagel.md §8.4).
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from bagel_jax.data.images import ResizeRule
from bagel_jax.infer.context import Preprocess, interleave_contexts
from bagel_jax.infer.image import ImageSampler, decode_latents
from bagel_jax.infer.text import TextGenerator

T2I_DEFAULTS = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
EDIT_DEFAULTS = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def fit_rule(rule: ResizeRule, largest: int) -> ResizeRule:
    """``rule`` with its max side capped at what the model's position tables cover (``largest`` pixels)."""
    if rule.max_size <= largest:
        return rule
    print(f"resize rule {rule.max_size}px capped at {largest}px (the model's position table)", file=sys.stderr)
    return dataclasses.replace(rule, max_size=largest, min_size=min(rule.min_size, largest))


def safe_decode(tokenizer, ids) -> str:
    """Decodes ids; ids outside the tokenizer's vocabulary (a random model makes them) print as ``<id:N>``."""
    vocab = tokenizer.vocab_size
    pieces, run = [], []
    for i in ids:
        if 0 <= int(i) < vocab:
            run.append(int(i))
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        pieces.append(f"<id:{int(i)}>")
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)


class Inferencer:
    """Model + params + tokenizer + resize rules. ``params`` is the full Bagel param tree (incl. ``vae``)."""

    def __init__(self, model, params, tokenizer, data_cfg):
        cfg = model.cfg
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.vae_rule = fit_rule(ResizeRule.from_tuple(data_cfg.vae_transform),
                                 cfg.max_latent_size * 8 * cfg.latent_patch_size)
        self.vit_rule = fit_rule(ResizeRule.from_tuple(data_cfg.vit_transform),
                                 cfg.vit_max_num_patch_per_side * cfg.vit.patch_size)
        self.pre = Preprocess(tokenizer, self.vae_rule, self.vit_rule)
        self._text = TextGenerator(model, params, tokenizer)
        self._image = ImageSampler(model, params, tokenizer) if cfg.visual_gen else None

    def answer_ids(self, items, *, max_length: int = 512, do_sample: bool = False, temperature: float = 0.3,
                   rng=None) -> list[int]:
        """Generated token ids after the context ``items`` (texts and uint8 [H, W, 3] images)."""
        ctx = interleave_contexts(items, self.pre, understanding=True)
        return self._text.generate(ctx.gen, max_length=max_length, do_sample=do_sample, temperature=temperature,
                                   rng=jax.random.key(0) if rng is None else rng)

    def answer(self, image, question: str, **kw) -> str:
        """Understanding: the text answer to ``question`` about ``image`` (``answer_fn`` of shapes-VQA)."""
        items = ([np.asarray(image, np.uint8)] if image is not None else []) + ([question] if question else [])
        return safe_decode(self.tokenizer, self.answer_ids(items, **kw))

    def _sample(self, items, hw, *, num_timesteps, timestep_shift, rng, **cfg_kw) -> np.ndarray:
        if self._image is None:
            raise ValueError("this model has no generation weights (model.visual_gen=False)")
        ctx = interleave_contexts(items, self.pre)
        hw = hw or ctx.image_hw
        result = self._image.sample(ctx.gen, ctx.cfg_text, ctx.cfg_img, tuple(hw), num_timesteps=num_timesteps,
                                    timestep_shift=timestep_shift, rng=jax.random.key(0) if rng is None else rng,
                                    **cfg_kw)
        cfg = self.model.cfg
        return decode_latents(cfg.vae, self.params["vae"], result.latents, result.grid_hw, cfg.latent_patch_size)

    def generate(self, prompt: str, hw: tuple[int, int] | None = None, *, num_timesteps: int = 50,
                 timestep_shift: float = 3.0, rng=None, **cfg_kw) -> np.ndarray:
        """Text-to-image: uint8 [H, W, 3] (behind ``generate_fn`` of shapes-GenEval). ``hw`` defaults to the VAE
        rule's max side, square."""
        side = self.vae_rule.max_size
        return self._sample([prompt], hw or (side, side), num_timesteps=num_timesteps,
                            timestep_shift=timestep_shift, rng=rng, **{**T2I_DEFAULTS, **cfg_kw})

    def edit(self, image, instruction: str, *, num_timesteps: int = 50, timestep_shift: float = 3.0, rng=None,
             **cfg_kw) -> np.ndarray:
        """Editing: uint8 [H, W, 3] at the VAE-resized input size (behind ``edit_fn`` of shapes-edit)."""
        return self._sample([np.asarray(image, np.uint8), instruction], None, num_timesteps=num_timesteps,
                            timestep_shift=timestep_shift, rng=rng, **{**EDIT_DEFAULTS, **cfg_kw})
