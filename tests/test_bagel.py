"""Bagel on packed rows = the unpacked oracle on each sample alone (tiny model, fp32)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.batch import KIND_NOISED_VAE
from bagel_jax.model.bagel import Bagel, chunked_cross_entropy, flow_time, pixels_to_unit
from bagel_jax.model.unpacked import dense_mask


@pytest.fixture(scope="module")
def setup():
    return lib.tiny_setup()


@pytest.fixture(scope="module")
def packed_run():
    return lib.packed_four()


def test_packed_equals_unpacked(setup, packed_run):
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    u = batch.und_len
    for d, (doc, ref) in enumerate(zip(docs, lib.oracle_four()), start=1):
        und, gen = lib.slots_of(batch, 0, d)
        assert len(und) == len(ref["logits"]) and len(gen) == len(doc.gen_nat), doc.key
        np.testing.assert_allclose(
            out["text_logits"][0, und], ref["logits"], atol=1e-5, rtol=1e-5, err_msg=f"logits of sample {doc.key}"
        )
        np.testing.assert_allclose(out["ce"][0, und], ref["ce"], atol=1e-5, rtol=1e-5)
        if len(gen):
            np.testing.assert_allclose(
                out["velocity_pred"][0, gen],
                ref["velocity"],
                atol=1e-5,
                rtol=1e-5,
                err_msg=f"velocity of sample {doc.key}",
            )
            np.testing.assert_allclose(out["velocity_target"][0, gen], ref["target"], atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(out["mse_mask"][0, gen], ref["noised"])
            np.testing.assert_allclose(out["timestep"][0, gen], ref["t"], atol=1e-6)
    # the row really holds every kind of token, and padding slots produce no loss mask
    kinds = set(np.asarray(batch.kind[0]).tolist())
    assert kinds == {0, 1, 2, 3, 4}
    assert not np.any(out["mse_mask"][0][np.asarray(batch.doc[0, u:]) == 0])


def test_noise_and_timestep_formulas(setup, packed_run):
    """x_t / target follow the reference: t = shift(sigmoid(z)), clean t = 0, target = ε − x0 (ε from the rng)."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    z = np.asarray(batch.vae_timestep[0])
    t_img = 1 / (1 + np.exp(-z.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(flow_time(jnp.asarray(z), 1.0)), np.nan_to_num(t_img), atol=1e-7)
    s = 3.0
    np.testing.assert_allclose(
        np.asarray(flow_time(jnp.asarray([0.3]), s)),
        [s * (1 / (1 + np.exp(-0.3))) / (1 + (s - 1) / (1 + np.exp(-0.3)))],
        rtol=1e-6,
    )
    u = batch.und_len
    noised = np.asarray(batch.kind[0, u:]) == KIND_NOISED_VAE
    np.testing.assert_array_equal(out["mse_mask"][0], noised)
    assert np.all(out["timestep"][0][~noised] == 0) and np.all(out["timestep"][0][noised] > 0)


@pytest.mark.slow
def test_rng_drives_the_noise(setup, packed_run):
    """The same rng gives the same noise, another rng other noise (posterior and flow drawn inside)."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    noised = np.asarray(out["mse_mask"][0])
    fwd = jax.jit(lambda p, bt, r: model.apply({"params": p}, bt, r))
    a, a2, b = (fwd(params, batch, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(a["velocity_target"]), np.asarray(a2["velocity_target"]))
    assert not np.allclose(np.asarray(a["velocity_target"])[0, noised], np.asarray(b["velocity_target"])[0, noised])


def test_dense_mask_matches_reference_example():
    """bagel.md §3.2's printed example (splits [2,3,2,3,2], modes causal,full,causal,noise,full)."""
    rows = [
        "x...........",
        "xx..........",
        "xxxxx.......",
        "xxxxx.......",
        "xxxxx.......",
        "xxxxxx......",
        "xxxxxxx.....",
        "xxxxxxxxxx..",
        "xxxxxxxxxx..",
        "xxxxxxxxxx..",
        "xxxxxxx...xx",
        "xxxxxxx...xx",
    ]
    want = np.array([[c == "x" for c in r] for r in rows])
    got = dense_mask([2, 3, 2, 3, 2], ["causal", "full", "causal", "noise", "full"])
    np.testing.assert_array_equal(got, want)


def test_chunked_cross_entropy_matches_full():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 37, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 11)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, (2, 37)), jnp.int32)
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    want = lse - np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]
    ce = jax.jit(chunked_cross_entropy, static_argnums=3)
    for chunk in (5, 64):
        np.testing.assert_allclose(np.asarray(ce(h, w, labels, chunk)), want, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda hh: chunked_cross_entropy(hh, w, labels, 5).sum()))(h)
    g_full = jax.jit(
        jax.grad(
            lambda hh: (jax.nn.logsumexp(hh @ w, -1) - jnp.take_along_axis(hh @ w, labels[..., None], -1)[..., 0]).sum()
        )
    )(h)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_full), rtol=1e-5, atol=1e-6)


