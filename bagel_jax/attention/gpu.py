"""Split-wise attention for GPU and CPU (any XLA backend): block-sparse flash attention in plain jnp.

Uses the same O(L) metadata and the same on-device block map / schedule as the TPU kernel
(block_map.py). A ``while_loop`` walks the schedule ``chunk`` block pairs at a time: each chunk
gathers its q, k, v tiles, computes masked logits as one batched matmul, and merges into per-row
online-softmax state (scatter-max / scatter-add), so the work is proportional to the number of
non-empty blocks (EMPTY blocks are never gathered), not to L². The backward pass (custom_vjp)
recomputes each chunk's probabilities from the saved logsumexp and scatter-adds dq, dk, dv.

Every op is standard XLA, so it compiles on GPU, TPU and CPU; it is tested on CPU against the dense
reference. ``auto`` picks it on GPU and on CPU. Default tiles follow the backend (``default_block``): 128 on
GPU; 32 on CPU, where packs hold many short documents and a small tile wastes the least masked work (on a
2-core CPU, fwd+bwd of one tiny-model layer at a 4K pack: 32 → ~0.04 s, 128 → ~0.16 s, dense reference ~11 s).
Its speed on a GPU against dense XLA attention (goal ≥3× at 8K–16K) is measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from bagel_jax.attention import block_map
from bagel_jax.attention.kernel_inputs import check_inputs, matmul_precision, meta_rows, round_up
from bagel_jax.attention.mask import MaskMeta


@dataclasses.dataclass(frozen=True)
class _Config:
    block_q: int
    block_kv: int
    chunk: int
    group: int
    scale: float


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=matmul_precision(a.dtype))


def _q_tiles(cfg: _Config, x):
    """[B, Lq, Hq, hd] → head-major q tiles [B, n_q, Hkv, G, bq, hd]."""
    b, lq, hq, hd = x.shape
    return x.reshape(b, lq // cfg.block_q, cfg.block_q, hq // cfg.group, cfg.group, hd).transpose(0, 1, 3, 4, 2, 5)


def _kv_tiles(cfg: _Config, x):
    """[B, Lkv, Hkv, hd] → head-major kv tiles [B, n_kv, Hkv, bkv, hd]."""
    b, lkv, hkv, hd = x.shape
    return x.reshape(b, lkv // cfg.block_kv, cfg.block_kv, hkv, hd).transpose(0, 1, 3, 2, 4)


def _untile_q(x, shape):
    """Inverse of ``_q_tiles``: [B, n_q, Hkv, G, bq, hd] → ``shape`` [B, Lq, Hq, hd]."""
    return x.transpose(0, 1, 4, 2, 3, 5).reshape(shape)


def _untile_kv(x, shape):
    """Inverse of ``_kv_tiles``: [B, n_kv, Hkv, bkv, hd] → ``shape`` [B, Lkv, Hkv, hd]."""
    return x.transpose(0, 1, 3, 2, 4).reshape(shape)


def _blocks(cfg: _Config, q, k, v, qm, km):
    """Tiled views, head-major so that every tile matmul is a plain batched matmul over (chunk, head) and a
    gathered tile needs no transpose (on XLA:CPU the transposed copies of token-major tiles cost more than the
    backward's matmuls): q [B, n_q, Hkv, G, bq, hd], k/v [B, n_kv, Hkv, bkv, hd], meta [B, n, 4, block]."""
    b, lq = q.shape[:2]
    lkv = k.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    qb, kb, vb = _q_tiles(cfg, q), _kv_tiles(cfg, k), _kv_tiles(cfg, v)
    qmb = qm.reshape(b, 4, lq // bq, bq).transpose(0, 2, 1, 3)
    kmb = km.reshape(b, 4, lkv // bkv, bkv).transpose(0, 2, 1, 3)
    return qb, kb, vb, qmb, kmb


def _padded(cfg: _Config, sched):
    """The schedule with ``chunk`` trailing steps, so every chunk can be sliced in bounds."""
    return block_map.Schedule(jnp.pad(sched.steps, (0, cfg.chunk)), sched.count)


def _chunk(cfg: _Config, sched, c):
    """Steps ``c·chunk …`` of a ``_padded`` schedule: (b, i, j, live); ``live`` is False past ``count`` / EMPTY."""
    entries = lax.dynamic_slice(sched.steps, (c * cfg.chunk,), (cfg.chunk,))
    b, i, j, kind = block_map.unpack(entries)
    live = (c * cfg.chunk + jnp.arange(cfg.chunk) < sched.count) & (kind != block_map.EMPTY)
    return b, i, j, live


def _logits(cfg: _Config, qc, kc, qmc, kmc, live):
    """Scaled logits [C, Hkv, G, bq, bkv] and the mask [C, 1, 1, bq, bkv] of gathered head-major tiles."""
    s = _einsum("chgqd,chkd->chgqk", qc, kc) * cfg.scale
    qd, qi, qh = qmc[:, 0, :, None], qmc[:, 1, :, None], qmc[:, 2, :, None]
    kd, ki, kh = kmc[:, 0, None, :], kmc[:, 1, None, :], kmc[:, 3, None, :]
    mask = (qd == kd) & (qd != 0) & (ki <= qh) & (qi <= kh) & live[:, None, None]
    return s, mask[:, None, None]


def _n_chunks(cfg, sched):
    return (sched.count + cfg.chunk - 1) // cfg.chunk


def _forward(cfg: _Config, q, k, v, qm, km, sched):
    qb, kb, vb, qmb, kmb = _blocks(cfg, q, k, v, qm, km)
    m0 = jnp.full(qb.shape[:-1], -jnp.inf, jnp.float32)  # [B, n_q, Hkv, G, bq]
    l0 = jnp.zeros_like(m0)
    acc0 = jnp.zeros(qb.shape, jnp.float32)
    sched = _padded(cfg, sched)

    def body(state):
        c, m, l, acc = state
        b, i, j, live = _chunk(cfg, sched, c)
        s, mask = _logits(cfg, qb[b, i], kb[b, j], qmb[b, i], kmb[b, j], live)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = m.at[b, i].max(jnp.max(s, axis=-1))
        m_row = m_new[b, i]
        p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m_row), m_row, 0.0)[..., None]), 0.0)
        alpha = jnp.where(jnp.isfinite(m_new), jnp.exp(m - m_new), 1.0)
        l = (l * alpha).at[b, i].add(jnp.sum(p, axis=-1))
        pv = _einsum("chgqk,chkd->chgqd", p.astype(v.dtype), vb[b, j])
        acc = (acc * alpha[..., None]).at[b, i].add(pv)
        return c + 1, m_new, l, acc

    _, m, l, acc = lax.while_loop(lambda st: st[0] < _n_chunks(cfg, sched), body, (0, m0, l0, acc0))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # [B, n_q, Hkv, G, bq]
    out = _untile_q(out, q.shape).astype(q.dtype)
    return out, lse


