"""Think mode and interleaved text-and-image generation (the reference's ``InterleaveInferencer.interleave_inference``,
bagel.md §8.1), on either path of an ``Inferencer`` (KV-cached or the cache-free oracle).

**Think** (as the reference): the think system prompt (``GEN_THINK_SYSTEM_PROMPT``, or ``VLM_THINK_SYSTEM_PROMPT``
for understanding) is the first text of the gen and cfg_img contexts; the model first decodes text after the gen
context (greedy or sampled, at most ``max_think_tokens`` fed tokens, until ``<|im_end|>``), then

* image generation (t2i, edit): that text, decoded and re-tokenized (the reference's ``update_context_text``), joins
  the gen context only, and the image is sampled from the contexts gen, cfg_text, cfg_img;
* understanding: the text is the whole output; ``split_thinking`` cuts it at ``</think>`` into thinking and answer.

**Interleaved generation** (the reference has no loop; its context rules are applied to the model's own outputs):
each round decodes text after the gen context until ``<|im_end|>`` or ``<|vision_start|>`` (or ``max_length``).
A non-empty text joins the contexts as an input text would (gen and cfg_img; cfg_text = gen before it). On
``<|vision_start|>`` an image is sampled from the three contexts, decoded to pixels, and joins gen as an input image
would (VAE + ViT from its pixels, the reference's ``update_context_image``; cfg_text = gen after it); the next round
follows. The loop ends at ``<|im_end|>`` ("end"), the text length limit ("max_length"), a wanted image beyond
``max_images`` ("max_images"), or a round that would not fit the KV cache ("max_context_tokens").

Randomness, from each request's key: context image k has one posterior draw for every call (the reference encodes
it once), the one ``noise.py`` draws from the key; generated image j starts from ``flow_noise(fold_in(flow key,
j))`` (think: the plain t2i draw); text round r samples with the key (r = 0) or ``fold_in(key, r)``, its context
images' posterior draws passed explicitly.
Context + tokens to generate beyond ``max_context_tokens`` before the first round → ``CacheOverflowError`` on both
paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from bagel_jax.data.sample import Image, Sample, build_document
from bagel_jax.infer.api import EDIT_DEFAULTS, T2I_DEFAULTS, safe_decode
from bagel_jax.infer.buckets import CacheOverflowError
from bagel_jax.infer.context import Contexts, interleave_contexts, layout_for, vae_canvas
from bagel_jax.infer.noise import flow_noise, noise_tables, posterior_canvas

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)
STOP_REASONS = ("end", "max_length", "max_images", "max_context_tokens")


@dataclasses.dataclass
class ThinkOutput:
    """One think request's result: the decoded ``text`` (ids ``text_ids``), its ``thinking`` part, and the ``answer``
    (understanding) or the ``image`` uint8 [H, W, 3] with its final ``latents`` float32 [T, p²C] (generation)."""

    text: str
    text_ids: list[int]
    thinking: str
    answer: str | None = None
    image: np.ndarray | None = None
    latents: np.ndarray | None = None


@dataclasses.dataclass
class InterleaveOutput:
    """One interleaved request's outputs in order (str texts, uint8 [H, W, 3] images), the ids of every text round
    (empty texts included), the final latents float32 [T, p²C] of every image, and why the loop ended
    (``STOP_REASONS``)."""

    outputs: list
    text_ids: list
    latents: list
    stopped: str


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a think-mode text ``<think> … </think> answer``: without ``</think>`` the text is all
    thinking if it opened ``<think>``, else all answer."""
    head, sep, tail = text.partition("</think>")
    if not sep:
        return (text.split("<think>", 1)[1].strip(), "") if "<think>" in text else ("", text.strip())
    return head.split("<think>", 1)[-1].strip(), tail.strip()


def request_key(rng):
    """A request's key: ``rng`` (a key or an int seed), key 0 when None."""
    if rng is None:
        return jax.random.key(0)
    return jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng


