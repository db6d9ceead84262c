"""Split-wise attention fast paths vs the dense oracle (impl="reference").

Covers the on-device block map (sound against the dense mask), the schedules, the Pallas TPU kernel in
interpret mode (forward and dq/dk/dv, f32 and bf16, GQA, padding, packed documents in all three modes,
modality-sorted and shuffled rows), the XLA block-sparse GPU path, and the shard_map wrapper on 8 CPU
devices. Tolerances: f32 ≤ 1e-5 (abs + rel); bf16 inputs: out ≤ 2e-2, grads ≤ 4e-2 absolute after
dividing by max(1, largest reference magnitude) (bf16 matmuls, f32 softmax), against the f32 oracle
on the same bf16-rounded inputs.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType

from bagel_jax.attention import attention, block_map
from bagel_jax.attention.gpu import gpu_attention
from bagel_jax.attention.mask import CAUSAL, FULL, MODES, NOISE, MaskMeta, Split, metadata_from_splits
from bagel_jax.attention.tpu_split_splash import (
    fit_blocks,
    kv_heads_per_block,
    split_splash_attention,
    tile_vmem_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("doc", "index", "q_hi", "kv_hi")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------------------------------
# layouts


@st.composite
def packed_row(draw, length: int, order: str = "sorted"):
    """One row of metadata (dict of int32[length]): 1–4 documents of 1–4 splits in any mode.

    ``order``: "sorted" = modality-sorted like PackedBatch (und tokens, padding, gen tokens, padding;
    the inner latents of some full/noise splits are gen tokens, their two markers und); "shuffled" =
    a random permutation of the row (every block PARTIAL-prone); "natural" = natural order + padding.
    """
    splits, is_gen, total = [], [], 0
    for d in range(1, draw(st.integers(1, 4)) + 1):
        for _ in range(draw(st.integers(1, 4))):
            mode = draw(st.sampled_from(MODES))
            n = draw(st.integers(1, max(1, min(72, (length - total) // 2))))
            if total + n > length - 8:
                break
            vae = mode != CAUSAL and n >= 3 and draw(st.booleans())
            splits.append(Split(d, mode, n))
            is_gen += [False] + [True] * (n - 2) + [False] if vae else [False] * n
            total += n
    if not splits:
        splits, is_gen, total = [Split(1, CAUSAL, 5)], [False] * 5, 5
    meta = metadata_from_splits(splits, length)
    is_gen = np.asarray(is_gen + [False] * (length - total))
    if order == "natural":
        return meta
    if order == "shuffled":
        perm = np.random.default_rng(draw(st.integers(0, 2**31))).permutation(length)
        return {f: x[perm] for f, x in meta.items()}
    real = np.arange(length) < total
    und_pad = draw(st.integers(0, length - total))
    und, gen, pad = np.nonzero(real & ~is_gen)[0], np.nonzero(is_gen)[0], np.nonzero(~real)[0]
    perm = np.concatenate([und, pad[:und_pad], gen, pad[und_pad:]])
    return {f: x[perm] for f, x in meta.items()}


def to_meta(rows) -> MaskMeta:
    return MaskMeta(*(jnp.asarray(np.stack([r[f] for r in rows])) for f in FIELDS))


def random_qkv(seed, b, lq, lkv, hq, hkv, hd, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, hq, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, lkv, hkv, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, lkv, hkv, hd), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, lq, hq, hd), jnp.float32).astype(dtype)
    return q, k, v, do


@functools.partial(jax.jit, static_argnames=("impl", "kwargs"))
def value_and_grads(q, k, v, do, meta, kv_meta=None, *, impl, kwargs=()):
    """Output and (dq, dk, dv) of <out, do> for one implementation."""

    def f(q, k, v):
        return attention(q, k, v, meta, kv_meta, impl=impl, **dict(kwargs))

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(do)


def assert_close(got, want, atol, rtol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def check_against_reference(q, k, v, do, meta, impl, kwargs, kv_meta=None, f32=True):
    out, grads = value_and_grads(q, k, v, do, meta, kv_meta, impl=impl, kwargs=kwargs)
    f = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_grads = value_and_grads(f(q), f(k), f(v), f(do), meta, kv_meta, impl="reference")
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        if f32:
            assert_close(got, want, 1e-5, 1e-5, f"{impl} {name}")
        else:
            scale = max(float(np.abs(np.asarray(want)).max()), 1.0)
            tol = 2e-2 if name == "out" else 4e-2
            assert_close(np.asarray(got, np.float32) / scale, np.asarray(want) / scale, tol, 0, f"{impl} {name}")


TPU = (("interpret", True), ("block_q", 128), ("block_kv", 128))


# ----------------------------------------------------------------------------------------------------
# block map


@settings(max_examples=25, **SETTINGS)
@given(
    row=st.sampled_from(["sorted", "shuffled", "natural"]).flatmap(lambda o: packed_row(384, o)),
    bq=st.sampled_from([8, 32, 128]),
    bkv=st.sampled_from([8, 64, 128]),
)
def test_block_map_is_sound(row, bq, bkv):
    """Never EMPTY where the dense mask has an allowed pair; FULL only where all pairs are allowed."""
    meta = to_meta([row])
    kinds = np.asarray(block_map.block_kinds(meta, meta, bq, bkv))[0]
    exact = block_map.dense_block_kinds(row, row, bq, bkv)
    assert not np.any((exact != block_map.EMPTY) & (kinds == block_map.EMPTY))
    assert not np.any((kinds == block_map.FULL) & (exact != block_map.FULL))


def test_block_map_bounds_documents_separately():
    """A gen block holding latents of docs 1 and 3 is EMPTY for q blocks of doc 2 (und only, between them);
    whole-block document ranges (1..3) would visit it. On this PackedBatch-like row the map is exact."""
    splits = [
        Split(1, CAUSAL, 20),
        Split(1, NOISE, 62),
        Split(2, FULL, 52),
        Split(2, CAUSAL, 30),
        Split(3, CAUSAL, 10),
        Split(3, NOISE, 42),
    ]
    natural = metadata_from_splits(splits)
    is_gen = np.zeros(len(natural["doc"]), bool)
    is_gen[21:81] = True  # doc 1 latents (markers at 20 and 81 stay und)
    is_gen[175:215] = True  # doc 3 latents
    und, gen = np.nonzero(~is_gen)[0], np.nonzero(is_gen)[0]
    row = {
        f: np.concatenate([x[und], np.zeros(128 - len(und), np.int32), x[gen], np.zeros(128 - len(gen), np.int32)])
        for f, x in natural.items()
    }  # und region = 128 slots, gen region = 128 slots; padding doc 0
    meta = to_meta([row])
    kinds = np.asarray(block_map.block_kinds(meta, meta, 32, 32))[0]
    exact = block_map.dense_block_kinds(row, row, 32, 32)
    np.testing.assert_array_equal(kinds != block_map.EMPTY, exact != block_map.EMPTY)
    gen_block, doc2_q_block = 5, 1
    assert set(row["doc"][gen_block * 32 : (gen_block + 1) * 32]) == {1, 3}
    assert set(row["doc"][doc2_q_block * 32 : (doc2_q_block + 1) * 32]) == {2}
    assert kinds[doc2_q_block, gen_block] == block_map.EMPTY


@settings(max_examples=15, **SETTINGS)
@given(rows=st.lists(packed_row(256, "shuffled"), min_size=3, max_size=3), by=st.sampled_from(["q", "kv"]))
def test_schedule_lists_every_nonempty_block_once_in_order(rows, by):
    for row in rows:  # empty tail: whole rows / columns without blocks get one EMPTY step
        row["doc"] = np.where(np.arange(256) < 200, row["doc"], 0)
    meta = to_meta(rows)
    kinds = np.asarray(block_map.block_kinds(meta, meta, 64, 32))
    sched = block_map.schedule(jnp.asarray(kinds), by)
    steps = np.asarray(sched.steps)[: int(sched.count)]
    b, i, j, kind = (np.asarray(x) for x in block_map.unpack(steps))
    lines = kinds if by == "q" else kinds.transpose(0, 2, 1)
    expected = []
    for bb in range(lines.shape[0]):
        for line in range(lines.shape[1]):
            (nonempty,) = np.nonzero(lines[bb, line])
            for other in nonempty if len(nonempty) else [0]:
                ij = (line, other) if by == "q" else (other, line)
                expected.append((bb, *ij, kinds[bb, ij[0], ij[1]]))
    assert list(zip(b, i, j, kind)) == expected
    assert int(sched.count) == len(expected)


# ----------------------------------------------------------------------------------------------------
# TPU kernel (interpret mode) vs reference


@settings(max_examples=6, **SETTINGS)
@given(rows=st.lists(packed_row(256), min_size=2, max_size=2), seed=st.integers(0, 100))
def test_tpu_kernel_matches_reference_f32_gqa(rows, seed):
    q, k, v, do = random_qkv(seed, 2, 256, 256, 4, 2, 64)
    check_against_reference(q, k, v, do, to_meta(rows), "tpu", TPU)


@settings(max_examples=3, **SETTINGS)
@given(rows=st.lists(packed_row(384, "shuffled"), min_size=1, max_size=1), seed=st.integers(0, 100))
def test_tpu_kernel_matches_reference_shuffled_rows_mha(rows, seed):
    q, k, v, do = random_qkv(seed, 1, 384, 384, 2, 2, 64)
    check_against_reference(q, k, v, do, to_meta(rows), "tpu", TPU)


@settings(max_examples=3, **SETTINGS)
@given(rows=st.lists(packed_row(256), min_size=2, max_size=2), seed=st.integers(0, 100))
def test_tpu_kernel_matches_reference_bf16(rows, seed):
    q, k, v, do = random_qkv(seed, 2, 256, 256, 4, 1, 128, jnp.bfloat16)
    check_against_reference(q, k, v, do, to_meta(rows), "tpu", TPU, f32=False)


def test_tpu_kernel_odd_shapes_and_separate_backward_blocks():
    """L not a multiple of the blocks, head_dim 72 (SigLIP), other bwd tiles, explicit scale, Lq != Lkv."""
    q_row = metadata_from_splits(
        [Split(1, CAUSAL, 40), Split(1, FULL, 90), Split(2, NOISE, 60), Split(2, CAUSAL, 7)], 200
    )
    kv_row = metadata_from_splits(
        [Split(1, CAUSAL, 40), Split(1, FULL, 90), Split(2, NOISE, 60), Split(2, CAUSAL, 7), Split(3, FULL, 50)], 300
    )
    q, k, v, do = random_qkv(3, 1, 200, 300, 3, 1, 72)
    kwargs = TPU[:1] + (
        ("block_q", 256),
        ("block_kv", 128),
        ("block_q_bwd", 128),
        ("block_kv_bwd", 256),
        ("scale", 0.2),
    )
    out, grads = value_and_grads(q, k, v, do, to_meta([q_row]), to_meta([kv_row]), impl="tpu", kwargs=kwargs)
    ref_out, ref_grads = value_and_grads(
        q, k, v, do, to_meta([q_row]), to_meta([kv_row]), impl="reference", kwargs=(("scale", 0.2),)
    )
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert_close(got, want, 1e-5, 1e-5, name)


@settings(max_examples=2, **SETTINGS)
@given(
    rows=st.lists(
        st.sampled_from(["sorted", "shuffled"]).flatmap(lambda o: packed_row(256, o)), min_size=1, max_size=1
    ),
    seed=st.integers(0, 100),
)
@pytest.mark.parametrize("heads", [(16, 16, 72), (8, 4, 96), (11, 11, 200)])
def test_tpu_kernel_head_groups_match_reference(heads, rows, seed):
    """head_dim not a multiple of 128, unpadded: SigLIP's 16 heads × 72 (c = 16 kv heads per block, 1152 lanes),
    GQA 8 / 4 × 96 (c = 4, G = 2), and 11 heads × 200 (2200 lanes: too wide, the padded fallback). The 4 / 2 × 64
    tests above are head groups too (c = 2), the 3 / 1 × 72 one a full-width group (c = Hkv = 1, 216 lanes)."""
    hq, hkv, hd = heads
    q, k, v, do = random_qkv(seed, 1, 256, 256, hq, hkv, hd)
    check_against_reference(q, k, v, do, to_meta(rows), "tpu", TPU)


def test_kv_heads_per_block():
    """The fewest kv heads whose lanes are whole vregs, else all of them (a full-width block), within MAX_GROUP_LANES
    and MAX_GROUP_HEADS; 1 for aligned head_dim; None (pad head_dim) beyond."""
    assert kv_heads_per_block(128, 7, 1) == 1 and kv_heads_per_block(256, 1, 4) == 1
    assert kv_heads_per_block(72, 1, 16) == 16  # SigLIP so400m: 1152 = 9 × 128 lanes
    assert kv_heads_per_block(64, 2, 2) == 2 and kv_heads_per_block(96, 2, 4) == 4 and kv_heads_per_block(80, 1, 8) == 8
    assert kv_heads_per_block(72, 1, 32) == 16  # the fewest, not all
    assert kv_heads_per_block(72, 1, 8) == 8  # 16 does not divide 8 (SigLIP split 2-way by heads): all, 576 lanes
    assert kv_heads_per_block(80, 1, 12) == 12 and kv_heads_per_block(72, 3, 1) == 1  # all kv heads, full width
    assert kv_heads_per_block(72, 2, 16) is None  # 16 · 2 · 72 = 2304 lanes > MAX_GROUP_LANES
    assert kv_heads_per_block(200, 1, 11) is None  # 11 · 200 = 2200 lanes
    assert kv_heads_per_block(8, 4, 16) is None  # 16 kv heads of 8 lanes, but 64 query heads > MAX_GROUP_HEADS


def test_head_group_blocks_fit_vmem():
    """SigLIP's 16 × 72 bf16 tiles: the forward keeps 512 × 512, dq/dkv halve to 256 × 256 to fit 16 MiB (their
    512-row tiles need 16.5 MiB on v5e at 16K tokens); the 128-lane LLM tiles are never resized."""
    assert fit_blocks(512, 512, 1152, 1152, 2, False, 16 << 20) == (512, 512)
    assert fit_blocks(512, 512, 1152, 1152, 2, True, 16 << 20) == (256, 256)
    assert fit_blocks(1024, 256, 1152, 1152, 2, True, 16 << 20) == (512, 256)  # the larger halves first
    assert fit_blocks(384, 384, 1152, 1152, 2, True, 12 << 20) == (128, 128)  # multiples of 128 (192 → 128)
    assert fit_blocks(512, 512, 1152, 1152, 2, True, 64 << 20) == (512, 512)  # a larger vmem_limit_bytes
    assert fit_blocks(128, 128, 2048, 2048, 4, True, 1 << 20) is None
    assert tile_vmem_bytes(256, 256, 1152, 1152, 2, True) <= 16 << 20 < tile_vmem_bytes(512, 512, 1152, 1152, 2, True)


@pytest.mark.parametrize(
    "hq, hkv, hd, pad, lanes",
    [
        (16, 16, 72, False, 16 * 72),
        (16, 16, 72, True, 16 * 128),
        (16, 8, 80, False, 16 * 80),
        (3, 1, 72, False, 3 * 72),
        (11, 11, 200, False, 11 * 256),
    ],
)
def test_head_groups_do_not_pad_head_dim(hq, hkv, hd, pad, lanes):
    """The kernels read q as [B, L, Hq·hd] (no zero lanes) with head groups; [B, L, Hq·128] padded."""
    meta = to_meta([metadata_from_splits([Split(1, FULL, 128)])])
    q, k, v, do = random_qkv(0, 1, 128, 128, hq, hkv, hd)

    def f(q, k, v):
        return split_splash_attention(q, k, v, meta, interpret=True, block_q=128, block_kv=128, pad_head_dim=pad)

    jaxpr = jax.make_jaxpr(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))(q, k, v, do)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]  # fwd, dq, dkv
    assert len(calls) == 3
    for e in calls:  # operands: step count, schedule, q, k, ...
        assert e.invars[2].aval.shape == (1, 128, lanes)
        assert e.invars[3].aval.shape == (1, 128, lanes // (hq // hkv))


def test_padding_gives_zeros_and_empty_blocks_are_never_read():
    """Padding queries output zeros with zero gradients; K/V of an all-padding block (EMPTY for every q
    block) are NaN here and must never be read (a masked read would still give NaN · 0 = NaN)."""
    row = metadata_from_splits([Split(1, CAUSAL, 30), Split(1, NOISE, 100)], 384)  # 254 padding tokens
    meta = to_meta([row])
    q, k, v, do = random_qkv(0, 1, 384, 384, 2, 2, 64)
    ref_out, ref_grads = value_and_grads(q, k, v, do, meta, impl="reference")
    k, v = k.at[:, 256:].set(jnp.nan), v.at[:, 256:].set(jnp.nan)  # kv block 2 of 3 (block 128)
    for impl, kwargs in (("tpu", TPU), ("gpu", ())):
        out, (dq, dk, dv) = value_and_grads(q, k, v, do, meta, impl=impl, kwargs=kwargs)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out, *ref_grads)):
            assert_close(got, want, 1e-5, 1e-5, f"{impl} {name}")
            np.testing.assert_array_equal(np.asarray(got)[0, 130:], 0.0)


def test_bad_inputs_raise_one_line_errors():
    row = to_meta([metadata_from_splits([Split(1, CAUSAL, 256)])])
    q, k, v, _ = random_qkv(0, 1, 256, 256, 3, 2, 64)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        split_splash_attention(q, k, v, row, interpret=True)
    q, k, v, _ = random_qkv(0, 1, 256, 256, 2, 2, 64)
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 128"):
        split_splash_attention(q, k, v, row, block_q=96, interpret=True)
    with pytest.raises(ValueError, match=r"q_meta.doc has shape \(1, 128\)"):
        split_splash_attention(q, k, v, jax.tree.map(lambda x: x[:, :128], row), interpret=True)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        gpu_attention(q, k, v, row, chunk=0)
    big = jax.ShapeDtypeStruct((4, 32768, 1, 128), jnp.bfloat16)
    big_meta = MaskMeta(*(jax.ShapeDtypeStruct((4, 32768), jnp.int32),) * 4)
    with pytest.raises(ValueError, match="1024 KiB of TPU scalar memory"):  # Mosaic would run out of SMEM
        jax.eval_shape(lambda q, m: split_splash_attention(q, q, q, m, block_q=128, block_kv=128), big, big_meta)


# ----------------------------------------------------------------------------------------------------
# GPU path (XLA, runs on CPU here) vs reference


@settings(max_examples=5, **SETTINGS)
@given(
    rows=st.lists(
        st.sampled_from(["sorted", "shuffled"]).flatmap(lambda o: packed_row(256, o)), min_size=2, max_size=2
    ),
    seed=st.integers(0, 100),
    blocks=st.sampled_from([(32, 64, 3), (64, 32, 8), (128, 128, 1)]),
)
def test_gpu_path_matches_reference_f32(rows, seed, blocks):
    q, k, v, do = random_qkv(seed, 2, 256, 256, 4, 2, 32)
    bq, bkv, chunk = blocks
    check_against_reference(q, k, v, do, to_meta(rows), "gpu", (("block_q", bq), ("block_kv", bkv), ("chunk", chunk)))


def test_gpu_path_matches_reference_bf16():
    rows = [
        metadata_from_splits([Split(1, CAUSAL, 60), Split(1, FULL, 100), Split(2, NOISE, 80)], 256),
        metadata_from_splits([Split(1, NOISE, 200), Split(1, CAUSAL, 56)], 256),
    ]
    q, k, v, do = random_qkv(1, 2, 256, 256, 4, 2, 64, jnp.bfloat16)
    check_against_reference(q, k, v, do, to_meta(rows), "gpu", (("block_q", 64), ("block_kv", 64)), f32=False)


def test_gpu_path_does_not_import_the_tpu_kernel():
    """The XLA path shares kernel_inputs.py with the Pallas kernel, not the kernel module (nor Pallas TPU)."""
    code = (
        "import sys, bagel_jax.attention.gpu; "
        "print(sorted(m for m in sys.modules if m.endswith(('tpu_split_splash', 'pallas.tpu'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    )
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------------
# shard_map wrapper: batch, heads and q length sharded over 8 CPU devices


@pytest.mark.parametrize("impl,kwargs", [("tpu", TPU), ("gpu", (("block_q", 64), ("block_kv", 64)))])
def test_sharded_attention_matches_reference(impl, kwargs):
    mesh = jax.make_mesh((2, 1, 2, 2), ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4)
    rows = [
        metadata_from_splits(
            [Split(1, CAUSAL, 50), Split(1, FULL, 120), Split(2, NOISE, 200), Split(2, CAUSAL, 100)], 512
        ),
        metadata_from_splits([Split(1, NOISE, 300), Split(1, CAUSAL, 80), Split(2, FULL, 90)], 512),
    ]
    meta = to_meta(rows)
    q, k, v, do = random_qkv(5, 2, 512, 512, 4, 1, 64)  # 1 kv head over 2 head shards: repeated
    with jax.set_mesh(mesh):
        lowered = value_and_grads.lower(q, k, v, do, meta, impl=impl, kwargs=kwargs)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        out, grads = value_and_grads(q, k, v, do, meta, impl=impl, kwargs=kwargs)
    ref_out, ref_grads = value_and_grads(q, k, v, do, meta, impl="reference")
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert_close(got, want, 1e-5, 1e-5, f"sharded {impl} {name}")


# ----------------------------------------------------------------------------------------------------
# slow: TPU-semantics interpreter with race detection, larger sweep (pytest -m slow)


def tpu_interpreter():
    """JAX's TPU interpreter module, whose ``races`` (private) records what its race detector found after a kernel.

    Fails (never skips) when it moved, so that the race test cannot pass without a detector behind it."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
    except ImportError as e:
        pytest.fail(
            f"JAX moved its TPU interpreter (jax._src.pallas.mosaic.interpret.interpret_pallas_call: {e}): "
            "find where it records races now and update tpu_interpreter()"
        )
    if not hasattr(interpreter, "races"):
        pytest.fail("JAX's TPU interpreter has no `races` record any more: update tpu_interpreter()")
    return interpreter