def _backward(cfg: _Config, q, k, v, qm, km, sched, out, lse, do):
    qb, kb, vb, qmb, kmb = _blocks(cfg, q, k, v, qm, km)
    dob = _q_tiles(cfg, do)
    # rowsum(out · do) as a batched dot: XLA:CPU's fused multiply-reduce over an array with a leading unit axis
    # (a one-row batch) is ~40× slower (docs/EXPERIMENTS.md)
    di = jnp.einsum("...d,...d->...", _q_tiles(cfg, out.astype(jnp.float32)), dob.astype(jnp.float32))  # like lse
    sched = _padded(cfg, sched)

    def body(state):
        c, dq, dk, dv = state
        b, i, j, live = _chunk(cfg, sched, c)
        qc, kc, vc, doc = qb[b, i], kb[b, j], vb[b, j], dob[b, i]
        s, mask = _logits(cfg, qc, kc, qmb[b, i], kmb[b, j], live)
        p = jnp.where(mask, jnp.exp(s - lse[b, i][..., None]), 0.0)
        dp = _einsum("chgqd,chkd->chgqk", doc, vc)
        ds = p * (dp - di[b, i][..., None])
        dq = dq.at[b, i].add(_einsum("chgqk,chkd->chgqd", ds.astype(k.dtype), kc) * cfg.scale)
        dk = dk.at[b, j].add(_einsum("chgqk,chgqd->chkd", ds.astype(q.dtype), qc) * cfg.scale)
        dv = dv.at[b, j].add(_einsum("chgqk,chgqd->chkd", p.astype(do.dtype), doc))
        return c + 1, dq, dk, dv

    init = (0, jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    _, dq, dk, dv = lax.while_loop(lambda st: st[0] < _n_chunks(cfg, sched), body, init)
    return (
        _untile_q(dq, q.shape).astype(q.dtype),
        _untile_kv(dk, k.shape).astype(k.dtype),
        _untile_kv(dv, v.shape).astype(v.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, qm, km, sched):
    return _forward(cfg, q, k, v, qm, km, sched)[0]


def _core_fwd(cfg, q, k, v, qm, km, sched):
    out, lse = _forward(cfg, q, k, v, qm, km, sched)
    return out, (q, k, v, qm, km, sched, out, lse)


def _core_bwd(cfg, res, do):
    q, k, v, qm, km, sched, out, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, qm, km, sched, out, lse, do)
    return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


CPU_BLOCK, ACCELERATOR_BLOCK = 32, 128


def default_block(length: int, backend: str | None = None) -> int:
    """Tile size along a sequence of ``length`` tokens: CPU_BLOCK on CPU, ACCELERATOR_BLOCK elsewhere, doubled
    while the sequence would need more than ``block_map.MAX_BLOCKS`` tiles."""
    backend = jax.default_backend() if backend is None else backend
    block = CPU_BLOCK if backend == "cpu" else ACCELERATOR_BLOCK
    while round_up(length, block) // block > block_map.MAX_BLOCKS:
        block *= 2
    return block


CPU_CHUNK_BYTES = 4 << 20


def default_chunk(q_blocks: int, q_tile_bytes: int, backend: str | None = None) -> int:
    """Block pairs per loop step: the number of q blocks; on CPU at most what keeps one chunk's gathered q tiles
    within ``CPU_CHUNK_BYTES`` (cache-sized: at head_dim 128 a 4K pack's fwd+bwd takes 0.08 s in chunks of 64
    against 0.11 s in chunks of 128; docs/EXPERIMENTS.md), and at least 16."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return max(1, q_blocks)
    return max(1, min(q_blocks, max(16, CPU_CHUNK_BYTES // q_tile_bytes)))


def gpu_attention(
    q,
    k,
    v,
    q_meta: MaskMeta,
    kv_meta: MaskMeta | None = None,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    chunk: int | None = None,
):
    """Split-wise masked attention with GQA, block-sparse in XLA (differentiable).

    Args:
      q: [B, Lq, Hq, hd]; k, v: [B, Lkv, Hkv, hd] with Hq % Hkv == 0.
      q_meta, kv_meta: MaskMeta int32[B, Lq] / int32[B, Lkv] (kv_meta defaults to q_meta).
      scale: softmax scale, default 1/sqrt(hd).
      block_q, block_kv: tile sizes (multiples of 8; clipped to the padded sequence); default ``default_block``.
      chunk: block pairs per loop iteration (default ``default_chunk``: the number of q blocks per batch, on CPU
        capped to a cache-sized chunk).

    Returns:
      [B, Lq, Hq, hd] in q's dtype; queries with no allowed key give zeros.
    """
    kv_meta = q_meta if kv_meta is None else kv_meta
    check_inputs(q, k, v, q_meta, kv_meta)
    bsz, lq, hq, hd = q.shape
    lkv, hkv = k.shape[1], k.shape[2]
    block_q = default_block(lq) if block_q is None else block_q
    block_kv = default_block(lkv) if block_kv is None else block_kv
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if val <= 0 or val % 8:
            raise ValueError(f"attention {name} must be a positive multiple of 8, got {val}")
    bq, bkv = min(block_q, round_up(lq, 8)), min(block_kv, round_up(lkv, 8))
    lq_p, lkv_p = round_up(lq, bq), round_up(lkv, bkv)
    chunk = default_chunk(lq_p // bq, bq * hq * hd * jnp.dtype(q.dtype).itemsize) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"attention chunk must be >= 1, got {chunk}")
    cfg = _Config(
        block_q=bq, block_kv=bkv, chunk=chunk, group=hq // hkv, scale=hd**-0.5 if scale is None else float(scale)
    )
    qm, km = meta_rows(q_meta, lq_p), meta_rows(kv_meta, lkv_p)
    (sched,) = block_map.schedules(
        MaskMeta(*(qm[:, r] for r in range(4))), MaskMeta(*(km[:, r] for r in range(4))), bq, bkv, by=("q",)
    )
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out = _core(cfg, pad(q, lq_p), pad(k, lkv_p), pad(v, lkv_p), qm, km, sched)
    return out[:, :lq]
