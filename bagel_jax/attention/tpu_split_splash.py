"""Block-sparse flash attention for the split-wise mask: a Pallas TPU kernel (forward, dq, dkv).

Designed after jax's splash attention (block-sparse grid, scalar-prefetched block indices, online
softmax), with two differences: the mask is evaluated per tile from O(L) metadata (mask.py) instead
of a static mask or an L×L array, and the block map is computed per batch on device (block_map.py).

Layout and grid. q, k, v and the outputs stay in their natural [B, L, H·hd] layout; a block of q is
``[block_q, c·G·hd]``, all G = Hq/Hkv query heads of c kv heads, so every K/V tile (``[block_kv, c·hd]``)
is read once per group. With head_dim a multiple of 128, c = 1 and the query heads are a traced loop
over 128-aligned lane slices. Otherwise ("head groups") c is the fewest kv heads whose lanes fill whole
128-lane vregs (head_dim 72: c = 16, 1152 = 9·128 lanes), or all Hkv heads where no such c divides Hkv
(a block as wide as the array), and the c·G query heads are a static loop over unaligned lane slices,
so no head is padded; a pass's blocks are halved until its wider tiles fit the VMEM. Where the group
would be too wide (MAX_GROUP_LANES, MAX_GROUP_HEADS) or even 128 × 128 tiles would not fit, head_dim
is zero-padded to a multiple of 128 in HBM. The grid is ``(Hkv/c, steps)`` where ``steps`` is the traced
number of visited blocks: the schedule (scalar-prefetched into SMEM) lists only non-empty blocks,
plus one step for each q row (kv column) that has none, so its zeros are written. FULL blocks skip
the mask, PARTIAL ones evaluate ``allowed`` from the metadata tiles; EMPTY blocks are never visited.

Queries with no allowed key (padding, doc 0) output zeros and get a logsumexp of +1e30, so the
backward pass gives them zero weight. Softmax statistics and accumulators are f32; matmuls run in
the input dtype (bf16 or f32, the latter at HIGHEST precision) with f32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bagel_jax.attention import block_map
from bagel_jax.attention.kernel_inputs import check_inputs, matmul_precision, meta_rows, round_up
from bagel_jax.attention.mask import MaskMeta

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # logit of a masked pair (finite: no inf - inf)
NO_KEY_LSE = 1e30  # logsumexp of a query with no allowed key: exp(s - lse) == 0 in the backward pass
LANES = 128
SMEM_BYTES = 1 << 20  # scalar memory per TensorCore on v4 / v5e / v5p / v6e: holds a kernel's schedule
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: a nondiff argument of the custom_vjp)."""

    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    group: int  # query heads per kv head
    head_dim: int  # a multiple of 128 (padded if need be), or the true head_dim of a head-group layout
    kv_heads_per_block: int  # c: kv heads per grid step (1 when head_dim is a multiple of 128)
    scale: float
    interpret: bool
    vmem_limit_bytes: int | None

    @property
    def packed(self) -> bool:
        """Head groups: per-head lane slices are not 128-aligned, so the head loops are static."""
        return self.head_dim % LANES != 0

    @property
    def heads(self) -> int:
        """Query heads per block (c·G)."""
        return self.kv_heads_per_block * self.group


MAX_GROUP_LANES = 2048  # widest q block (c·G·hd lanes) of the head-group layout; wider ones pad head_dim
MAX_GROUP_HEADS = 32  # most query heads per block (c·G, each unrolled in the kernels); more pad head_dim
VMEM_BUDGET = 16 << 20  # the smallest default scoped VMEM limit (v4 / v5e / v5p): head-group tiles must fit it


def kv_heads_per_block(head_dim: int, group: int, kv_heads: int) -> int | None:
    """c of the head-group layout: the fewest kv heads (a divisor of ``kv_heads``) whose c·head_dim lanes are a
    multiple of 128, else all ``kv_heads`` (a block as wide as the array, which Mosaic takes at any width), if
    their c·group query heads fit MAX_GROUP_LANES and MAX_GROUP_HEADS; None where head_dim must be padded.
    1 for head_dim a multiple of 128 (the plain layout)."""
    if head_dim % LANES == 0:
        return 1
    divisors = (c for c in range(1, kv_heads + 1) if kv_heads % c == 0 and (c * head_dim) % LANES == 0)
    c = next(divisors, kv_heads)
    return c if c * group * head_dim <= MAX_GROUP_LANES and c * group <= MAX_GROUP_HEADS else None


