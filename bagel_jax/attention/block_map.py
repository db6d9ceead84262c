"""Block map and visit schedules of the split-wise mask, computed on device from O(L) metadata.

For a (q-block, kv-block) pair the per-block min/max of the metadata (mask.py) prove one of

* ``EMPTY``   no pair (q, kv) of the two blocks is allowed;
* ``PARTIAL`` some may be allowed: the kernel evaluates ``allowed`` per element from the metadata;
* ``FULL``    every pair is allowed: the kernel skips the mask.

The bounds are sound (a block holding an allowed pair is never EMPTY, a FULL block has no masked
pair) because each clause of ``allowed`` is monotone in one token's value. Blocks that straddle a
document boundary are bounded per document (first and last document of the block), which keeps the
map tight on modality-sorted rows (benchmarks/mask_blocks.py: equal to the exact non-empty count on
realistic 32K / 45K rows). Everything here is O(B · n_q · n_kv) int32 (n = L / block); no L×L array.

A *schedule* lists the blocks a kernel visits, packed one int32 per step and compacted to the front:
``by="q"`` (forward, dq) walks q-block rows, each row's non-empty kv blocks in order; ``by="kv"``
(dkv) walks kv-block columns. A row (column) with no non-empty block gets one EMPTY step so the
kernel still writes its zeros. ``count`` (traced) is the number of steps: the kernels' grid length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.attention.mask import MaskMeta

EMPTY, PARTIAL, FULL = 0, 1, 2

# Packed step: kind in bits 0-1, kv block in bits 2-12, q block in bits 13-23, batch row in bits 24-30.
KIND_BITS, BLOCK_BITS, BATCH_BITS = 2, 11, 7
KV_SHIFT = KIND_BITS
Q_SHIFT = KV_SHIFT + BLOCK_BITS
B_SHIFT = Q_SHIFT + BLOCK_BITS
MAX_BLOCKS = 1 << BLOCK_BITS  # per sequence axis
MAX_BATCH = 1 << BATCH_BITS  # rows per kernel call (per device under shard_map)
_BLOCK_MASK = MAX_BLOCKS - 1
_KIND_MASK = (1 << KIND_BITS) - 1

_BIG = np.iinfo(np.int32).max
_SMALL = np.iinfo(np.int32).min


class Bounds(NamedTuple):
    """Bounds over a subset of each block's tokens, each [B, n]."""

    any: jnp.ndarray  # bool: the subset is non-empty
    doc_lo: jnp.ndarray
    doc_hi: jnp.ndarray
    index_lo: jnp.ndarray
    index_hi: jnp.ndarray
    hi_lo: jnp.ndarray  # min of q_hi (q side) or kv_hi (kv side)
    hi_hi: jnp.ndarray  # max of the same


class BlockStats(NamedTuple):
    """Per-block bounds: over all real (doc != 0) tokens, and over the tokens of its lowest and of its
    highest document separately (a block straddling a document boundary is two exact parts)."""

    real: Bounds
    first_doc: Bounds  # tokens with doc == real.doc_lo
    last_doc: Bounds  # tokens with doc == real.doc_hi
    all_real: jnp.ndarray  # bool: no padding in the block
    has_middle: jnp.ndarray  # bool: some token's doc lies strictly between doc_lo and doc_hi


def _bounds(select, doc, index, hi) -> Bounds:
    def lo(x):
        return jnp.min(jnp.where(select, x, _BIG), axis=-1)

    def hi_(x):
        return jnp.max(jnp.where(select, x, _SMALL), axis=-1)

    return Bounds(
        any=select.any(-1),
        doc_lo=lo(doc),
        doc_hi=hi_(doc),
        index_lo=lo(index),
        index_hi=hi_(index),
        hi_lo=lo(hi),
        hi_hi=hi_(hi),
    )


