"""One attention entry point for the whole model: ``attention(q, k, v, q_meta, kv_meta, impl=...)``.

``impl``: ``"reference"`` (dense jnp oracle, O(L²)), ``"tpu"`` (Pallas block-sparse kernel), ``"gpu"`` (block-sparse
in plain XLA, gpu.py: any backend, tiles tuned for CPU there), ``"auto"`` (by backend: ``tpu`` on TPU, ``gpu`` on GPU
and CPU). Every implementation takes the same O(L) metadata (mask.py).
"""

from __future__ import annotations

import jax

from bagel_jax.attention.mask import CAUSAL, FULL, NOISE, MaskMeta, Split, allowed, metadata_from_splits
from bagel_jax.attention.reference import reference_attention

IMPLS = ("reference", "tpu", "gpu", "auto")


def resolve_impl(impl: str) -> str:
    """Maps ``auto`` to the implementation for the default backend: the Pallas kernel on TPU, the XLA block-sparse
    path elsewhere (its cost follows the mask's non-empty blocks; the dense reference stays the oracle)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return "tpu" if backend == "tpu" else "gpu"


def attention(
    q,
    k,
    v,
    q_meta: MaskMeta,
    kv_meta: MaskMeta | None = None,
    *,
    impl: str = "reference",
    scale: float | None = None,
    **kwargs,
):
    """Split-wise masked attention. q [B, Lq, Hq, hd], k/v [B, Lkv, Hkv, hd] → [B, Lq, Hq, hd]."""
    impl = resolve_impl(impl)
    if impl == "reference":
        return reference_attention(q, k, v, q_meta, kv_meta, scale=scale)
    from bagel_jax.attention.sharded import shard_attention  # per-device kernels under the context mesh

    if impl == "tpu":
        from bagel_jax.attention.tpu_split_splash import split_splash_attention

        return shard_attention(split_splash_attention, q, k, v, q_meta, kv_meta, scale=scale, **kwargs)
    from bagel_jax.attention.gpu import gpu_attention

    return shard_attention(gpu_attention, q, k, v, q_meta, kv_meta, scale=scale, **kwargs)


__all__ = [
    "attention",
    "resolve_impl",
    "MaskMeta",
    "Split",
    "metadata_from_splits",
    "allowed",
    "reference_attention",
    "CAUSAL",
    "FULL",
    "NOISE",
    "IMPLS",
]
