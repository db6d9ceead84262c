"""Split-wise mask metadata vs the official rule, and the reference attention vs a naive softmax.

``create_sparse_mask_literal`` below is the reference's ``create_sparse_mask`` (data/data_utils.py,
quoted in shared/reference/bagel.md §3.1) transcribed literally, evaluated by brute force over every
(q, kv) pair. The reference pads a pack with one extra causal pseudo-document; we mark padding with
doc 0 instead, which attends to nothing and is attended by nothing, so padding pairs are compared
against False and real pairs against the literal predicate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bagel_jax.attention import MaskMeta, Split, allowed, metadata_from_splits, reference_attention


def create_sparse_mask_literal(document_lens, split_lens, attn_modes):
    """Returns mask_mod(q_idx, kv_idx) -> bool, written as the reference writes it."""

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def full_and_noise_mask(b, h, q_idx, kv_idx):
        return (full_and_noise_seq_id[q_idx] == full_and_noise_seq_id[kv_idx]) & (full_and_noise_seq_id[q_idx] >= 0)

    def remove_noise_mask(b, h, q_idx, kv_idx):
        return ~((noise_seq_id[kv_idx] >= 0) & (noise_seq_id[q_idx] != noise_seq_id[kv_idx]))

    def sample_mask(b, h, q_idx, kv_idx):
        return document_id[q_idx] == document_id[kv_idx]

    full_and_noise_tmp = []
    noise_tmp = []
    for i, (length, model) in enumerate(zip(split_lens, attn_modes)):
        value = i if model in ["full", "noise"] else -1
        full_and_noise_tmp.extend([value] * length)
        value_noise = i if model == "noise" else -1
        noise_tmp.extend([value_noise] * length)
    full_and_noise_seq_id = np.array(full_and_noise_tmp)
    noise_seq_id = np.array(noise_tmp)
    document_id = np.concatenate([np.full((l,), i) for i, l in enumerate(document_lens, start=1)])

    def mask_mod(q_idx, kv_idx):  # and_masks(or_masks(causal, full_and_noise), remove_noise, sample)
        b = h = 0
        return bool(
            (causal_mask(b, h, q_idx, kv_idx) | full_and_noise_mask(b, h, q_idx, kv_idx))
            & remove_noise_mask(b, h, q_idx, kv_idx)
            & sample_mask(b, h, q_idx, kv_idx)
        )

    return mask_mod


def _meta(md: dict, perm=None) -> MaskMeta:
    perm = np.arange(len(md["doc"])) if perm is None else perm
    return MaskMeta(**{k: np.asarray(v)[perm] for k, v in md.items()})


def _brute_force(docs, pad):
    """Dense bool[L, L] in natural order from the literal predicate (+ padding = nothing)."""
    split_lens = [n for doc in docs for _, n in doc]
    attn_modes = [m for doc in docs for m, _ in doc]
    document_lens = [sum(n for _, n in doc) for doc in docs]
    if pad:  # the reference's padding pseudo-sample
        split_lens, attn_modes, document_lens = split_lens + [pad], attn_modes + ["causal"], document_lens + [pad]
    mask_mod = create_sparse_mask_literal(document_lens, split_lens, attn_modes)
    real, length = sum(document_lens[: len(docs)]), sum(document_lens)
    out = np.zeros((length, length), bool)
    for q in range(real):
        for kv in range(real):
            out[q, kv] = mask_mod(q, kv)
    return out


def _splits(docs):
    return [Split(d, mode, n) for d, doc in enumerate(docs, start=1) for mode, n in doc]


layouts = st.tuples(
    st.lists(
        st.lists(st.tuples(st.sampled_from(["causal", "full", "noise"]), st.integers(1, 5)), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 4),
)


@settings(max_examples=150, deadline=None)
@given(layouts)
def test_metadata_equals_create_sparse_mask(layout):
    docs, pad = layout
    expected = _brute_force(docs, pad)
    md = metadata_from_splits(_splits(docs), len(expected))
    np.testing.assert_array_equal(np.asarray(allowed(_meta(md))), expected)


@settings(max_examples=60, deadline=None)
@given(layouts, st.randoms(use_true_random=False))
def test_metadata_is_layout_invariant(layout, rnd):
    """Any physical order (e.g. modality-sorted) with metadata carried = the natural mask permuted."""
    docs, pad = layout
    expected = _brute_force(docs, pad)
    perm = np.arange(len(expected))
    rnd.shuffle(perm)
    md = metadata_from_splits(_splits(docs), len(expected))
    np.testing.assert_array_equal(np.asarray(allowed(_meta(md, perm))), expected[np.ix_(perm, perm)])


def test_example_grid_from_reference():
    """bagel.md §3.2: split_lens [2,3,2,3,2], modes [causal, full, causal, noise, full]."""
    grid = """
        x...........
        xx..........
        xxxxx.......
        xxxxx.......
        xxxxx.......
        xxxxxx......
        xxxxxxx.....
        xxxxxxxxxx..
        xxxxxxxxxx..
        xxxxxxxxxx..
        xxxxxxx...xx
        xxxxxxx...xx
    """
    expected = np.array([[c == "x" for c in line.strip()] for line in grid.strip().splitlines()])
    docs = [[("causal", 2), ("full", 3), ("causal", 2), ("noise", 3), ("full", 2)]]
    md = metadata_from_splits(_splits(docs))
    np.testing.assert_array_equal(np.asarray(allowed(_meta(md))), expected)
    np.testing.assert_array_equal(_brute_force(docs, 0), expected)


def _naive_attention(q, k, v, mask, scale):
    """Per (batch, head, query) numpy softmax over the allowed keys; no allowed key → zeros."""
    b, lq, hq, hd = q.shape
    groups = hq // k.shape[2]
    out = np.zeros((b, lq, hq, hd), np.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                keys = np.nonzero(mask[bi, i])[0]
                if len(keys) == 0:
                    continue
                logits = np.array([q[bi, i, h] @ k[bi, j, h // groups] for j in keys], np.float64) * scale
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, h // groups] for pj, j in zip(p, keys))
    return out


ROWS = [  # (docs, pad) per batch row, both rows 24 tokens
    ([[("causal", 3), ("full", 4), ("noise", 3), ("full", 4)], [("causal", 5)]], 5),
    ([[("noise", 2), ("causal", 6)], [("full", 3)], [("causal", 4), ("noise", 4), ("causal", 1)]], 4),
]


def _batch_meta(rows, perms=None):
    mds = [metadata_from_splits(_splits(docs), 24) for docs, _ in rows]
    perms = perms or [np.arange(24)] * len(rows)
    return MaskMeta(**{k: jnp.asarray(np.stack([md[k][p] for md, p in zip(mds, perms)])) for k in mds[0]})


def test_reference_attention_equals_naive_softmax():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 24, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 24, 2, 8)).astype(np.float32) for _ in range(2))
    meta = _batch_meta(ROWS)
    out = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta))
    mask = np.asarray(allowed(meta))
    np.testing.assert_allclose(out, _naive_attention(q, k, v, mask, 8**-0.5), rtol=1e-5, atol=1e-6)
    scaled = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta, scale=0.3))
    np.testing.assert_allclose(scaled, _naive_attention(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-6)


def test_padding_rows_are_zero_with_finite_gradients():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 24, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 24, 2, 8)), jnp.float32) for _ in range(2))
    meta = _batch_meta(ROWS)
    out = reference_attention(q, k, v, meta)
    pad = np.asarray(meta.doc) == 0
    assert pad.sum() == 9 and np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out)[pad], 0.0)
    grads = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, meta) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0])[pad], 0.0)


def test_reference_attention_separate_kv_meta_and_permutation():
    """Querying a subset of rows (q_meta ≠ kv_meta) and permuting tokens give the same per-token outputs."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 24, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 24, 2, 8)).astype(np.float32) for _ in range(2))
    meta = _batch_meta(ROWS)
    full = np.asarray(reference_attention(q, k, v, meta))
    rows = np.array([1, 5, 9, 12, 20])
    sub = reference_attention(
        q[:, rows], k, v, MaskMeta(*(a[:, rows] for a in (meta.doc, meta.index, meta.q_hi, meta.kv_hi))), meta
    )
    np.testing.assert_allclose(np.asarray(sub), full[:, rows], rtol=1e-6, atol=1e-6)
    perms = [rng.permutation(24) for _ in range(2)]
    take = lambda x: np.stack([x[b][p] for b, p in enumerate(perms)])  # noqa: E731
    permuted = np.asarray(reference_attention(take(q), take(k), take(v), _batch_meta(ROWS, perms)))
    np.testing.assert_allclose(permuted, take(full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(mode="cross", length=2), dict(mode="full", length=0)])
def test_bad_split_names_the_problem(bad):
    with pytest.raises(ValueError, match="split"):
        Split(doc=1, **bad)
