"""``Inferencer``: understanding, text-to-image and editing on one loaded model — the calls shared by the
CLI, the trainer's periodic samples and the shapes evaluators (``answer_fn`` / ``generate_fn`` / ``edit_fn``).

Two paths, one interface (``cached=``):

* ``cached=True`` (default): the KV-cached, batched, compile-once path (``cached_image.py``, ``cached_text.py``):
  a ``*_batch`` call runs its requests ``max_batch`` at a time, one compiled program per shape bucket, shared by
  every ``Inferencer`` on the same model config; the VAE decode is compiled once per batch bucket and size.
* ``cached=False``: the cache-free oracle (``image.py``, ``text.py``): recomputes the whole context every step,
  one request at a time; the reference the cached path is tested against.

Think mode and interleaved text/image generation (``think``, ``interleave``) run on either path
(``interleave.py``). Both draw a request's noise from its own key (``noise.py``), so a seed gives the same image on
either path, alone or in a batch. Defaults follow the reference's notebook/app (bagel.md §8.4).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
import numpy as np

from bagel_jax.data.images import ResizeRule
from bagel_jax.infer.buckets import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT_TOKENS, batch_bucket, chunks
from bagel_jax.infer.cached_image import CachedImageSampler
from bagel_jax.infer.cached_text import CachedTextGenerator
from bagel_jax.infer.context import Preprocess, interleave_contexts
from bagel_jax.infer.image import ImageSampler, decode_latents_batch
from bagel_jax.infer.placement import placement_for
from bagel_jax.infer.requests import check_image_hw
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
    """Model + params + tokenizer + resize rules. ``params`` is the full Bagel param tree (incl. ``vae``): host
    arrays (put on the device once here) or arrays already on a mesh (the train state's EMA, ``place_params``),
    used where they are.

    ``mesh`` / ``rules``: where the programs run (``infer/placement.py``; default the params' own mesh, else one
    device) and the logical-axis rules (default the project's table). In a multi-process job every process makes
    the same calls with the same inputs and gets the same outputs.

    ``cached``: the KV-cached batched path (default) or the cache-free oracle. ``max_batch``: requests per compiled
    call (larger batches run in pieces); ``max_context_tokens``: the KV cache's limit (context + generated tokens).
    """

    def __init__(
        self,
        model,
        params,
        tokenizer,
        data_cfg,
        *,
        cached: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        mesh=None,
        rules=None,
    ):
        cfg = model.cfg
        self.placement = placement_for(params, mesh, rules)
        if not cached and jax.process_count() > 1:
            raise ValueError("the cache-free oracle (cached=False) runs in one process only")
        params = self.placement.put(params)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.cached, self.max_batch, self.max_context_tokens = cached, max_batch, max_context_tokens
        self.vae_rule = fit_rule(
            ResizeRule.from_tuple(data_cfg.vae_transform), cfg.max_latent_size * 8 * cfg.latent_patch_size
        )
        self.vit_rule = fit_rule(
            ResizeRule.from_tuple(data_cfg.vit_transform), cfg.vit_max_num_patch_per_side * cfg.vit.patch_size
        )
        self.pre = Preprocess(tokenizer, self.vae_rule, self.vit_rule)
        limits = dict(max_batch=max_batch, max_context_tokens=max_context_tokens, placement=self.placement)
        if cached:
            self._text = CachedTextGenerator(model, params, tokenizer, **limits)
            self._image = CachedImageSampler(model, params, tokenizer, **limits) if cfg.visual_gen else None
        else:
            self._text = TextGenerator(model, params, tokenizer)
            self._image = ImageSampler(model, params, tokenizer) if cfg.visual_gen else None

    # --- understanding ----------------------------------------------------------------------------

    def answer_ids(
        self, items, *, max_length: int = 512, do_sample: bool = False, temperature: float = 0.3, rng=None
    ) -> list[int]:
        """Generated token ids after the context ``items`` (texts and uint8 [H, W, 3] images)."""
        return self.answer_ids_batch(
            [items],
            max_length=max_length,
            do_sample=do_sample,
            temperature=temperature,
            rngs=None if rng is None else [rng],
        )[0]

    def answer_ids_batch(
        self,
        items_list: Sequence,
        *,
        max_length: int = 512,
        do_sample: bool = False,
        temperature: float = 0.3,
        rngs: Sequence | None = None,
    ) -> list[list[int]]:
        """``answer_ids`` of many contexts (``rngs``: per context a key or int seed; default key 0 each)."""
        contexts = [interleave_contexts(items, self.pre, understanding=True).gen for items in items_list]
        kw = dict(max_length=max_length, do_sample=do_sample, temperature=temperature)
        return self.text_ids_batch(contexts, rngs=rngs, **kw)[0]

    def text_ids_batch(
        self,
        contexts: Sequence[Sequence],
        *,
        max_length: int = 512,
        do_sample: bool = False,
        temperature: float = 0.3,
        rngs: Sequence | None = None,
        stop_ids: Sequence[int] | None = None,
        posterior_noise: Sequence | None = None,
    ) -> tuple[list[list[int]], list[int | None]]:
        """Text decoded after each context (a list of ``data.sample`` segments): (ids per context, the stop token
        that ended each, None at the length limit). ``stop_ids`` default: ``<|im_end|>`` alone. ``posterior_noise``:
        optional, per context a list of [h/8, w/8, C] draws of its VAE images (default: from its key)."""
        rngs = [jax.random.key(0)] * len(contexts) if rngs is None else list(rngs)
        if len(rngs) != len(contexts):
            raise ValueError(f"rngs: expected {len(contexts)} (one per context), got {len(rngs)}")
        stop_ids = (self.tokenizer.eos_id,) if stop_ids is None else tuple(stop_ids)
        kw = dict(max_length=max_length, do_sample=do_sample, temperature=temperature)
        if posterior_noise is not None and len(posterior_noise) != len(contexts):
            raise ValueError(f"posterior_noise: expected {len(contexts)} (one per context), got {len(posterior_noise)}")
        post = [None] * len(contexts) if posterior_noise is None else list(posterior_noise)
        if not self.cached:
            res = [
                self._text.generate_until(c, stop_ids, rng=_key(r), posterior_noise=p, **kw)
                for c, r, p in zip(contexts, rngs, post)
            ]
            return [r[0] for r in res], [r[1] for r in res]
        ids: list = []
        stops: list = []
        for part in chunks(len(contexts), self.max_batch):
            got, stopped, _ = self._text.generate_until(
                [contexts[i] for i in part],
                stop_ids,
                rngs=[rngs[i] for i in part],
                posterior_noise=None if posterior_noise is None else [post[i] for i in part],
                **kw,
            )
            ids += got
            stops += stopped
        return ids, stops

    def answer(self, image, question: str, *, rng=None, **kw) -> str:
        """Understanding: the text answer to ``question`` about ``image`` (``answer_fn`` of shapes-VQA); ``kw``:
        max_length, do_sample, temperature."""
        return self.answer_batch([image], [question], rngs=None if rng is None else [rng], **kw)[0]

    def answer_batch(self, images: Sequence, questions: Sequence[str], **kw) -> list[str]:
        """``answer`` of many (image or None, question) pairs (``kw`` as ``answer_ids_batch``)."""
        if len(images) != len(questions):
            raise ValueError(f"images / questions: {len(images)} vs {len(questions)}, expected one each")
        items = [
            ([np.asarray(im, np.uint8)] if im is not None else []) + ([q] if q else [])
            for im, q in zip(images, questions)
        ]
        return [safe_decode(self.tokenizer, ids) for ids in self.answer_ids_batch(items, **kw)]

    # --- image generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        hw: tuple[int, int] | None = None,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        rng=None,
        init_noise=None,
        **cfg_kw,
    ) -> np.ndarray:
        """Text-to-image: uint8 [H, W, 3] (behind ``generate_fn`` of shapes-GenEval). ``hw`` defaults to the VAE
        rule's max side, square; ``rng`` (default key 0) draws the initial noise unless ``init_noise`` is given."""
        return self.generate_batch(
            [prompt],
            [_key(rng)],
            hw,
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            init_noise=None if init_noise is None else [init_noise],
            **cfg_kw,
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[str],
        rngs: Sequence,
        hw: tuple[int, int] | None = None,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        init_noise=None,
        **cfg_kw,
    ) -> list[np.ndarray]:
        """``generate`` of many prompts, each image with its own key or int seed (a prompt may repeat)."""
        side = self.vae_rule.max_size
        return self.sample_batch(
            [[p] for p in prompts],
            rngs,
            [hw or (side, side)] * len(prompts),
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            init_noise=init_noise,
            **{**T2I_DEFAULTS, **cfg_kw},
        )

    def edit(
        self,
        image,
        instruction: str,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        rng=None,
        init_noise=None,
        posterior_noise=None,
        **cfg_kw,
    ) -> np.ndarray:
        """Editing: uint8 [H, W, 3] at the VAE-resized input size (behind ``edit_fn`` of shapes-edit).
        ``posterior_noise``: the source image's VAE posterior draw [h/8, w/8, C] (default: from ``rng``)."""
        return self.edit_batch(
            [image],
            [instruction],
            [_key(rng)],
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            init_noise=None if init_noise is None else [init_noise],
            posterior_noise=None if posterior_noise is None else [[posterior_noise]],
            **cfg_kw,
        )[0]

    def edit_batch(
        self,
        images: Sequence,
        instructions: Sequence[str],
        rngs: Sequence,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        init_noise=None,
        posterior_noise=None,
        **cfg_kw,
    ) -> list[np.ndarray]:
        """``edit`` of many (image, instruction) pairs, each with its own key or int seed."""
        if len(images) != len(instructions):
            raise ValueError(f"images / instructions: {len(images)} vs {len(instructions)}, expected one each")
        items = [[np.asarray(im, np.uint8), ins] for im, ins in zip(images, instructions)]
        return self.sample_batch(
            items,
            rngs,
            None,
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            init_noise=init_noise,
            posterior_noise=posterior_noise,
            **{**EDIT_DEFAULTS, **cfg_kw},
        )

    def sample_batch(
        self,
        items_list: Sequence,
        rngs: Sequence,
        hws: Sequence | None = None,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        init_noise=None,
        posterior_noise=None,
        **cfg_kw,
    ) -> list[np.ndarray]:
        """One image after each interleaved context (texts and uint8 images, the reference's
        ``interleave_inference``), uint8 [H, W, 3] each.

        Args:
          items_list: per request, its input items; rngs: per request a key or int seed.
          hws: per request the output (H, W) (default: the request's last input image's VAE-resized size).
          init_noise: optional per request float[(H/16)(W/16), p²C]; posterior_noise: optional per request a list
            of [h/8, w/8, C] draws, one per input image.
          cfg_kw: cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min.
        """
        if self._image is None:
            raise ValueError("this model has no generation weights (model.visual_gen=False)")
        if hws is not None and len(hws) != len(items_list):
            raise ValueError(f"hws: expected {len(items_list)} (one per request), got {len(hws)}")
        contexts = [interleave_contexts(items, self.pre) for items in items_list]
        sizes = [(hws[i] if hws is not None else None) or ctx.image_hw for i, ctx in enumerate(contexts)]
        return self.sample_contexts(
            contexts,
            rngs,
            sizes,
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            init_noise=init_noise,
            posterior_noise=posterior_noise,
            **cfg_kw,
        )[0]

    def sample_contexts(
        self,
        contexts: Sequence,
        rngs: Sequence,
        sizes: Sequence,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        init_noise=None,
        posterior_noise=None,
        **cfg_kw,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``sample_batch`` from built ``context.Contexts`` (gen, cfg_text, cfg_img) and output sizes (H, W):
        (uint8 [H, W, 3] images, float32 [T, p²C] final latents)."""
        if self._image is None:
            raise ValueError("this model has no generation weights (model.visual_gen=False)")
        n = len(contexts)
        for what, v in (("rngs", rngs), ("init_noise", init_noise), ("posterior_noise", posterior_noise)):
            if v is not None and len(v) != n:
                raise ValueError(f"{what}: expected {n} (one per request), got {len(v)}")
        checked = []
        for i, hw in enumerate(sizes):
            if hw is None:
                raise ValueError(f"request {i}: no output size (give hw, or an input image to take it from)")
            hw = (int(hw[0]), int(hw[1]))
            check_image_hw(hw, self.model.cfg)
            checked.append(hw)
        sizes = checked
        kw = dict(num_timesteps=num_timesteps, timestep_shift=timestep_shift, **cfg_kw)
        out: list = [None] * n
        latents: list = [None] * n
        if not self.cached:
            for i, ctx in enumerate(contexts):
                res = self._image.sample(
                    ctx.gen,
                    ctx.cfg_text,
                    ctx.cfg_img,
                    sizes[i],
                    rng=_key(rngs[i]),
                    init_noise=None if init_noise is None else init_noise[i],
                    posterior_noise=None if posterior_noise is None else posterior_noise[i],
                    **kw,
                )
                out[i] = self._decode(res.latents[None], res.grid_hw)[0]
                latents[i] = res.latents
            return out, latents
        for hw in dict.fromkeys(sizes):  # one group per output size, max_batch requests per call
            group = [i for i in range(n) if sizes[i] == hw]
            for part in chunks(len(group), self.max_batch):
                idx = [group[j] for j in part]
                res = self._image.sample(
                    [contexts[i] for i in idx],
                    hw,
                    [rngs[i] for i in idx],
                    init_noise=None if init_noise is None else np.stack([init_noise[i] for i in idx]),
                    posterior_noise=None if posterior_noise is None else [posterior_noise[i] for i in idx],
                    **kw,
                )
                for j, (i, img) in enumerate(zip(idx, self._decode(res.latents, res.grid_hw))):
                    out[i] = img
                    latents[i] = res.latents[j]
        return out, latents

    # --- think mode and interleaved generation (infer/interleave.py) ------------------------------------

    def think(self, items, *, understanding: bool = False, rng=None, **kw):
        """Think mode on one request (texts and uint8 images): ``interleave.ThinkOutput`` with the thinking text and
        the answer (``understanding``) or the image. ``kw``: hw, max_think_tokens, do_sample, temperature, and the
        image sampling arguments of ``sample_batch``."""
        return self.think_batch([items], None if rng is None else [rng], understanding=understanding, **kw)[0]

    def think_batch(self, items_list: Sequence, rngs: Sequence | None = None, **kw):
        """``think`` of many requests (``interleave.think_batch``)."""
        from bagel_jax.infer.interleave import think_batch

        return think_batch(self, items_list, rngs, **kw)

    def interleave(self, items, *, rng=None, **kw):
        """Interleaved text-and-image generation after one request's items: ``interleave.InterleaveOutput``
        (outputs in order, why it ended). ``kw``: hw, max_length, max_images, think, do_sample, temperature, and
        the image sampling arguments of ``sample_batch``."""
        return self.interleave_batch([items], None if rng is None else [rng], **kw)[0]

    def interleave_batch(self, items_list: Sequence, rngs: Sequence | None = None, **kw):
        """``interleave`` of many requests (``interleave.interleave_batch``)."""
        from bagel_jax.infer.interleave import interleave_batch

        return interleave_batch(self, items_list, rngs, **kw)

    def _decode(self, latents: np.ndarray, grid_hw) -> np.ndarray:
        """Latents [n, T, p²C] → uint8 [n, H, W, 3], decoded in a batch bucket (one compile per bucket and size)."""
        cfg = self.model.cfg
        n = len(latents)
        nb = batch_bucket(n, max(n, self.max_batch))
        padded = np.concatenate([latents, np.zeros((nb - n,) + latents.shape[1:], latents.dtype)])
        return decode_latents_batch(
            cfg.vae, self.params["vae"], padded, grid_hw, cfg.latent_patch_size, placement=self.placement
        )[:n]


def _key(rng):
    """A request's key: ``rng`` (a key or an int seed), key 0 when None."""
    if rng is None:
        return jax.random.key(0)
    return jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