def test_encode_scan_equals_one_call(setup, packed_run):
    """``model.vae.encode_scan`` (image slots encoded one after another) = the one-call encode: same params,
    same outputs."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    scan_cfg = cfg.copy_and_resolve_references()
    scan_cfg.vae.encode_scan = True
    scanned = Bagel(scan_cfg, ce_chunk=64)
    init = jax.eval_shape(lambda: scanned.init(jax.random.key(0), batch, noise=noise)["params"])
    assert jax.tree.structure(nn.unbox(init)) == jax.tree.structure(params)
    got = jax.jit(lambda p, bt, n: scanned.apply({"params": p}, bt, noise=n))(params, batch, noise)
    assert batch.vae_images.shape[1] > 1
    for key in ("velocity_target", "velocity_pred", "ce"):
        np.testing.assert_allclose(np.asarray(got[key]), out[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_encode_scan_k_slots_per_step_equals_one_at_a_time(setup, packed_run):
    """``encode_scan`` with k slots per step (what a tensor pair uses, so its chips split the step's images) gives
    the moments of one slot per step, in the same [B·N] order."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    images = np.concatenate([np.asarray(batch.vae_images)] * 2)  # 2 rows
    hw = np.concatenate([np.asarray(batch.vae_hw)] * 2)
    images[1] = images[1, ::-1]  # the second row's slots in the other order: rows must not mix
    hw[1] = hw[1, ::-1]
    n = images.shape[1]
    assert n % 2 == 0 and n > 2
    got = {
        k: jax.jit(lambda p, x, h, k=k: model.apply({"params": p}, x, h, False, k, method=Bagel._encode_slot_by_slot))(
            params, images, hw
        )
        for k in (1, 2, n)
    }
    real = np.asarray(hw).reshape(-1, 2)[:, 0] > 0
    for k in (2, n):  # empty slots hold zeros where a whole step is empty, the masked canvas's encode elsewhere
        for a, b in zip(got[k], got[1]):
            np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5, rtol=1e-5, err_msg=f"k={k}")
    means = np.asarray(got[1][0])[real]
    assert len(means) >= 2 and not all(np.allclose(m, means[0]) for m in means[1:])  # not one image everywhere


def test_encode_scan_skips_steps_of_empty_slots(setup, packed_run):
    """A scan step whose slots are empty in every row does not run the encoder (zeros); the real images' moments
    are the one-call encode's."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    images, hw = np.asarray(batch.vae_images).copy(), np.asarray(batch.vae_hw).copy()
    n = hw.shape[1]
    hw[:, -1] = 0  # the last slot empty in every row
    real = (hw[..., 0] > 0) & (hw[..., 1] > 0)
    assert real.any() and n > 1

    def by_slot(p, x, h):
        return model.apply({"params": p}, x, h, False, 1, method=Bagel._encode_slot_by_slot)

    assert "cond[" in str(jax.make_jaxpr(by_slot)(params, images, hw))
    mean, logvar = jax.jit(by_slot)(params, images, hw)
    flat = pixels_to_unit(jnp.asarray(images)).reshape(-1, *images.shape[2:])
    one_call = model.apply(
        {"params": params}, flat, jnp.asarray(hw).reshape(-1, 2), method=lambda m, x, h: m.vae.encode(x, h)
    )
    flat_real = real.reshape(-1)
    np.testing.assert_allclose(np.asarray(mean)[flat_real], np.asarray(one_call[0])[flat_real], atol=1e-5, rtol=1e-5)
    skipped = np.arange(hw.shape[0] * n).reshape(hw.shape[0], n)[:, -1]
    assert not np.asarray(mean)[skipped].any() and not np.asarray(logvar)[skipped].any()


def test_flat_mlp_equals_batched(setup, packed_run):
    """``model.mlp_tokens``: the MLPs (decoder and SigLIP) on [B·T, D] give the batched forward's outputs and
    gradients (fp32): only the layout XLA sees changes."""
    config, cfg, params, model = setup
    docs, batch, per_doc, noise, out = packed_run
    runs = lib.runs_per_setting(cfg, params, batch, noise, "mlp_tokens", ("batched", "flat"))
    mlp_grads = lib.assert_same_run(runs["batched"], runs["flat"], grads_named="mlp")
    assert mlp_grads >= 4  # the decoder's and the ViT's MLPs got real gradients


def test_llm2vae_zero_init(setup):
    """llm2vae starts at zero weight and bias (reference ``_init_weights``)."""
    config, cfg, params, model = setup
    v = model.init(jax.random.key(0), jnp.ones((1, 3, cfg.hidden_size)), method=Bagel.velocity)
    llm2vae = nn.unbox(v["params"]["llm2vae"])
    assert set(v["params"]) == {"llm2vae"} and llm2vae["kernel"].shape == (cfg.hidden_size, 64)
    assert not np.any(np.asarray(llm2vae["kernel"])) and not np.any(np.asarray(llm2vae["bias"]))


@pytest.mark.slow
def test_vae_gets_zero_gradient(setup):
    """The VAE inside the param tree is frozen: exactly zero gradient (stop_gradient on its outputs)."""
    config, cfg, params, model = setup
    lay, b = lib.layout(cfg), lib.budgets()
    docs = lib.documents(lib.four_samples()[:1], lay)
    batch = lib.packed_batch([docs], b)

    def loss(p):
        out = model.apply({"params": p}, batch, jax.random.key(0))
        return jnp.sum(out["velocity_pred"] ** 2) + jnp.sum(out["ce"] * batch.ce_weight)

    grads = jax.jit(jax.grad(loss))(params)
    vae_grads = jax.tree.leaves(grads["vae"])
    assert vae_grads and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in vae_grads)  # all() of nothing is True
    assert float(jnp.max(jnp.abs(grads["vae2llm"]["kernel"]))) > 0
