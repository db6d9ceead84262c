"""``attention_impl="auto"`` on CPU: the XLA block-sparse path (attention/gpu.py, CPU tiles) equals the dense oracle.

Random packed rows like the trainer's: many short documents (1–10 per row) of 1–4 splits in any mode, text and
ViT tokens in the und region, the latents of some full/noise splits in the gen region, random padding in both
regions and lengths that are not a multiple of the tile. Forward and dq/dk/dv in f32 ≤ 1e-5 (abs + rel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bagel_jax.attention import attention, block_map, resolve_impl
from bagel_jax.attention.gpu import CPU_BLOCK, default_block
from bagel_jax.attention.mask import CAUSAL, MODES, MaskMeta, Split, metadata_from_splits

FIELDS = ("doc", "index", "q_hi", "kv_hi")
UND, GEN = 150, 50  # a 200-token row: 7 × 32-token tiles, the last one part padding


@st.composite
def packed_row(draw):
    """dict of int32[UND + GEN]: modality-sorted like PackedBatch (und tokens, und padding, gen tokens, gen padding)."""
    splits, gen, und_used, gen_used = [], [], 0, 0
    for d in range(1, draw(st.integers(1, 10)) + 1):
        for _ in range(draw(st.integers(1, 4))):
            mode = draw(st.sampled_from(MODES))
            n = draw(st.integers(1, 30))
            latents = draw(st.integers(1, n - 2)) if mode != CAUSAL and n >= 3 and draw(st.booleans()) else 0
            if und_used + n - latents > UND or gen_used + latents > GEN:
                break
            splits.append(Split(d, mode, n))
            gen += [False] + [True] * latents + [False] * (n - 1 - latents) if latents else [False] * n
            und_used, gen_used = und_used + n - latents, gen_used + latents
    if not splits:
        splits, gen, und_used = [Split(1, CAUSAL, 3)], [False] * 3, 3
    total = len(gen)
    meta = metadata_from_splits(splits, total)
    is_gen = np.asarray(gen)
    und_pad, gen_pad = UND - int((~is_gen).sum()), GEN - int(is_gen.sum())
    pad = {f: np.zeros(n, np.int32) for f, n in (("und", und_pad), ("gen", gen_pad))}
    return {
        f: np.concatenate([meta[f][~is_gen], pad["und"], meta[f][is_gen], pad["gen"]]).astype(np.int32) for f in FIELDS
    }


@functools.partial(jax.jit, static_argnames=("impl",))
def value_and_grads(q, k, v, do, meta, *, impl):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, meta, impl=impl), q, k, v)
    return out, vjp(do)


def test_auto_is_the_block_sparse_path_with_cpu_tiles():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "gpu"
    assert default_block(4096) == CPU_BLOCK == 32
    assert default_block(4096, "gpu") == 128
    assert default_block(block_map.MAX_BLOCKS * CPU_BLOCK + 1) == 2 * CPU_BLOCK  # at most MAX_BLOCKS tiles


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(packed_row(), min_size=2, max_size=2), seed=st.integers(0, 1000))
def test_auto_matches_dense_oracle_fwd_bwd_f32(rows, seed):
    meta = MaskMeta(*(jnp.asarray(np.stack([r[f] for r in rows])) for f in FIELDS))
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    length = UND + GEN
    q, do = (jax.random.normal(kk, (2, length, 4, 16), jnp.float32) for kk in (ks[0], ks[3]))
    k, v = (jax.random.normal(kk, (2, length, 2, 16), jnp.float32) for kk in (ks[1], ks[2]))
    got = value_and_grads(q, k, v, do, meta, impl="auto")
    want = value_and_grads(q, k, v, do, meta, impl="reference")
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        g, w = np.asarray(g), np.asarray(w)
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"auto {name}")
    padding = np.asarray(meta.doc) == 0
    assert np.all(np.asarray(got[0])[padding] == 0)  # padded queries give zeros
