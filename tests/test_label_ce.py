"""CE over label slots only (``data.max_labels_per_row``): same loss and gradients as the dense path that runs
the LM head at every und slot (the oracle), and a packer that never puts more labels in a row than the budget."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.config import ConfigError, validate
from bagel_jax.data.pack import RowPacker, assemble, doc_cost
from bagel_jax.model.bagel import Bagel, chunked_cross_entropy, label_slots
from bagel_jax.train.losses import bagel_loss_fn


def _two_rows():
    _, cfg, params, _ = lib.tiny_setup()
    b = lib.budgets()
    docs = lib.documents(lib.four_samples(), lib.layout(cfg))
    rows = [[docs[0], docs[1]], [docs[2], docs[3]]]
    _, noise = lib.image_noise(rows, b)
    return cfg, params, lib.packed_batch(rows, b), noise


def test_label_slot_ce_equals_dense_loss_and_grads():
    """Plain and reweighted CE (f32): loss, sums and counts as the dense path's, and every gradient (reweighted)."""
    cfg, params, batch, noise = _two_rows()
    labels_per_row = np.sum(np.asarray(batch.ce_weight) > 0, axis=1)
    assert labels_per_row.min() != labels_per_row.max() and labels_per_row.min() > 0
    budget = int(labels_per_row.max()) + 5  # unused entries in both rows; 3 chunks with a padded last one
    und_cfg = cfg.copy_and_resolve_references()
    und_cfg.visual_gen = False  # the CE paths differ only after the decoder: the VAE and flow head are left out
    und_cfg.attention_impl = "reference"  # (fast to compile)
    dense, slots = Bagel(und_cfg, ce_chunk=64), Bagel(und_cfg, ce_chunk=budget // 3 + 1, label_budget=budget)

    def both(p):
        out = {}
        for name, model in (("dense", dense), ("slots", slots)):
            for rw in (False, True):
                fn = functools.partial(bagel_loss_fn, model, batch=batch, rng=None, ce_loss_reweighting=rw)
                out[name, rw] = jax.value_and_grad(fn, has_aux=True)(p) if rw else (fn(p), None)
        return out

    gen_only = ("vae", "vae2llm", "llm2vae", "time_embedder", "latent_pos_embed")
    params = {k: v for k, v in params.items() if k not in gen_only}
    res = jax.jit(both)(params)
    for rw in (False, True):
        (loss_d, aux_d), grad_d = res["dense", rw]
        (loss_s, aux_s), grad_s = res["slots", rw]
        np.testing.assert_allclose(float(loss_s), float(loss_d), rtol=1e-6)
        for k in aux_d:
            np.testing.assert_allclose(float(aux_s[k]), float(aux_d[k]), rtol=1e-6, err_msg=k)
        if not rw:
            continue  # gradients once (the weights only scale the per-slot CE)
        flat_d, flat_s = jax.tree_util.tree_leaves_with_path(grad_d), jax.tree.leaves(grad_s)
        assert any(np.abs(np.asarray(g)).max() > 0 for _, g in flat_d)
        for (path, gd), gs in zip(flat_d, flat_s):
            np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=2e-5, atol=2e-7, err_msg=str(path))


def test_label_slots_pick_label_positions_in_order():
    rng = np.random.default_rng(0)
    w = np.where(rng.random((3, 40)) < 0.3, rng.random((3, 40)) + 0.1, 0.0).astype(np.float32)
    w[2] = 0.0  # a row without labels
    budget = int((w > 0).sum(1).max())
    slot, valid = jax.device_get(label_slots(w, budget))
    for r in range(3):
        want = np.nonzero(w[r] > 0)[0]
        assert valid[r].sum() == len(want)
        np.testing.assert_array_equal(slot[r][valid[r]], want)


def test_chunked_ce_matches_full_logits_for_any_chunk():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2, 11, 8)).astype(np.float32)
    kernel = rng.standard_normal((8, 13)).astype(np.float32)
    labels = rng.integers(0, 13, (2, 11))
    logits = h @ kernel
    want = jax.nn.logsumexp(logits, -1) - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    for chunk in (1, 4, 11, 64):
        np.testing.assert_allclose(chunked_cross_entropy(h, kernel, labels, chunk), want, rtol=1e-5, atol=1e-5)


def test_packer_keeps_rows_within_the_label_budget():
    _, cfg, _, _ = lib.tiny_setup()
    rng = np.random.default_rng(3)
    docs = [d for seed in range(4) for d in lib.documents(lib.four_samples(seed), lib.layout(cfg), seed)]
    labels = np.array([doc_cost(d)[5] for d in docs])
    budget = int(labels.max()) - 1  # the documents with the most labels do not fit an empty row
    b = dataclasses.replace(lib.budgets(), max_labels=budget)
    packer = RowPacker(b.capacity, buffer_size=4)
    rows, rejected = [], 0
    for i in rng.permutation(len(docs)):
        if not packer.fits_empty(doc_cost(docs[i])):
            rejected += 1
            continue
        rows += packer.add(int(i), doc_cost(docs[i]))
    rows += packer.flush()
    assert rejected == int((labels > budget).sum()) >= 1
    out = assemble([[docs[i] for i in r] for r in rows], b)
    per_row = (out["ce_weight"] > 0).sum(1)
    assert per_row.max() <= budget and per_row.sum() == labels[labels <= budget].sum()
    assert max(len(r) for r in rows) > 1  # rows do hold several documents


@pytest.mark.parametrize(
    ("key", "value"), [("data.max_labels_per_row", -1), ("data.max_labels_per_row", 10**6), ("model.ce_chunk", 0)]
)
def test_bad_label_budget_names_the_key(key, value):
    config = lib.tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=f"^{key}:"):
        validate(config)