def block_stats(meta: MaskMeta, block: int, side: str) -> BlockStats:
    """Min/max of the metadata per block of ``block`` tokens; ``side`` is "q" (uses q_hi) or "kv" (kv_hi)."""
    if side not in ("q", "kv"):
        raise ValueError(f"side must be 'q' or 'kv', got {side!r}")
    b, length = meta.doc.shape
    if length % block:
        raise ValueError(f"sequence length {length} is not a multiple of the block size {block}")
    shape = (b, length // block, block)
    doc = meta.doc.reshape(shape)
    index = meta.index.reshape(shape)
    hi = (meta.q_hi if side == "q" else meta.kv_hi).reshape(shape)
    real = doc != 0
    whole = _bounds(real, doc, index, hi)
    lo_doc, hi_doc = whole.doc_lo[..., None], whole.doc_hi[..., None]
    return BlockStats(
        real=whole,
        first_doc=_bounds(real & (doc == lo_doc), doc, index, hi),
        last_doc=_bounds(real & (doc == hi_doc), doc, index, hi),
        all_real=real.all(-1),
        has_middle=(real & (doc > lo_doc) & (doc < hi_doc)).any(-1),
    )


def _may_attend(q: Bounds, k: Bounds, same_doc) -> jnp.ndarray:
    """Some q token of ``q`` may see some kv token of ``k`` (given the documents can match)."""
    return q.any & k.any & same_doc & (k.index_lo <= q.hi_hi) & (q.index_lo <= k.hi_hi)


def block_kinds(q_meta: MaskMeta, kv_meta: MaskMeta, block_q: int, block_kv: int) -> jnp.ndarray:
    """int32[B, n_q, n_kv] of EMPTY / PARTIAL / FULL for every (q-block, kv-block) pair.

    Without middle documents in either block, the pair is tested part by part (first/last document
    of each side, exact document equality); otherwise with the whole-block bounds (document ranges).
    """
    qs = jax.tree.map(lambda x: x[:, :, None], block_stats(q_meta, block_q, "q"))
    ks = jax.tree.map(lambda x: x[:, None, :], block_stats(kv_meta, block_kv, "kv"))
    by_parts = jnp.zeros(jnp.broadcast_shapes(qs.all_real.shape, ks.all_real.shape), bool)
    for qp in (qs.first_doc, qs.last_doc):
        for kp in (ks.first_doc, ks.last_doc):
            by_parts |= _may_attend(qp, kp, qp.doc_lo == kp.doc_lo)
    q, k = qs.real, ks.real
    by_range = _may_attend(q, k, (q.doc_lo <= k.doc_hi) & (k.doc_lo <= q.doc_hi))
    maybe = jnp.where(qs.has_middle | ks.has_middle, by_range, by_parts)
    full = (
        qs.all_real
        & ks.all_real
        & (q.doc_lo == q.doc_hi)
        & (k.doc_lo == k.doc_hi)
        & (q.doc_lo == k.doc_lo)
        & (k.index_hi <= q.hi_lo)
        & (q.index_hi <= k.hi_lo)
    )
    return jnp.where(full, FULL, jnp.where(maybe, PARTIAL, EMPTY)).astype(jnp.int32)


def pack(b, i, j, kind):
    """Packs batch row ``b``, q block ``i``, kv block ``j`` and ``kind`` into one int32 per step."""
    return (b << B_SHIFT) | (i << Q_SHIFT) | (j << KV_SHIFT) | kind


def unpack(step):
    """Inverse of ``pack``: (b, i, j, kind); works on jnp arrays, numpy arrays and kernel scalars."""
    return (step >> B_SHIFT, (step >> Q_SHIFT) & _BLOCK_MASK, (step >> KV_SHIFT) & _BLOCK_MASK, step & _KIND_MASK)


def row_key(step):
    """(batch row, q block) of a step as one int: equal for the steps of one q-block row."""
    return step >> Q_SHIFT


def col_key(step):
    """(batch row, kv block) of a step as one int: equal for the steps of one kv-block column."""
    return ((step >> B_SHIFT) << BLOCK_BITS) | ((step >> KV_SHIFT) & _BLOCK_MASK)


def check_limits(batch: int, n_q: int, n_kv: int) -> None:
    """Raises if a schedule of this size cannot be packed."""
    if n_q > MAX_BLOCKS or n_kv > MAX_BLOCKS:
        raise ValueError(
            f"attention blocks per sequence ({n_q} q, {n_kv} kv) exceed {MAX_BLOCKS}: use larger block_q / block_kv"
        )
    if batch > MAX_BATCH:
        raise ValueError(f"attention batch {batch} exceeds {MAX_BATCH} rows per call (per device)")


class Schedule(NamedTuple):
    """Visit list of one kernel: ``steps`` int32[B·n_q·n_kv] (first ``count`` valid), ``count`` int32[]."""

    steps: jnp.ndarray
    count: jnp.ndarray


def schedule(kinds: jnp.ndarray, by: str) -> Schedule:
    """Compacts ``kinds`` [B, n_q, n_kv] into the steps a kernel visits, rows (``by="q"``) or columns (``"kv"``)."""
    if by not in ("q", "kv"):
        raise ValueError(f"schedule order must be 'q' or 'kv', got {by!r}")
    b, n_q, n_kv = kinds.shape
    check_limits(b, n_q, n_kv)
    bi, ii, jj = jnp.meshgrid(
        jnp.arange(b, dtype=jnp.int32),
        jnp.arange(n_q, dtype=jnp.int32),
        jnp.arange(n_kv, dtype=jnp.int32),
        indexing="ij",
    )
    packed = pack(bi, ii, jj, kinds)
    visit = kinds != EMPTY
    if by == "kv":  # walk [B, n_kv, n_q]
        packed, visit = packed.transpose(0, 2, 1), visit.transpose(0, 2, 1)
    # one EMPTY step in front of each line that has no non-empty block (writes that line's zeros)
    line_empty = ~visit.any(-1, keepdims=True)
    first = jnp.arange(visit.shape[-1]) == 0
    visit = visit | (line_empty & first)
    packed, visit = packed.reshape(-1), visit.reshape(-1)
    position = jnp.cumsum(visit, dtype=jnp.int32) - 1
    count = position[-1] + 1
    target = jnp.where(visit, position, packed.shape[0])  # out of range → dropped
    steps = jnp.zeros_like(packed).at[target].set(packed, mode="drop")
    # pad the tail with the last step: no new block is fetched if a kernel ever reads past ``count``
    steps = jnp.where(jnp.arange(steps.shape[0]) < count, steps, steps[count - 1])
    return Schedule(steps, count)


def schedules(q_meta: MaskMeta, kv_meta: MaskMeta, block_q: int, block_kv: int, by=("q",)):
    """``schedule(block_kinds(...), o)`` for each order ``o`` in ``by`` (the block map is computed once)."""
    kinds = jax.lax.stop_gradient(block_kinds(q_meta, kv_meta, block_q, block_kv))
    return tuple(schedule(kinds, o) for o in by)


def dense_block_kinds(q_meta: dict, kv_meta: dict, block_q: int, block_kv: int) -> np.ndarray:
    """Exact block map of one row from the dense mask, host numpy, chunked by q block (no L×L array at once).

    ``q_meta`` / ``kv_meta``: dicts of int32[L] (``metadata_from_splits``). Used by tests and benchmarks
    as the minimal map to compare ``block_kinds`` against.
    """
    lq, lkv = len(q_meta["doc"]), len(kv_meta["doc"])
    n_q, n_kv = lq // block_q, lkv // block_kv
    out = np.zeros((n_q, n_kv), np.int32)
    kd, ki, kh = kv_meta["doc"][None], kv_meta["index"][None], kv_meta["kv_hi"][None]
    for i in range(n_q):
        sl = slice(i * block_q, (i + 1) * block_q)
        qd, qi, qh = q_meta["doc"][sl, None], q_meta["index"][sl, None], q_meta["q_hi"][sl, None]
        m = (qd == kd) & (qd != 0) & (ki <= qh) & (qi <= kh)
        m = m.reshape(block_q, n_kv, block_kv)
        any_, all_ = m.any(axis=(0, 2)), m.all(axis=(0, 2))
        out[i] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    return out