def tile_vmem_bytes(bq: int, bkv: int, q_lanes: int, kv_lanes: int, itemsize: int, backward: bool) -> int:
    """Upper estimate of one pass's VMEM: double-buffered q-side [bq, q_lanes] and kv-side [bkv, kv_lanes] tiles
    in the input dtype, the f32 accumulators and the f32 [bq, bkv] temporaries (forward: s, p; dq and dkv: s, p,
    dp, ds; the larger of the two backward kernels)."""
    q_tile, kv_tile, scores = bq * q_lanes * itemsize, bkv * kv_lanes * itemsize, 4 * bq * bkv
    if not backward:  # q, o | k, v; acc, max, sum
        return 2 * (2 * q_tile + 2 * kv_tile) + 4 * bq * (q_lanes + 2 * LANES) + 2 * scores
    dq = 2 * (3 * q_tile + 2 * kv_tile) + 4 * bq * q_lanes  # q, do, dq | k, v; acc
    dkv = 2 * (2 * q_tile + 4 * kv_tile) + 2 * 4 * bkv * kv_lanes  # q, do | k, v, dk, dv; 2 acc
    return max(dq, dkv) + 4 * scores


def fit_blocks(bq: int, bkv: int, q_lanes: int, kv_lanes: int, itemsize: int, backward: bool, budget: int):
    """(bq, bkv) halved (the larger first, multiples of 128) until ``tile_vmem_bytes`` fits ``budget``; None if
    even 128 × 128 does not."""
    while tile_vmem_bytes(bq, bkv, q_lanes, kv_lanes, itemsize, backward) > budget:
        if bq == bkv == LANES:
            return None
        half = lambda b: max(LANES, b // 2 // LANES * LANES)  # noqa: E731
        bq, bkv = (half(bq), bkv) if bq > bkv else (bq, half(bkv)) if bkv > bq else (half(bq), half(bkv))
    return bq, bkv


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _head_cols(t, hd: int):
    """Lane slice of query head ``t`` (traced) inside a [block, G·hd] tile."""
    return pl.ds(pl.multiple_of(t * hd, LANES), hd)


def _cols(t: int, hd: int):
    """Lane slice of head ``t`` (a Python int: head groups) inside a [block, n·hd] tile; unaligned, static."""
    return pl.ds(t * hd, hd)


def _q_cols(cfg: _Config, t):
    """Lane slice of query head ``t`` in a q-side tile: 128-aligned and traced, or static (head groups)."""
    return _cols(t, cfg.head_dim) if cfg.packed else _head_cols(t, cfg.head_dim)


def _for_heads(cfg: _Config, body):
    """``body(t)`` for each query head of a block: a traced loop (aligned lanes) or a static one (head groups)."""
    if cfg.packed:
        for t in range(cfg.heads):
            body(t)
    else:
        lax.fori_loop(0, cfg.heads, lambda t, carry: (body(t), carry)[1], 0)


def _kv_tiles(cfg: _Config, k_ref, v_ref):
    """``t -> (k, v)`` for query head t: the whole [bkv, hd] tiles (plain layout, loaded once), or the lanes of
    kv head t // G in [bkv, c·hd] tiles (head groups)."""
    if cfg.packed:
        hd = cfg.head_dim
        return lambda t: (k_ref[:, _cols(t // cfg.group, hd)], v_ref[:, _cols(t // cfg.group, hd)])
    k, v = k_ref[...], v_ref[...]
    return lambda t: (k, v)


def _acc(cfg: _Config, t):
    """Index of head ``t``'s f32 accumulator: [rows, hd] of an [n, rows, hd] scratch, or (head groups) lanes
    t·hd … t·hd + hd of a [rows, n·hd] one (as dense as the output tile, no per-head lane padding)."""
    return (slice(None), _cols(t, cfg.head_dim)) if cfg.packed else t


def _acc_scratch(cfg: _Config, rows: int, n: int):
    """f32 accumulators of ``n`` heads: [n, rows, hd], or (head groups) [rows, n·hd]."""
    hd = cfg.head_dim
    return pltpu.VMEM((rows, n * hd) if cfg.packed else (n, rows, hd), jnp.float32)


def _stat(cfg: _Config, t):
    """Index of query head ``t``'s running max / sum: [bq, 128] lane-replicated rows of an [n, bq, 128] scratch,
    or (head groups, many heads per block) column t of a [bq, ≥n] scratch, [bq, 1]."""
    return (slice(None), pl.ds(t, 1)) if cfg.packed else t


def _allowed(q_doc, q_index, q_hi, kv_doc, kv_index, kv_hi):
    """The split-wise rule on broadcastable tiles (q column / kv row, or the transpose)."""
    return (q_doc == kv_doc) & (q_doc != 0) & (kv_index <= q_hi) & (q_index <= kv_hi)


def _step_flags(steps_ref, key_fn):
    """Current step, and whether it opens / closes its line (q row or kv column) of the schedule."""
    s, n = pl.program_id(1), pl.num_programs(1)
    step = steps_ref[s]
    key = key_fn(step)
    first = jnp.logical_or(s == 0, key_fn(steps_ref[jnp.maximum(s - 1, 0)]) != key)
    last = jnp.logical_or(s == n - 1, key_fn(steps_ref[jnp.minimum(s + 1, n - 1)]) != key)
    return step, first, last


def _index_maps():
    """Block index maps reading the scalar-prefetched schedule; grid = (kv-head block g, step s)."""

    def q_rows(g, s, st):  # [B, Lq, Hq·hd] blocks of one q-head group (c·G heads)
        b, i, _, _ = block_map.unpack(st[s])
        return b, i, g

    def kv_rows(g, s, st):  # [B, Lkv, Hkv·hd] blocks of c kv heads
        b, _, j, _ = block_map.unpack(st[s])
        return b, j, g

    def q_stats(g, s, st):  # [B, Hkv/c, c·G, Lq]
        b, i, _, _ = block_map.unpack(st[s])
        return b, g, 0, i

    def q_meta(g, s, st):  # [B, 4, Lq]
        b, i, _, _ = block_map.unpack(st[s])
        return b, 0, i

    def kv_meta(g, s, st):  # [B, 4, Lkv]
        b, _, j, _ = block_map.unpack(st[s])
        return b, 0, j

    return q_rows, kv_rows, q_stats, q_meta, kv_meta


def _compiler_params(cfg: _Config):
    kw = dict(dimension_semantics=("parallel", "arbitrary"))
    if cfg.vmem_limit_bytes is not None:
        kw["vmem_limit_bytes"] = cfg.vmem_limit_bytes
    return pltpu.CompilerParams(**kw)


def _row_tile_mask(qm_ref, km_ref):
    """bool[bq, bkv] of a (q-block, kv-block) tile from its metadata refs (q along sublanes)."""
    return _allowed(
        qm_ref[0][:, None], qm_ref[1][:, None], qm_ref[2][:, None], km_ref[0:1, :], km_ref[1:2, :], km_ref[3:4, :]
    )


def _by_block_kind(kind, compute):
    """Runs ``compute(masked)`` for a partial block (rule evaluated in-kernel) or a full one (no mask)."""
    pl.when(kind == block_map.PARTIAL)(lambda: compute(True))
    pl.when(kind == block_map.FULL)(lambda: compute(False))


# ----------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(
    steps_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: _Config, precision
):
    step, first, last = _step_flags(steps_ref, block_map.row_key)
    kind = block_map.unpack(step)[3]

    @pl.when(first)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def compute(masked: bool):
        kv = _kv_tiles(cfg, k_ref, v_ref)
        if masked:
            mask = _row_tile_mask(qm_ref, km_ref)

        def head(t):
            k, v = kv(t)
            s = _dot(q_ref[:, _q_cols(cfg, t)], k, NT, precision) * cfg.scale
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            m_prev, l_prev = m_scr[_stat(cfg, t)], l_scr[_stat(cfg, t)]  # [bq, 128] lane-replicated, or [bq, 1]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
            p = jnp.exp(s - m_next[:, :1])
            alpha = jnp.exp(m_prev - m_next)
            l_scr[_stat(cfg, t)] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
            m_scr[_stat(cfg, t)] = m_next
            pv = _dot(p.astype(v.dtype), v, NN, precision)
            acc_scr[_acc(cfg, t)] = alpha[:, :1] * acc_scr[_acc(cfg, t)] + pv

        _for_heads(cfg, head)

    _by_block_kind(kind, compute)

    @pl.when(last)
    def _finish():
        def head(t):
            m, l = m_scr[_stat(cfg, t)][:, :1], l_scr[_stat(cfg, t)][:, :1]
            seen = m > 0.5 * MASK_VALUE  # at least one allowed key
            safe_l = jnp.where(seen, l, 1.0)
            o = jnp.where(seen, acc_scr[_acc(cfg, t)] / safe_l, 0.0)
            o_ref[:, _q_cols(cfg, t)] = o.astype(o_ref.dtype)
            lse = jnp.where(seen, m + jnp.log(safe_l), NO_KEY_LSE)
            lse_ref[pl.ds(t, 1), :] = lse[:, 0][None, :]

        _for_heads(cfg, head)


def _stat_scratch(cfg: _Config, bq: int):
    """Running max / sum of the forward pass: [n, bq, 128] lane-replicated, or [bq, ≥n] (head groups)."""
    n = cfg.heads
    return pltpu.VMEM((bq, round_up(n, LANES)) if cfg.packed else (n, bq, LANES), jnp.float32)


def _forward(cfg: _Config, q, k, v, qm, km, steps, count):
    """q [B, Lq, Hq·hd], k/v [B, Lkv, Hkv·hd] → out like q, lse f32[B, Hkv/c, c·G, Lq]."""
    b, lq, _ = q.shape
    hkv = k.shape[-1] // cfg.head_dim // cfg.kv_heads_per_block  # kv-head blocks
    bq, bkv, hd, g = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.heads
    chd = cfg.kv_heads_per_block * hd
    q_rows, kv_rows, q_stats, q_meta, kv_meta = _index_maps()
    kernel = functools.partial(_fwd_kernel, cfg=cfg, precision=matmul_precision(q.dtype))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hkv, count),
            in_specs=[
                pl.BlockSpec((None, bq, g * hd), q_rows),
                pl.BlockSpec((None, bkv, chd), kv_rows),
                pl.BlockSpec((None, bkv, chd), kv_rows),
                pl.BlockSpec((None, 4, bq), q_meta),
                pl.BlockSpec((None, 4, bkv), kv_meta),
            ],
            out_specs=[
                pl.BlockSpec((None, bq, g * hd), q_rows),
                pl.BlockSpec((None, None, g, bq), q_stats),
            ],
            scratch_shapes=[
                _stat_scratch(cfg, bq),
                _stat_scratch(cfg, bq),
                _acc_scratch(cfg, bq, g),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hkv, g, lq), jnp.float32)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="split_splash_fwd",
    )(steps, q, k, v, qm, km)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# backward: dq walks q rows, dkv walks kv columns (both over non-empty blocks only)


