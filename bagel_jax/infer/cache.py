"""KV cache for BAGEL inference (the reference's ``NaiveCache``, bagel.md §2.6, with static shapes).

A context is prefilled once: its packed rows run through the decoder (each token through its own expert: und for
text and ViT tokens, gen for VAE latents), and every layer's keys (after QK-norm and RoPE) and values are kept,
together with the tokens' mask metadata. Later tokens (an Euler step's query image, a decoded text token) run
alone against the cache under the same split-wise mask rule, so the result equals running the whole row.

``KVCache`` (a pytree; the batch axis is the context rows, e.g. the CFG branches × requests)::

    k, v   [num_layers, B, C, Hkv, hd]   logical axes KV_AXES (sharded by parallel/rules.py like activations)
    meta   MaskMeta [B, C]               doc 0 = an empty slot (padding, or a text slot not written yet)

The functions below take the bound ``Bagel`` module as their first argument and run under
``model.apply(variables, ..., method=fn)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from bagel_jax.attention.mask import KV_HI_INF, MaskMeta
from bagel_jax.batch import PackedBatch
from bagel_jax.config import head_dim

KV_AXES = ("layers", "activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


@struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    meta: MaskMeta

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) (static)."""
        return jax.tree.map(lambda a: a[:, start:stop] if a.ndim == 5 else a[start:stop], self)

    def with_empty_slots(self, n: int) -> KVCache:
        """The cache followed by ``n`` empty slots (doc 0: invisible until written)."""
        pad5 = ((0, 0), (0, 0), (0, n), (0, 0), (0, 0))
        b = self.meta.doc.shape[0]
        empty = MaskMeta(
            doc=jnp.zeros((b, n), jnp.int32),
            index=jnp.zeros((b, n), jnp.int32),
            q_hi=jnp.zeros((b, n), jnp.int32),
            kv_hi=jnp.full((b, n), KV_HI_INF, jnp.int32),
        )
        meta = jax.tree.map(lambda a, e: jnp.concatenate([a, e], axis=1), self.meta, empty)
        return KVCache(constrain(jnp.pad(self.k, pad5)), constrain(jnp.pad(self.v, pad5)), meta)

    def write(self, slot, k, v, meta: MaskMeta) -> KVCache:
        """Writes T new tokens (k, v [layers, B, T, Hkv, hd], meta [B, T]) at slots [slot, slot + T) of every row."""
        zero = jnp.zeros((), jnp.int32)
        put5 = lambda a, x: jax.lax.dynamic_update_slice(a, x.astype(a.dtype), (zero, zero, slot, zero, zero))  # noqa
        put2 = lambda a, x: jax.lax.dynamic_update_slice(a, x.astype(a.dtype), (zero, slot))  # noqa: E731
        return KVCache(put5(self.k, k), put5(self.v, v), jax.tree.map(put2, self.meta, meta))


def constrain(x):
    """The cache's logical sharding (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, KV_AXES)


def empty_cache(cfg, batch: int, dtype) -> tuple[tuple[jax.Array, jax.Array], MaskMeta]:
    """A zero-length past (k, v) [layers, B, 0, Hkv, hd] and its metadata [B, 0] (what a prefill extends)."""
    kv = jnp.zeros((cfg.num_layers, batch, 0, cfg.num_kv_heads, head_dim(cfg)), dtype)
    meta = MaskMeta(*(jnp.zeros((batch, 0), jnp.int32) for _ in range(4)))
    return (kv, kv), meta


def prefill(m, batch: PackedBatch, x0=None) -> KVCache:
    """Context rows → their KV cache (``method=`` of ``Bagel``).

    Args:
      batch: the contexts as packed rows [B, L] (clean images only; no query).
      x0: float32[B, N, T, p²C] clean latent tokens of the rows' VAE images (``Bagel.encode_latents``), or None
        when the rows hold no VAE tokens.

    Returns:
      KVCache with C = L slots (slot order of the rows; padding slots have doc 0).
    """
    cfg = m.cfg
    _u, g = batch.und_len, batch.gen_len
    und_x = m.embed_und(batch)
    b = und_x.shape[0]
    if cfg.visual_gen and g > 0:
        n, t_img, f = x0.shape[1:]
        src = jnp.clip(batch.vae_src, 0, n * t_img - 1)
        x0_slot = jnp.take_along_axis(x0.reshape(b, n * t_img, f), src[..., None], axis=1)
        gen_x = m.embed_gen(x0_slot, jnp.zeros((b, g), jnp.float32), batch.vae_pos)
    else:
        gen_x = jnp.zeros((b, g, cfg.hidden_size), und_x.dtype)
    past, past_meta = empty_cache(cfg, b, jnp.dtype(cfg.dtype))
    _, _, (k, v) = m.language_model.extend(und_x, gen_x, batch.position, MaskMeta.of(batch), past, past_meta)
    return KVCache(constrain(k), constrain(v), MaskMeta.of(batch))


@struct.dataclass
class ImageQuery:
    """The image being generated, per cache row: ``<|vision_start|> T latents <|vision_end|>`` (one noise split).

    ``ids`` int32[B, 2] (the two markers, und expert); ``position`` int32[B, 2 + T] (one RoPE id); ``meta``
    MaskMeta [B, 2 + T] (slot order: markers, then latents); ``latent_pos`` int32[B, T] (latent position ids).
    """

    ids: jax.Array
    position: jax.Array
    meta: MaskMeta
    latent_pos: jax.Array

    def rows(self, start: int, stop: int) -> ImageQuery:
        return jax.tree.map(lambda a: a[start:stop], self)


def image_velocity(m, cache: KVCache, query: ImageQuery, x, t):
    """One flow evaluation of the query image against the cache: x float32[B, T, p²C], t float32 scalar →
    velocity float32[B, T, p²C] (``method=`` of ``Bagel``)."""
    und_x = m.language_model.embed(query.ids)
    gen_x = m.embed_gen(x, jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:2]), query.latent_pos)
    _, gen_h, _ = m.language_model.extend(und_x, gen_x, query.position, query.meta, (cache.k, cache.v), cache.meta)
    return m.velocity(gen_h)


def text_step(m, cache: KVCache, ids, position, meta: MaskMeta):
    """One decoded token per row against the cache (``method=`` of ``Bagel``).

    ids, position int32[B]; meta MaskMeta [B, 1] → (logits float32[B, V], k, v [layers, B, 1, Hkv, hd]).
    """
    und_x = m.language_model.embed(ids[:, None])
    gen_x = jnp.zeros((und_x.shape[0], 0, und_x.shape[2]), und_x.dtype)
    und_h, _, (k, v) = m.language_model.extend(und_x, gen_x, position[:, None], meta, (cache.k, cache.v), cache.meta)
    return m.text_logits(und_h)[:, 0].astype(jnp.float32), k, v
