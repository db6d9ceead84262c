"""Embeddings: timestep features and 2-D sin-cos table against the reference formulas (float64 numpy),
the modules against torch written from the reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bagel_jax.data.images import flattened_position_ids
from bagel_jax.model.embeddings import (
    Connector,
    PositionEmbedding,
    TimestepEmbedder,
    sincos_2d_table,
    timestep_embedding,
)
from configs_util import shipped_config


def test_timestep_embedding_formula():
    t = np.array([0.0, 1e-3, 0.25, 0.5, 0.9999, 1.0])
    half = 128
    expected = np.zeros((len(t), 256))
    for i, ti in enumerate(t):
        for k in range(half):
            f = math.exp(-math.log(10000.0) * k / half)
            expected[i, k] = math.cos(ti * f)  # cos first
            expected[i, half + k] = math.sin(ti * f)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32)))
    assert got.shape == (6, 256) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-7)


def test_sincos_table_formula():
    dim, n = 16, 5
    quarter = dim // 4
    expected = np.zeros((n * n, dim))
    for row in range(n):
        for col in range(n):
            for k in range(quarter):
                w = 1.0 / 10000.0 ** (k / quarter)
                i = row * n + col
                expected[i, k], expected[i, quarter + k] = math.sin(col * w), math.cos(col * w)  # column half
                expected[i, 2 * quarter + k], expected[i, 3 * quarter + k] = math.sin(row * w), math.cos(row * w)
    got = sincos_2d_table(dim, n)
    assert got.dtype == np.float32 and got.shape == (n * n, dim)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=0, atol=0)


def test_sincos_table_matches_diffusers_mae_implementation():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = np.asarray(get_2d_sincos_pos_embed(64, 7, base_size=7, output_type="pt"), np.float64)
    np.testing.assert_allclose(sincos_2d_table(64, 7), ref, atol=1e-6)


def test_sincos_table_bad_dim():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_table(18, 4)


def test_position_embedding_is_the_table_and_frozen():
    module = PositionEmbedding(n=4, dim=8)
    ids = jnp.array([[0, 5, 15], [3, 3, 12]], jnp.int32)
    params = module.init(jax.random.PRNGKey(0), ids)["params"]
    table = np.asarray(nn.meta.unbox(params)["pos_embed"])
    np.testing.assert_array_equal(table, sincos_2d_table(8, 4))
    out = module.apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(out), sincos_2d_table(8, 4)[np.asarray(ids)])
    grad = jax.grad(lambda p: module.apply({"params": p}, ids).sum())(nn.meta.unbox(params))
    assert float(jnp.abs(grad["pos_embed"]).max()) == 0.0


def _load_dense(params, name, linear: torch.nn.Linear):
    params[name] = {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}


def test_timestep_embedder_matches_torch_formula():
    torch.manual_seed(0)
    hidden = 48
    mlp = torch.nn.Sequential(torch.nn.Linear(256, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None] * freqs[None]
    with torch.no_grad():
        expected = mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)).numpy()
    params = {}
    _load_dense(params, "mlp_0", mlp[0])
    _load_dense(params, "mlp_2", mlp[2])
    got = TimestepEmbedder(hidden).apply({"params": params}, jnp.asarray(t.numpy()))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_connector_matches_torch_formula():
    torch.manual_seed(1)
    fc1, fc2 = torch.nn.Linear(24, 40), torch.nn.Linear(40, 40)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = fc2(torch.nn.functional.gelu(fc1(x), approximate="tanh")).numpy()
    params = {}
    _load_dense(params, "fc1", fc1)
    _load_dense(params, "fc2", fc2)
    got = Connector(40).apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_tiny_repro_cells_get_distinct_position_vectors():
    """configs/tiny_repro.py (DESIGN_NOTES 18): the 3×3 cells' position vectors, as its rows and its ViT stage
    index them, are far apart; the extrapolated ids 0, 1, 2 of BAGEL's default rule are nearly one vector."""
    m = shipped_config("tiny_repro").model

    def max_cosine(n, interpolate):
        e = sincos_2d_table(m.hidden_size, n)[flattened_position_ids(3, 3, 1, n, interpolate)]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return (e @ e.T - 2 * np.eye(9)).max()

    assert m.interpolate_pos and m.max_latent_size == m.vit_max_num_patch_per_side
    assert max_cosine(m.max_latent_size, True) < 0.9
    assert max_cosine(m.max_latent_size, False) > 0.95  # what it replaced