def _dq_kernel(
    steps_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, km_ref, dq_ref, dq_scr, *, cfg: _Config, precision
):
    step, first, last = _step_flags(steps_ref, block_map.row_key)
    kind = block_map.unpack(step)[3]

    @pl.when(first)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def compute(masked: bool):
        kv = _kv_tiles(cfg, k_ref, v_ref)
        if masked:
            mask = _row_tile_mask(qm_ref, km_ref)

        def head(t):
            k, v = kv(t)
            cols = _q_cols(cfg, t)
            s = _dot(q_ref[:, cols], k, NT, precision) * cfg.scale
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            p = jnp.exp(s - lse_ref[pl.ds(t, 1), :][0][:, None])
            dp = _dot(do_ref[:, cols], v, NT, precision)
            ds = p * (dp - di_ref[pl.ds(t, 1), :][0][:, None])
            dq_scr[_acc(cfg, t)] = dq_scr[_acc(cfg, t)] + _dot(ds.astype(k.dtype), k, NN, precision)

        _for_heads(cfg, head)

    _by_block_kind(kind, compute)

    @pl.when(last)
    def _finish():
        def head(t):
            dq_ref[:, _q_cols(cfg, t)] = (dq_scr[_acc(cfg, t)] * cfg.scale).astype(dq_ref.dtype)

        _for_heads(cfg, head)