def races_found(run):
    """Runs ``run()`` in TPU interpret mode with the race detector on; returns its result and whether the detector
    found a race."""
    from jax.experimental.pallas import tpu as pltpu

    interpreter = tpu_interpreter()
    pltpu.reset_tpu_interpret_mode_state()  # a fresh record: a kernel interpreted before cannot answer for this one
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
        result = run()
    races = interpreter.races
    assert races is not None, "no kernel ran under the race detector (TPU interpret mode did not interpret one)"
    assert isinstance(races.races_found, bool), f"the race record changed: races_found = {races.races_found!r}"
    return result, races.races_found


@pytest.mark.parametrize("race", [False, True])
def test_race_detector_finds_a_race(race):
    """The detector the race test relies on: a kernel that reads a DMA's destination before waiting is caught."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref, scratch, sem):
        copy = pltpu.make_async_copy(x_ref, scratch, sem)
        copy.start()
        if not race:
            copy.wait()
        o_ref[...] = scratch[...] + 1.0  # with race: reads what the DMA is still writing
        if race:
            copy.wait()

    x = jnp.zeros((8, 128), jnp.float32)

    def run():  # pallas_call reads the interpret mode when it is made
        call = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA],
        )
        return jax.block_until_ready(call(x))

    out, found = races_found(run)
    assert found is race
    if not race:
        np.testing.assert_array_equal(out, x + 1.0)


@pytest.mark.slow
def test_tpu_kernel_in_tpu_interpret_mode_has_no_races():
    """Simulates TPU pipelining (DMA, buffers, the dynamic grid) and checks for races (~30 s)."""
    rows = [
        metadata_from_splits(
            [Split(1, CAUSAL, 60), Split(1, FULL, 100), Split(2, NOISE, 150), Split(2, CAUSAL, 30)], 384
        )
    ]
    meta = to_meta(rows)
    q, k, v, do = random_qkv(2, 1, 384, 384, 2, 1, 128)

    def run():
        out, vjp = jax.vjp(lambda q, k, v: split_splash_attention(q, k, v, meta, block_q=128, block_kv=128), q, k, v)
        return jax.block_until_ready((out, vjp(do)))

    (out, grads), found = races_found(run)
    assert not found, "the race detector found a race in the split-splash kernels (printed above)"
    ref_out, ref_grads = value_and_grads(q, k, v, do, meta, impl="reference")
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert_close(got, want, 1e-5, 1e-5, f"tpu-interpret {name}")


@pytest.mark.slow
@settings(max_examples=12, **SETTINGS)
@given(
    rows=st.lists(
        st.sampled_from(["sorted", "shuffled", "natural"]).flatmap(lambda o: packed_row(768, o)), min_size=2, max_size=2
    ),
    seed=st.integers(0, 1000),
    heads=st.sampled_from([(4, 1), (4, 4), (8, 2)]),
    blocks=st.sampled_from([(128, 128), (256, 128), (128, 256), (256, 256)]),
)
def test_tpu_kernel_sweep_slow(rows, seed, heads, blocks):
    q, k, v, do = random_qkv(seed, 2, 768, 768, heads[0], heads[1], 64)
    kwargs = (("interpret", True), ("block_q", blocks[0]), ("block_kv", blocks[1]))
    check_against_reference(q, k, v, do, to_meta(rows), "tpu", kwargs)
    check_against_reference(q, k, v, do, to_meta(rows), "gpu", (("block_q", 64), ("block_kv", 128)))