def posterior_draws(key, segments: Sequence, model_cfg) -> list[np.ndarray]:
    """The posterior draws [h/8, w/8, C] of the VAE images of ``segments`` (in order) that ``noise.py`` takes from
    the request key ``key``: what a call with this key draws for them implicitly."""
    sizes = [s.vae_pixels.shape[:2] for s in segments if isinstance(s, Image) and s.vae != "none"]
    if not sizes:
        return []
    side = noise_tables(model_cfg)[1] * 8
    full = np.asarray(posterior_canvas(jax.random.split(key)[0], len(sizes), (side, side), model_cfg))
    return [full[k, : h // 8, : w // 8] for k, (h, w) in enumerate(sizes)]


def context_tokens(inf, segments: Sequence) -> int:
    """Natural tokens of a context (a list of segments), as the KV cache holds them."""
    cfg = inf.model.cfg
    layout = layout_for(cfg, inf.tokenizer, vae_canvas([segments], 8 * cfg.latent_patch_size))
    return build_document(Sample(list(segments)), layout, np.random.default_rng(0)).num_tokens


def _fits(inf, segments: Sequence, extra: int) -> bool:
    return context_tokens(inf, segments) + extra <= inf.max_context_tokens


def _overflow(inf, segments: Sequence, extra: int, what: str) -> CacheOverflowError:
    return CacheOverflowError(
        f"a context of {context_tokens(inf, segments)} tokens + {extra} for {what} exceeds the KV cache "
        f"limit max_context_tokens={inf.max_context_tokens}"
    )


def _image_tokens(inf, hw) -> int:
    stride = 8 * inf.model.cfg.latent_patch_size
    return (int(hw[0]) // stride) * (int(hw[1]) // stride) + 2


def _default_hw(inf, ctx: Contexts, hw):
    side = inf.vae_rule.max_size
    return tuple(hw) if hw else (ctx.image_hw or (side, side))


def think_batch(
    inf,
    items_list: Sequence,
    rngs: Sequence | None = None,
    *,
    understanding: bool = False,
    hw: tuple[int, int] | None = None,
    max_think_tokens: int = 1000,
    do_sample: bool = False,
    temperature: float = 0.3,
    **image_kw,
) -> list[ThinkOutput]:
    """Think mode for many requests (each a list of texts and uint8 images): thinking text, then the answer
    (``understanding``) or one image per request (size ``hw``, default the last input image's, else the VAE rule's
    max side square; CFG defaults: t2i without an input image, edit with one; ``image_kw`` as ``sample_batch``)."""
    n = len(items_list)
    keys = [request_key(r) for r in (rngs if rngs is not None else [None] * n)]
    if len(keys) != n:
        raise ValueError(f"rngs: expected {n} (one per request), got {len(keys)}")
    prompt = VLM_THINK_SYSTEM_PROMPT if understanding else GEN_THINK_SYSTEM_PROMPT
    ctxs = [
        interleave_contexts(items, inf.pre, understanding=understanding, system_prompt=prompt) for items in items_list
    ]
    sizes = [None if understanding else _default_hw(inf, c, hw) for c in ctxs]
    for c, size in zip(ctxs, sizes):
        extra = max_think_tokens + (0 if size is None else 2 + _image_tokens(inf, size))
        if not _fits(inf, c.gen, extra):
            what = f"max_think_tokens={max_think_tokens} thinking" + ("" if size is None else " and the image")
            raise _overflow(inf, c.gen, extra, what)
    ids, _ = inf.text_ids_batch(
        [c.gen for c in ctxs], max_length=max_think_tokens, do_sample=do_sample, temperature=temperature, rngs=keys
    )
    texts = [_decode(inf, i) for i in ids]
    if understanding:
        return [ThinkOutput(t, i, *split_thinking(t)) for t, i in zip(texts, ids)]
    planned = [dataclasses.replace(c, gen=list(c.gen) + [inf.pre.text(t)]) for c, t in zip(ctxs, texts)]
    for c, size in zip(planned, sizes):
        if not _fits(inf, c.gen, _image_tokens(inf, size)):
            raise _overflow(inf, c.gen, _image_tokens(inf, size), "the generated image")
    cfg_kw = [{**(EDIT_DEFAULTS if c.image_hw else T2I_DEFAULTS), **image_kw} for c in ctxs]
    images: list = [None] * n
    latents: list = [None] * n
    for kw in {tuple(sorted((k, str(v)) for k, v in d.items())): d for d in cfg_kw}.values():
        idx = [i for i in range(n) if cfg_kw[i] == kw]
        got, lat = inf.sample_contexts([planned[i] for i in idx], [keys[i] for i in idx], [sizes[i] for i in idx], **kw)
        for j, i in enumerate(idx):
            images[i], latents[i] = got[j], lat[j]
    return [
        ThinkOutput(t, i, t, image=im, latents=lt) for t, i, im, lt in zip(texts, ids, images, latents, strict=True)
    ]


def interleave_batch(
    inf,
    items_list: Sequence,
    rngs: Sequence | None = None,
    *,
    hw: tuple[int, int] | None = None,
    max_length: int = 512,
    max_images: int = 4,
    think: bool = False,
    do_sample: bool = False,
    temperature: float = 0.3,
    **image_kw,
) -> list[InterleaveOutput]:
    """Interleaved generation for many requests (each a list of texts and uint8 images): texts and images
    alternating until each request's model ends (module docstring). ``max_length``: fed tokens per text round;
    ``hw``: every generated image's size (default as ``think_batch``); ``think``: the generation think prompt first;
    ``image_kw`` as ``sample_batch`` (CFG defaults: t2i without an input image, edit with one)."""
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    if max_images and not inf.model.cfg.visual_gen:
        raise ValueError("this model has no generation weights (model.visual_gen=False): pass max_images=0")
    n = len(items_list)
    keys = [request_key(r) for r in (rngs if rngs is not None else [None] * n)]
    if len(keys) != n:
        raise ValueError(f"rngs: expected {n} (one per request), got {len(keys)}")
    tok = inf.tokenizer
    system = GEN_THINK_SYSTEM_PROMPT if think else None
    items = [list(it) for it in items_list]
    first = [interleave_contexts(it, inf.pre, system_prompt=system) for it in items]
    sizes = [_default_hw(inf, c, hw) for c in first]
    cfg_kw = [{**(EDIT_DEFAULTS if c.image_hw else T2I_DEFAULTS), **image_kw} for c in first]
    for c in first:
        if not _fits(inf, c.gen, max_length):
            raise _overflow(inf, c.gen, max_length, f"max_length={max_length} generated")
    results = [InterleaveOutput([], [], [], "") for _ in range(n)]
    while True:
        active = [i for i in range(n) if not results[i].stopped]
        ctxs = {i: interleave_contexts(items[i], inf.pre, system_prompt=system) for i in active}
        for i in active:
            if not _fits(inf, ctxs[i].gen, max_length):
                results[i].stopped = "max_context_tokens"
        active = [i for i in active if not results[i].stopped]
        if not active:
            return results
        rounds = [len(results[i].text_ids) for i in active]
        ids, stops = inf.text_ids_batch(
            [ctxs[i].gen for i in active],
            max_length=max_length,
            do_sample=do_sample,
            temperature=temperature,
            rngs=[keys[i] if r == 0 else jax.random.fold_in(keys[i], r) for i, r in zip(active, rounds)],
            stop_ids=(tok.eos_id, tok.vision_start_id),
            posterior_noise=[posterior_draws(keys[i], ctxs[i].gen, inf.model.cfg) for i in active],
        )
        want = []
        for i, got, stop in zip(active, ids, stops, strict=True):
            res = results[i]
            res.text_ids.append(got)
            if got:
                text = _decode(inf, got)
                items[i].append(text)
                res.outputs.append(text)
            if stop != tok.vision_start_id:
                res.stopped = "end" if stop == tok.eos_id else "max_length"
            elif len(res.latents) >= max_images:
                res.stopped = "max_images"
            else:
                want.append(i)
        ctxs = {i: interleave_contexts(items[i], inf.pre, system_prompt=system) for i in want}
        for i in want:
            if not _fits(inf, ctxs[i].gen, _image_tokens(inf, sizes[i])):
                results[i].stopped = "max_context_tokens"
        want = [i for i in want if not results[i].stopped]
        _sample_images(inf, want, ctxs, keys, sizes, cfg_kw, results, items)


def _sample_images(inf, want, ctxs, keys, sizes, cfg_kw, results, items) -> None:
    """One image for each request in ``want`` (its j-th: initial noise from ``fold_in(flow key, j)``), appended to
    its outputs and its context items."""
    cfg = inf.model.cfg
    stride = 8 * cfg.latent_patch_size
    groups: dict = {}
    for i in want:
        groups.setdefault((sizes[i], tuple(sorted((k, str(v)) for k, v in cfg_kw[i].items()))), []).append(i)
    for (size, _), idx in groups.items():
        t = (size[0] // stride) * (size[1] // stride)
        noise = [
            np.asarray(flow_noise(jax.random.fold_in(jax.random.split(keys[i])[1], len(results[i].latents)), t, cfg))
            for i in idx
        ]
        got, lat = inf.sample_contexts(
            [ctxs[i] for i in idx], [keys[i] for i in idx], [size] * len(idx), init_noise=noise, **cfg_kw[idx[0]]
        )
        for j, i in enumerate(idx):
            items[i].append(got[j])
            results[i].outputs.append(got[j])
            results[i].latents.append(lat[j])


def _decode(inf, ids) -> str:
    return safe_decode(inf.tokenizer, ids)
