"""Device side of the split-wise mask (DESIGN §5): ``MaskMeta`` (per-token metadata as jax arrays) and the dense
``allowed`` mask the oracle uses. The rule and the numpy metadata builder live in ``bagel_jax.splits`` (re-exported
here); this equals the reference's ``create_sparse_mask`` (see tests/test_mask.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from bagel_jax.splits import CAUSAL, FULL, KV_HI_INF, MODES, NOISE, Split, metadata_from_splits, splits_from_lengths  # noqa: F401


@struct.dataclass
class MaskMeta:
    """Per-token mask metadata, each int32[..., L] (batch dims first)."""

    doc: jnp.ndarray
    index: jnp.ndarray
    q_hi: jnp.ndarray
    kv_hi: jnp.ndarray

    @classmethod
    def of(cls, batch) -> MaskMeta:
        """The metadata fields of a ``PackedBatch`` (or anything with ``doc``, ``index``, ``q_hi``, ``kv_hi``)."""
        return cls(doc=batch.doc, index=batch.index, q_hi=batch.q_hi, kv_hi=batch.kv_hi)

    def take(self, idx, axis: int = -1) -> MaskMeta:
        """Gathers tokens ``idx`` along ``axis`` (e.g. one expert's slice or a permutation)."""
        return MaskMeta(*(jnp.take(a, idx, axis=axis) for a in (self.doc, self.index, self.q_hi, self.kv_hi)))


def allowed(q_meta: MaskMeta, kv_meta: MaskMeta | None = None) -> jnp.ndarray:
    """Dense boolean mask bool[..., Lq, Lkv] from metadata (the oracle's mask; O(L²))."""
    kv_meta = q_meta if kv_meta is None else kv_meta
    same_doc = (q_meta.doc[..., :, None] == kv_meta.doc[..., None, :]) & (q_meta.doc[..., :, None] != 0)
    lower = kv_meta.index[..., None, :] <= q_meta.q_hi[..., :, None]
    upper = q_meta.index[..., :, None] <= kv_meta.kv_hi[..., None, :]
    return same_doc & lower & upper
