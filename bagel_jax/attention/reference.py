"""Dense jnp attention under the split-wise mask: the oracle every fast path is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bagel_jax.attention.mask import MaskMeta, allowed


def reference_attention(q, k, v, q_meta: MaskMeta, kv_meta: MaskMeta | None = None, *, scale: float | None = None):
    """Softmax attention with GQA under ``allowed(q_meta, kv_meta)``.

    Args:
      q: [B, Lq, Hq, hd]; k, v: [B, Lkv, Hkv, hd] with Hq % Hkv == 0 (q head h reads kv head h // (Hq/Hkv)).
      q_meta, kv_meta: mask metadata int32[B, Lq] / int32[B, Lkv] (kv_meta defaults to q_meta).
      scale: softmax scale, default 1/sqrt(hd).

    Returns:
      [B, Lq, Hq, hd] in q's dtype; queries with no allowed key (padding) give zeros.
    """
    b, lq, hq, hd = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {hkv}")
    scale = hd**-0.5 if scale is None else scale
    mask = allowed(q_meta, kv_meta)  # [B, Lq, Lkv]
    qg = q.reshape(b, lq, hkv, hq // hkv, hd).astype(jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    any_allowed = mask.any(-1)[:, None, None, :, None]
    m = jnp.max(jnp.where(any_allowed, logits, 0.0), axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(logits - jax.lax.stop_gradient(m)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(b, lq, hq, hd).astype(q.dtype)
