"""Small embedding modules of the BAGEL assembly (reference: modeling/bagel/modeling_utils.py).

* ``timestep_embedding`` / ``TimestepEmbedder``: flow time t ∈ [0, 1] → D (cos before sin, raw t).
* ``sincos_2d_table`` / ``PositionEmbedding``: the fixed 2-D sin-cos table (MAE/DiT) indexed by
  ``row * n + col``; kept as a parameter because the checkpoint stores it, never trained.
* ``Connector``: ViT width → LLM width MLP (fc1, gelu_tanh, fc2).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.model.layers import dense

FREQUENCY_EMBEDDING_SIZE = 256
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def activation(name: str):
    """The activation called ``name`` in the config (HF ACT2FN names)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def timestep_embedding(t: jnp.ndarray, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
    """Sinusoidal features of the flow time.

    Args:
      t: float[...] raw flow time in [0, 1] (not scaled by 1000).
      dim: feature size (even).

    Returns:
      float32[..., dim] = concat(cos(t·f), sin(t·f)), f_k = exp(-ln(max_period)·k/(dim/2)).
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """t float[...] → [..., hidden]: ``mlp_2(silu(mlp_0(timestep_embedding(t, 256))))``.

    Submodule names mirror the checkpoint (``time_embedder.mlp.0`` / ``time_embedder.mlp.2``).
    """

    hidden: int
    frequency_size: int = FREQUENCY_EMBEDDING_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        x = timestep_embedding(t, self.frequency_size).astype(self.dtype)
        x = dense(self.hidden, ("time_freq", "mlp"), "mlp_0", self.dtype, self.param_dtype)(x)
        x = jax.nn.silu(x)
        return dense(self.hidden, ("mlp", "embed"), "mlp_2", self.dtype, self.param_dtype)(x)


def sincos_2d_table(dim: int, n: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table float32[n*n, dim] for an n×n grid (row-major, id = row*n + col).

    ``table[row*n + col] = concat(E(col), E(row))``, ``E(p) = concat(sin(p·ω), cos(p·ω))`` with
    ``ω_k = 10000^(-k/(dim/4))``, k < dim/4; computed in float64, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d_table: dim must be a multiple of 4, got {dim}")
    if n < 1:
        raise ValueError(f"sincos_2d_table: grid side n must be >= 1, got {n}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """Fixed 2-D sin-cos embedding of an n×n grid: ids int[...] (row*n + col) → [..., dim].

    The table is the parameter ``pos_embed`` [n², dim] (it is in the checkpoint), initialised to
    ``sincos_2d_table`` and wrapped in ``stop_gradient``, so it never trains.
    """

    n: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        n, dim = self.n, self.dim
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda _key, shape: jnp.asarray(sincos_2d_table(dim, n)), ("pos_table", "embed")
            ),
            (n * n, dim),
        )
        table = jax.lax.stop_gradient(table)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class Connector(nn.Module):
    """ViT features [..., Dv] → LLM width [..., hidden]: ``fc2(act(fc1(x)))``."""

    hidden: int
    act: str = "gelu_pytorch_tanh"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fn = activation(self.act)
        x = dense(self.hidden, ("vit_embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x.astype(self.dtype))
        return dense(self.hidden, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(fn(x))
