"""The one-row CPU batch's unit axis (model/layers.py ``without_unit_lead``, DESIGN_NOTES 58): norms computed with it
dropped give the same values and gradients as on the full shape, for any leading shape, zero tokens included; the
CPU attention's cache-sized chunks (attention/gpu.py ``default_chunk``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.attention.gpu import CPU_CHUNK_BYTES, default_chunk
from bagel_jax.model.layers import RMSNorm, without_unit_lead


def _plain_rmsnorm(scale, x, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return scale * (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps))


@pytest.mark.parametrize("shape", [(1, 37, 16), (1, 1, 37, 4, 8), (2, 9, 16), (1, 0, 16), (37, 16), (1, 16)])
def test_rmsnorm_equals_plain_norm_values_and_grads(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    g = jax.random.normal(jax.random.PRNGKey(1), shape)
    norm = RMSNorm()
    params = nn.meta.unbox(norm.init(jax.random.PRNGKey(2), x))
    params = jax.tree.map(lambda s: s * 1.3, params)

    def ours(p, x):
        return jnp.sum(norm.apply(p, x) * g)

    def plain(p, x):
        return jnp.sum(_plain_rmsnorm(p["params"]["scale"], x) * g)

    np.testing.assert_allclose(norm.apply(params, x), _plain_rmsnorm(params["params"]["scale"], x), atol=1e-6)
    got, want = jax.grad(ours, argnums=(0, 1))(params, x), jax.grad(plain, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_without_unit_lead_keeps_two_axes_and_passes_other_shapes_through():
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x * 2.0

    for shape, inner in (((1, 1, 5, 3), (5, 3)), ((1, 5), (1, 5)), ((2, 1, 3), (2, 1, 3)), ((1, 1, 3), (1, 3))):
        out = without_unit_lead(fn, jnp.ones(shape))
        assert out.shape == shape and seen[-1] == inner
    ln = nn.LayerNorm()
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 8))
    p = ln.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(without_unit_lead(lambda y: ln.apply(p, y), x), ln.apply(p, x), atol=1e-6)


def test_default_chunk_caps_cpu_chunks_by_bytes_only_on_cpu():
    tile = 32 * 4 * 128 * 4  # bq · Hq · hd · f32: 64 KiB
    assert default_chunk(128, tile, "cpu") == CPU_CHUNK_BYTES // tile == 64
    assert default_chunk(128, 32 * 4 * 24 * 4, "cpu") == 128  # small heads: every q block, as before
    assert default_chunk(128, 1 << 30, "cpu") == 16  # never below 16
    assert default_chunk(8, 1 << 30, "cpu") == 8  # nor above the number of q blocks
    assert default_chunk(128, tile, "gpu") == 128