def _dkv_kernel(
    steps_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    qm_ref,
    km_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    cfg: _Config,
    precision,
):
    hd, group = cfg.head_dim, cfg.group
    step, first, last = _step_flags(steps_ref, block_map.col_key)
    kind = block_map.unpack(step)[3]

    @pl.when(first)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def compute(masked: bool):
        if not cfg.packed:
            k, v = k_ref[...], v_ref[...]
        if masked:  # transposed tile: kv along sublanes, q along lanes
            mask = _allowed(
                qm_ref[0:1, :],
                qm_ref[1:2, :],
                qm_ref[2:3, :],
                km_ref[0][:, None],
                km_ref[1][:, None],
                km_ref[3][:, None],
            )

        def head(t, carry, k, v):
            dk, dv = carry
            cols = _q_cols(cfg, t)
            q, do = q_ref[:, cols], do_ref[:, cols]
            s = _dot(k, q, NT, precision) * cfg.scale  # [bkv, bq]
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            p = jnp.exp(s - lse_ref[pl.ds(t, 1), :])
            dv = dv + _dot(p.astype(do.dtype), do, NN, precision)
            dp = _dot(v, do, NT, precision)
            ds = p * (dp - di_ref[pl.ds(t, 1), :])
            dk = dk + _dot(ds.astype(q.dtype), q, NN, precision)
            return dk, dv

        if cfg.packed:  # kv head j of the block gathers its G query heads j·G … j·G + G - 1
            for j in range(cfg.kv_heads_per_block):
                k, v = k_ref[:, _cols(j, hd)], v_ref[:, _cols(j, hd)]
                carry = dk_scr[_acc(cfg, j)], dv_scr[_acc(cfg, j)]
                for t in range(j * group, (j + 1) * group):
                    carry = head(t, carry, k, v)
                dk_scr[_acc(cfg, j)], dv_scr[_acc(cfg, j)] = carry
        else:
            dk_scr[...], dv_scr[...] = lax.fori_loop(
                0, group, lambda t, carry: head(t, carry, k, v), (dk_scr[...], dv_scr[...])
            )

    _by_block_kind(kind, compute)

    @pl.when(last)
    def _finish():
        if cfg.packed:
            for j in range(cfg.kv_heads_per_block):
                dk_ref[:, _cols(j, hd)] = (dk_scr[_acc(cfg, j)] * cfg.scale).astype(dk_ref.dtype)
                dv_ref[:, _cols(j, hd)] = dv_scr[_acc(cfg, j)].astype(dv_ref.dtype)
        else:
            dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(cfg: _Config, q, k, v, qm, km, out, lse, do, dq_sched, dkv_sched):
    b, lq, _ = q.shape
    c = cfg.kv_heads_per_block
    hkv = k.shape[-1] // cfg.head_dim // c  # kv-head blocks
    bq, bkv, hd, g = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.heads
    di = jnp.sum(
        out.astype(jnp.float32).reshape(b, lq, hkv, g, hd) * do.astype(jnp.float32).reshape(b, lq, hkv, g, hd), axis=-1
    ).transpose(0, 2, 3, 1)
    q_rows, kv_rows, q_stats, q_meta, kv_meta = _index_maps()
    precision = matmul_precision(q.dtype)
    in_specs = [
        pl.BlockSpec((None, bq, g * hd), q_rows),
        pl.BlockSpec((None, bkv, c * hd), kv_rows),
        pl.BlockSpec((None, bkv, c * hd), kv_rows),
        pl.BlockSpec((None, bq, g * hd), q_rows),
        pl.BlockSpec((None, None, g, bq), q_stats),
        pl.BlockSpec((None, None, g, bq), q_stats),
        pl.BlockSpec((None, 4, bq), q_meta),
        pl.BlockSpec((None, 4, bkv), kv_meta),
    ]
    args = (q, k, v, do, lse, di, qm, km)
    dkv_scratch = [pltpu.VMEM((bkv, hd), jnp.float32), pltpu.VMEM((bkv, hd), jnp.float32)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hkv, dq_sched.count),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, bq, g * hd), q_rows),
            scratch_shapes=[_acc_scratch(cfg, bq, g)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="split_splash_dq",
    )(dq_sched.steps, *args)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hkv, dkv_sched.count),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, bkv, c * hd), kv_rows), pl.BlockSpec((None, bkv, c * hd), kv_rows)],
            scratch_shapes=[_acc_scratch(cfg, bkv, c), _acc_scratch(cfg, bkv, c)] if cfg.packed else dkv_scratch,
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="split_splash_dkv",
    )(dkv_sched.steps, *args)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# custom_vjp core on the kernel layout


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, qm, km, fwd_sched, dq_sched, dkv_sched):
    return _forward(cfg, q, k, v, qm, km, *fwd_sched)[0]


