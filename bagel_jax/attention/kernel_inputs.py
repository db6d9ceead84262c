"""What the two block-sparse kernels (tpu_split_splash.py, gpu.py) share about their inputs: the shape checks,
the metadata rows padded to the block grid, the padding arithmetic and the matmul precision of the input dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bagel_jax.attention.mask import MaskMeta


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x``."""
    return -(-x // m) * m


def matmul_precision(dtype):
    """HIGHEST for float32 inputs (full f32 matmuls), DEFAULT otherwise (bf16 passes); accumulation is f32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def meta_rows(meta: MaskMeta, length: int) -> jnp.ndarray:
    """int32[B, 4, length]: doc, index, q_hi, kv_hi, padded with doc 0 (never allowed)."""
    rows = jnp.stack([meta.doc, meta.index, meta.q_hi, meta.kv_hi], axis=1).astype(jnp.int32)
    return jnp.pad(rows, ((0, 0), (0, 0), (0, length - rows.shape[-1])))


def check_inputs(q, k, v, q_meta: MaskMeta, kv_meta: MaskMeta):
    """Raises ValueError (one line) unless q [B, Lq, Hq, hd], k = v [B, Lkv, Hkv, hd], Hq % Hkv == 0 and each
    metadata field is [B, Lq] (q_meta) / [B, Lkv] (kv_meta)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention q, k, v must be [B, L, H, hd], got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention q heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    for name, meta, want in (("q_meta", q_meta, q.shape[:2]), ("kv_meta", kv_meta, k.shape[:2])):
        for field in ("doc", "index", "q_hi", "kv_hi"):
            shape = getattr(meta, field).shape
            if tuple(shape) != tuple(want):
                raise ValueError(f"attention {name}.{field} has shape {tuple(shape)}, expected {tuple(want)}")
