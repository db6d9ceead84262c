"""Host side of the cached path: contexts → bucketed packed rows, and the metadata of the tokens that follow them.

A context is one document (``bagel_jax.data.sample`` segments) in its own row, laid out by the data pipeline's
``build_document`` exactly like the cache-free path's rows minus the query. Budgets are rounded up to buckets
(``buckets.round_bucket``) so that different prompt lengths share a compiled program. What follows a context
continues its document: natural indices from ``num_tokens`` on, RoPE ids from ``next_position`` on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bagel_jax.batch import PackedBatch
from bagel_jax.data import images as img_lib
from bagel_jax.data.sample import Sample, build_document
from bagel_jax.infer.buckets import CacheOverflowError, ImageTooLargeError, round_bucket
from bagel_jax.infer.context import layout_for, pack_rows, vae_canvas
from bagel_jax.splits import KV_HI_INF


@dataclasses.dataclass
class ContextRows:
    """Packed context rows (numpy ``PackedBatch`` [R, L]) and, per row, its natural length and next RoPE id."""

    batch: PackedBatch
    num_tokens: np.ndarray  # int32[R]
    next_position: np.ndarray  # int32[R]
    canvas_hw: tuple[int, int]

    @property
    def num_vae_images(self) -> int:
        return self.batch.vae_images.shape[1]


def check_image_hw(hw: tuple[int, int], model_cfg) -> None:
    """Raises ``ImageTooLargeError`` if an image of ``hw`` pixels does not fit the latent position table, or
    ``ValueError`` if it is not a multiple of the latent stride."""
    stride = 8 * model_cfg.latent_patch_size
    largest = model_cfg.max_latent_size * stride
    h, w = int(hw[0]), int(hw[1])
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} must be positive multiples of {stride} pixels")
    if h > largest or w > largest:
        raise ImageTooLargeError(
            f"image size {h}x{w} exceeds the latent position table: at most {largest}x{largest} "
            f"pixels (model.max_latent_size={model_cfg.max_latent_size} tokens of {stride} px)"
        )


def context_rows(
    contexts: Sequence[Sequence],
    model_cfg,
    tokenizer,
    *,
    extra_tokens: int,
    max_context_tokens: int,
    what: str = "the tokens to generate",
) -> ContextRows:
    """One row per context (a list of segments), with bucketed budgets.

    ``extra_tokens``: how many tokens will follow each context in the cache (the query image or the generated
    text); a context with more than ``max_context_tokens − extra_tokens`` tokens raises ``CacheOverflowError``.
    """
    stride = 8 * model_cfg.latent_patch_size
    canvas = vae_canvas(contexts, stride)
    layout = layout_for(model_cfg, tokenizer, canvas)
    rng = np.random.default_rng(0)  # draws only timesteps of noised images, which contexts do not have
    docs = [build_document(Sample(list(c)), layout, rng) for c in contexts]
    costs = np.array([d.cost for d in docs], np.int64).reshape(len(docs), 4)
    longest = int(max(d.num_tokens for d in docs))
    if longest + extra_tokens > max_context_tokens:
        raise CacheOverflowError(
            f"a context of {longest} tokens + {extra_tokens} for {what} exceeds the KV cache "
            f"limit max_context_tokens={max_context_tokens}"
        )
    und = round_bucket(costs[:, 0].max())
    gen = round_bucket(costs[:, 1].max()) if costs[:, 1].max() else 0
    rows = pack_rows(
        contexts,
        layout,
        und_len=und,
        gen_len=gen,
        max_vit_patches=round_bucket(costs[:, 2].max(), 8),
        max_vae_images=max(1, int(costs[:, 3].max())),
    )
    next_pos = np.array([int(d.positions().max()) + 1 if d.num_tokens else 0 for d in docs], np.int32)
    num_tokens = np.array([d.num_tokens for d in docs], np.int32)
    return ContextRows(rows.batch, num_tokens, next_pos, canvas)


def image_query(rows: ContextRows, grid_hw: tuple[int, int], model_cfg, tokenizer) -> dict[str, np.ndarray]:
    """Per row, the query image ``<|vision_start|> h·w latents <|vision_end|>`` after the context (numpy fields of
    ``cache.ImageQuery``; meta in slot order: the two markers, then the latents in row-major order)."""
    r = len(rows.num_tokens)
    h, w = grid_hw
    t = h * w
    latent_pos = img_lib.flattened_position_ids(h, w, 1, model_cfg.max_latent_size, model_cfg.interpolate_pos)
    start = rows.num_tokens[:, None].astype(np.int64)
    index = start + np.concatenate([[0, t + 1], 1 + np.arange(t)])[None]  # natural order: start, latents, end
    end = start + t + 1
    meta = dict(
        doc=np.ones((r, t + 2), np.int32),
        index=index.astype(np.int32),
        q_hi=np.broadcast_to(end, (r, t + 2)).astype(np.int32),
        kv_hi=np.broadcast_to(end, (r, t + 2)).astype(np.int32),
    )
    return dict(
        ids=np.tile(np.array([[tokenizer.vision_start_id, tokenizer.vision_end_id]], np.int32), (r, 1)),
        position=np.repeat(rows.next_position[:, None], t + 2, axis=1).astype(np.int32),
        meta=meta,
        latent_pos=np.tile(latent_pos[None], (r, 1)).astype(np.int32),
    )


def text_query_meta(num_tokens, step):
    """Mask metadata of the ``step``-th decoded token (``<|im_start|>`` is step 0) after contexts of ``num_tokens``
    natural tokens: one causal split continuing the document (works on numpy or jax arrays [B] → [B, 1])."""
    index = (num_tokens + step)[:, None]
    return dict(doc=index * 0 + 1, index=index, q_hi=index, kv_hi=index * 0 + KV_HI_INF)