def _core_fwd(cfg, q, k, v, qm, km, fwd_sched, dq_sched, dkv_sched):
    out, lse = _forward(cfg, q, k, v, qm, km, *fwd_sched)
    return out, (q, k, v, qm, km, out, lse, dq_sched, dkv_sched)


def _core_bwd(cfg, res, do):
    q, k, v, qm, km, out, lse, dq_sched, dkv_sched = res
    dq, dk, dv = _backward(cfg, q, k, v, qm, km, out, lse, do, dq_sched, dkv_sched)
    return dq, dk, dv, None, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------------
# public entry


def _smem_bytes(bsz: int, lq: int, lkv: int, bq: int, bkv: int, bq_bwd: int, bkv_bwd: int) -> int:
    """Bytes of the largest schedule (one int32 per block of every row) on the sequences padded to the blocks."""
    lq_p, lkv_p = round_up(lq, math.lcm(bq, bq_bwd)), round_up(lkv, math.lcm(bkv, bkv_bwd))
    return 4 * bsz * max((lq_p // bq) * (lkv_p // bkv), (lq_p // bq_bwd) * (lkv_p // bkv_bwd))


def split_splash_attention(
    q,
    k,
    v,
    q_meta: MaskMeta,
    kv_meta: MaskMeta | None = None,
    *,
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    block_q_bwd: int | None = None,
    block_kv_bwd: int | None = None,
    interpret: bool = False,
    vmem_limit_bytes: int | None = None,
    pad_head_dim: bool = False,
):
    """Split-wise masked attention with GQA as a block-sparse Pallas TPU kernel (differentiable).

    Args:
      q: [B, Lq, Hq, hd]; k, v: [B, Lkv, Hkv, hd], Hq % Hkv == 0 (q head h reads kv head h // (Hq/Hkv)).
      q_meta, kv_meta: MaskMeta, each field int32[B, Lq] / int32[B, Lkv] (kv_meta defaults to q_meta).
      scale: softmax scale, default 1/sqrt(hd).
      block_q, block_kv: tile sizes of the forward pass (multiples of 128; clipped to the padded length).
      block_q_bwd, block_kv_bwd: tile sizes of the dq / dkv passes (default: the forward ones).
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      vmem_limit_bytes: scoped VMEM limit handed to Mosaic (default: the compiler's). With head groups a
        pass's blocks are halved (down to 128) until its tiles fit it (default VMEM_BUDGET, 16 MiB).
      pad_head_dim: zero-pad head_dim to a multiple of 128 even where head groups would avoid it (the
        padded layout, kept as the oracle and for comparison).

    Returns:
      [B, Lq, Hq, hd] in q's dtype; queries with no allowed key give zeros. Sequences are zero-padded
      to the block sizes internally; head_dim only where it is not a multiple of 128 and no head group
      fits (``kv_heads_per_block``), or with ``pad_head_dim``.
    """
    kv_meta = q_meta if kv_meta is None else kv_meta
    check_inputs(q, k, v, q_meta, kv_meta)
    bsz, lq, hq, hd = q.shape
    lkv, hkv = k.shape[1], k.shape[2]
    scale = hd**-0.5 if scale is None else float(scale)
    block_q_bwd = block_q if block_q_bwd is None else block_q_bwd
    block_kv_bwd = block_kv if block_kv_bwd is None else block_kv_bwd
    for name, val in (
        ("block_q", block_q),
        ("block_kv", block_kv),
        ("block_q_bwd", block_q_bwd),
        ("block_kv_bwd", block_kv_bwd),
    ):
        if val <= 0 or val % LANES:
            raise ValueError(f"attention {name} must be a positive multiple of {LANES}, got {val}")
    # clip blocks to the (128-padded) sequence, then pad the sequence to a multiple of every block
    lq_128, lkv_128 = round_up(lq, LANES), round_up(lkv, LANES)
    bq, bq_bwd = min(block_q, lq_128), min(block_q_bwd, lq_128)
    bkv, bkv_bwd = min(block_kv, lkv_128), min(block_kv_bwd, lkv_128)
    group = hq // hkv
    c = None if pad_head_dim else kv_heads_per_block(hd, group, hkv)
    if c is not None and hd % LANES:  # head groups: c·G heads per tile, so fit the tiles to VMEM
        budget = VMEM_BUDGET if vmem_limit_bytes is None else vmem_limit_bytes
        lanes = (c * group * hd, c * hd, jnp.dtype(q.dtype).itemsize)
        fwd, bwd = fit_blocks(bq, bkv, *lanes, False, budget), fit_blocks(bq_bwd, bkv_bwd, *lanes, True, budget)
        if fwd is None or bwd is None or _smem_bytes(bsz, lq, lkv, *fwd, *bwd) > SMEM_BYTES - (64 << 10):
            c = None  # pad head_dim rather than fail on smaller blocks' schedules
        else:
            (bq, bkv), (bq_bwd, bkv_bwd) = fwd, bwd
    hd_p, c = (hd, c) if c is not None else (round_up(hd, LANES), 1)
    lq_p = round_up(lq, math.lcm(bq, bq_bwd))
    lkv_p = round_up(lkv, math.lcm(bkv, bkv_bwd))
    cfg = _Config(
        block_q=bq,
        block_kv=bkv,
        block_q_bwd=bq_bwd,
        block_kv_bwd=bkv_bwd,
        group=group,
        head_dim=hd_p,
        kv_heads_per_block=c,
        scale=scale,
        interpret=bool(interpret),
        vmem_limit_bytes=vmem_limit_bytes,
    )

    def to_kernel(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hd_p - hd)))
        return x.reshape(x.shape[0], length, x.shape[2] * hd_p)

    if not interpret:
        smem = _smem_bytes(bsz, lq, lkv, bq, bkv, bq_bwd, bkv_bwd)
        if smem > SMEM_BYTES - (64 << 10):
            raise ValueError(
                f"attention schedule needs {smem >> 10} KiB of TPU scalar memory (SMEM, 1 MiB): "
                "use larger block_q / block_kv or fewer rows per device"
            )
    qm, km = meta_rows(q_meta, lq_p), meta_rows(kv_meta, lkv_p)
    q_meta_p = MaskMeta(*(qm[:, r] for r in range(4)))
    kv_meta_p = MaskMeta(*(km[:, r] for r in range(4)))
    (fwd_sched,) = block_map.schedules(q_meta_p, kv_meta_p, bq, bkv, by=("q",))
    dq_sched, dkv_sched = block_map.schedules(q_meta_p, kv_meta_p, bq_bwd, bkv_bwd, by=("q", "kv"))
    out = _core(
        cfg, to_kernel(q, lq_p), to_kernel(k, lkv_p), to_kernel(v, lkv_p), qm, km, fwd_sched, dq_sched, dkv_sched
    )
    return out.reshape(bsz, lq_p, hq, hd_p)[:, :lq, :, :hd]
