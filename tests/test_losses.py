"""Losses against formulas written here (reference §1.4 steps 8–9, §1.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.train.losses import bagel_loss_fn, ce_sum_count, cross_entropy, loss_terms, mse_sum_count, total_loss


def _ce_ref(logits, labels):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def test_cross_entropy_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 13)).astype(np.float32) * 4
    labels = rng.integers(0, 13, (3, 7))
    np.testing.assert_allclose(
        np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))),
        _ce_ref(logits, labels),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("reweighting", [False, True])
def test_ce_weighting(reweighting):
    """Default: Σ ce over label slots / #label slots. Reweighting: Σ ce·w / Σ w. Non-label slots never count."""
    rng = np.random.default_rng(1)
    ce = rng.random((4, 10)).astype(np.float32)
    w = np.where(rng.random((4, 10)) < 0.5, rng.random((4, 10)) + 0.1, 0.0).astype(np.float32)
    ce_nan = np.where(w > 0, ce, np.nan).astype(np.float32)  # values at non-label slots must not leak in
    s, c = ce_sum_count(jnp.asarray(ce_nan), jnp.asarray(w), reweighting)
    if reweighting:
        want_s, want_c = (ce * w).sum(), w.sum()
    else:
        want_s, want_c = ce[w > 0].sum(), float((w > 0).sum())
    np.testing.assert_allclose(float(s), want_s, rtol=1e-6)
    np.testing.assert_allclose(float(c), want_c, rtol=1e-6)


def test_mse_channel_mean_then_token_mean():
    rng = np.random.default_rng(2)
    pred, target = rng.standard_normal((2, 9, 64)), rng.standard_normal((2, 9, 64))
    mask = rng.random((2, 9)) < 0.6
    s, c = mse_sum_count(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask))
    per_token = ((pred - target) ** 2).mean(-1)
    np.testing.assert_allclose(float(s) / float(c), per_token[mask].mean(), rtol=1e-5)
    assert float(c) == mask.sum()


def test_sums_and_counts_average_exactly_across_hosts():
    """Two 'hosts' (halves of a batch): (s1 + s2) / (c1 + c2) is the global token mean, unlike mean of means."""
    rng = np.random.default_rng(3)
    ce = rng.random((4, 12)).astype(np.float32)
    w = (rng.random((4, 12)) < np.array([[0.9], [0.9], [0.1], [0.1]])).astype(np.float32)
    s_all, c_all = ce_sum_count(jnp.asarray(ce), jnp.asarray(w), False)
    s1, c1 = ce_sum_count(jnp.asarray(ce[:2]), jnp.asarray(w[:2]), False)
    s2, c2 = ce_sum_count(jnp.asarray(ce[2:]), jnp.asarray(w[2:]), False)
    np.testing.assert_allclose(float((s1 + s2) / (c1 + c2)), float(s_all / c_all), rtol=1e-6)
    np.testing.assert_allclose(float(s_all / c_all), ce[w > 0].mean(), rtol=1e-6)
    loss = total_loss({"ce": s_all, "mse": jnp.float32(6.0)}, {"ce": c_all, "mse": jnp.float32(3.0)}, 0.5, 2.0)
    np.testing.assert_allclose(float(loss), 0.5 * ce[w > 0].mean() + 2.0 * 2.0, rtol=1e-6)


def test_losses_on_the_packed_row_match_the_reference_formulas():
    """loss_terms on Bagel's packed outputs = the reference reduction over the oracle's per-sample outputs:
    CE over label tokens (reference weights), MSE of llm2vae output against ε − x0 on noised tokens."""
    config, cfg, params, model = lib.tiny_setup()
    docs, batch, per_doc, noise, out = lib.packed_four()
    refs = lib.oracle_four()
    ce = np.concatenate([r["ce"][r["ce_weight"] > 0] for r in refs])
    w = np.concatenate([r["ce_weight"][r["ce_weight"] > 0] for r in refs])
    sq = np.concatenate([((r["velocity"] - r["target"]) ** 2).mean(-1)[r["noised"]] for r in refs if "velocity" in r])
    assert len(ce) > 5 and len(sq) > 5
    sums, counts = loss_terms(out, batch)
    np.testing.assert_allclose(float(sums["ce"] / counts["ce"]), ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["mse"] / counts["mse"]), sq.mean(), rtol=1e-5)
    assert float(counts["ce"]) == len(ce) and float(counts["mse"]) == len(sq)
    sums_rw, counts_rw = loss_terms(out, batch, ce_loss_reweighting=True)
    np.testing.assert_allclose(float(sums_rw["ce"] / counts_rw["ce"]), (ce * w).sum() / w.sum(), rtol=1e-5)

    # bagel_loss_fn end to end (explicit noise → same numbers), as the trainer calls it
    fn = jax.jit(lambda p, b, n: bagel_loss_fn(model, p, b, None, ce_weight=0.7, mse_weight=1.3, noise=n))
    loss, aux = fn(params, batch, noise)
    np.testing.assert_allclose(float(loss), 0.7 * ce.mean() + 1.3 * sq.mean(), rtol=1e-5)
    assert set(aux) == {"ce_sum", "ce_count", "mse_sum", "mse_count"}
    np.testing.assert_allclose(float(aux["mse_sum"]), sq.sum(), rtol=1e-5)
