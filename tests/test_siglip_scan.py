"""Scanned SigLIP (``model.vit.scan_layers``): the same outputs and gradients as the layer loop, under each remat
policy, and converters that keep the per-layer checkpoint keys."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from bagel_jax.convert.hf_vision import params_to_siglip, siglip_to_params
from bagel_jax.convert.layer_stack import stack_layers
from bagel_jax.model.siglip import SiglipNaViT
from test_siglip import PATCH, hf_model, model_cfg  # noqa: F401 (hf_model: a fixture)

LAYERS = 3


def _cfgs():
    plain = model_cfg()
    plain.vit.num_layers = LAYERS
    scanned = plain.copy_and_resolve_references()
    scanned.vit.scan_layers = True
    return plain, scanned


def _inputs():
    rng = np.random.default_rng(0)
    patches = rng.uniform(-1, 1, (2, 7, PATCH * PATCH * 3)).astype(np.float32)
    pos = np.array([[0, 1, 2, 4, 5, 6, 0], [0, 1, 4, 5, 0, 1, 0]], np.int32)
    ids = np.array([[1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2, 3]], np.int32)
    return patches, pos, ids


def _loss(cfg, p):
    out = SiglipNaViT(cfg).apply({"params": p}, *_inputs())
    return (out**2).mean() + out[:, :, 0].sum(), out


@functools.cache
def _loop_run():
    """(params, ((loss, out), grads)) of the layer loop (cached: one compile for every policy)."""
    plain, _ = _cfgs()
    params = nn.unbox(SiglipNaViT(plain).init(jax.random.key(1), *_inputs())["params"])
    params = jax.tree.map(np.asarray, params)
    return params, jax.jit(jax.value_and_grad(lambda p: _loss(plain, p), has_aux=True))(params)


@pytest.mark.parametrize("remat", ["full", "offload_qkv_attn"])
def test_scanned_equals_loop_outputs_and_grads(remat):
    _, scanned = _cfgs()
    scanned.remat = remat
    params, ((l_loop, out_loop), g_loop) = _loop_run()
    stacked = stack_layers(params, LAYERS)
    (l_scan, out_scan), g_scan = jax.jit(jax.value_and_grad(lambda p: _loss(scanned, p), has_aux=True))(stacked)
    np.testing.assert_allclose(out_scan, out_loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_scan, l_loop, rtol=1e-6)
    g_loop = stack_layers(jax.tree.map(np.asarray, g_loop), LAYERS)
    assert jax.tree.structure(g_scan) == jax.tree.structure(g_loop)
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(g_scan), jax.tree.leaves(g_loop)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max()), err_msg=str(kp))


def test_converters_keep_per_layer_keys(hf_model):  # noqa: F811 (the fixture imported above)
    plain, scanned = _cfgs()
    plain.vit.num_layers = scanned.vit.num_layers = 2  # the HF model has 3; the last is dropped as in the reference
    sd = hf_model.state_dict()
    loop, stacked = siglip_to_params(sd, plain), siglip_to_params(sd, scanned)
    assert "layers" in stacked and "layers_0" not in stacked
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == 2
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(stack_layers(loop, 2)), strict=True):
        np.testing.assert_array_equal(a, b)
    back, want = params_to_siglip(stacked, scanned), params_to_siglip(loop, plain)
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
