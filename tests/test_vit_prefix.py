"""``model.vit_patches``: the ViT over the used prefix of the patch slots equals the ViT over every slot."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bagel_testlib as lib
from bagel_jax.model.vit_prefix import on_used_prefix, prefix_sizes, resolve_vit_patches, used_patch_slots


@given(slots=st.integers(1, 5000), branches=st.integers(1, 6), multiple=st.sampled_from([1, 8, 32]))
def test_prefix_sizes(slots, branches, multiple):
    sizes = prefix_sizes(slots, branches, multiple)
    assert sizes[-1] == slots and list(sizes) == sorted(set(sizes)) and len(sizes) <= branches
    assert all(0 < n <= slots and (n == slots or n % multiple == 0) for n in sizes)
    for k in range(branches):  # every halving is covered by a size no larger than it rounded up
        target = slots / 2**k
        assert any(target <= n <= max(target, multiple * np.ceil(target / multiple)) for n in sizes)


def _mixing_vit(params, patches, pos_ids, image_ids):
    """A stand-in ViT whose outputs mix every patch of an image (segment sums), depend on positions and on params
    {"w": [F, F], "b": [3]}: [B, n, 3]."""
    same = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] > 0)
    pooled = jnp.tanh(jnp.einsum("bqk,bkf,fg->bqg", same.astype(patches.dtype), patches, params["w"]))
    out = jnp.stack([pooled.sum(-1), jnp.sin(pos_ids.astype(jnp.float32)) * patches[..., 0], pooled[..., -1]], -1)
    return out * params["b"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rows=st.integers(1, 3), slots=st.integers(1, 300))
def test_used_prefix_equals_all_slots(data, rows, slots):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    image_ids = np.zeros((rows, slots), np.int32)
    for r in range(rows):  # images packed from the front, as the packer fills the slots
        used = data.draw(st.integers(0, slots))
        start, image = 0, 1
        while start < used:
            size = int(rng.integers(1, 20))
            image_ids[r, start : min(used, start + size)] = image
            start, image = start + size, image + 1
    patches = jnp.asarray(rng.standard_normal((rows, slots, 4)), jnp.float32)
    pos_ids = jnp.asarray(rng.integers(0, 64, (rows, slots)), jnp.int32)
    ids = jnp.asarray(image_ids)
    params = {"w": jnp.asarray(rng.standard_normal((4, 4)) / 2, jnp.float32), "b": jnp.asarray([1.0, -0.5, 2.0])}
    want = np.asarray(_mixing_vit(params, patches, pos_ids, ids))
    used = jax.jit(lambda *a: on_used_prefix(_mixing_vit, *a, multiple=8))
    got = np.asarray(used(params, patches, pos_ids, ids))
    real = image_ids > 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-6, atol=1e-6)
    # gradients (the custom VJP re-runs the chosen branch) of a loss on the real slots only
    weight = jnp.asarray(rng.standard_normal(want.shape) * real[..., None], jnp.float32)
    grad = jax.jit(jax.grad(lambda f, p, x: jnp.sum(f(p, x, pos_ids, ids) * weight), argnums=(1, 2)), static_argnums=0)
    for g_used, g_all in zip(
        jax.tree.leaves(grad(lambda *a: on_used_prefix(_mixing_vit, *a, multiple=8), params, patches)),
        jax.tree.leaves(grad(_mixing_vit, params, patches)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(g_used), np.asarray(g_all), rtol=1e-5, atol=1e-5)
    assert int(used_patch_slots(ids)) == (
        max(int(np.nonzero(row)[0].max()) + 1 for row in real if row.any()) if real.any() else 0
    )


def test_modes():
    assert resolve_vit_patches("all") == "all" and resolve_vit_patches("used") == "used"
    assert resolve_vit_patches("auto") == ("used" if jax.default_backend() == "cpu" else "all")
    with pytest.raises(ValueError, match="model.vit_patches"):
        resolve_vit_patches("some")


def test_bagel_used_prefix_equals_all_slots():
    """The whole model (fp32): outputs and every gradient, ViT ones included, with rows whose used prefixes differ
    and a cap of 160 slots, so the step runs a shorter branch than all slots."""
    config, cfg, params, _ = lib.tiny_setup()
    lay, b = lib.layout(cfg), lib.budgets(max_vit_patches=160)
    docs = lib.documents(lib.four_samples(), lay)
    batch = lib.packed_batch([docs, docs[1:3]], b)
    _, noise = lib.image_noise([docs, docs[1:3]], b)
    used = int(used_patch_slots(jnp.asarray(batch.vit_image)))
    assert 0 < used < prefix_sizes(160)[-2], used  # a prefix shorter than the cap is what runs
    runs = lib.runs_per_setting(cfg, params, batch, noise, "vit_patches", ("all", "used"))
    assert lib.assert_same_run(runs["all"], runs["used"], grads_named="vit_model") >= 4  # real grads through the switch


def test_used_prefix_gradient_keeps_no_branch_activations():
    """Differentiating the switch directly made its compiled forward emit every branch's activations (zero-filled
    for the branches not taken; 27 outputs here); with the custom VJP the forward emits the ViT's output only."""
    params = {"w": jnp.eye(4, dtype=jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    patches, pos = jnp.ones((1, 256, 4), jnp.float32), jnp.zeros((1, 256), jnp.int32)
    ids = (jnp.arange(256) < 40).astype(jnp.int32)[None]
    loss = lambda p, x: jnp.sum(on_used_prefix(_mixing_vit, p, x, pos, ids, multiple=8) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, patches).compile().as_text()
    outputs = [m.count("f32[") for m in re.findall(r"= \(([^)]*)\) conditional\(", hlo)]  # each switch's outputs
    assert sorted(outputs) == [1, 3], outputs  # forward: the ViT's output; backward: d params (2 leaves), d patches
