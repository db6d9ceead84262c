"""Sequence parallelism of a modality-sorted row: the shard-local order of the joined und + gen tokens.

A row is und slots ``[0, U)`` then gen slots ``[U, U+G)`` (DESIGN §4), and each expert's activations
[B, U, D] / [B, G, D] are split along their length over the mesh axes of ``activation_length`` (``sequence``).
Concatenating the two sharded halves in slot order would move data: with n shards, shard s of the concat
holds slots ``[s·L/n, (s+1)·L/n)``, which are not the slots shard s holds of either expert. So the decoder
joins them in the **shard-local order** instead: shard s holds und chunk s then gen chunk s::

    slot order:        [u_0 u_1 … u_{n-1} | g_0 g_1 … g_{n-1}]
    shard-local order: [u_0 g_0 | u_1 g_1 | … | u_{n-1} g_{n-1}]      (u_s = U/n und slots, g_s = G/n gen slots)

Joining and splitting in this order are reshapes and a per-shard concat: no communication. Attention does not
care about physical order (the mask metadata carries each token's logical index, RoPE its position), so the
row's position and mask metadata are put in the same order once per forward (``join_row``). With n = 1 (no
``sequence`` axis, or U or G not divisible by n) the shard-local order is the slot order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagel_jax.parallel.rules import as_mesh_axes

LENGTH_AXIS = "activation_length"


def length_shards(*lengths: int) -> int:
    """How many shards the context mesh splits ``activation_length`` into (flax's current logical rules), when that
    divides every one of ``lengths``; else 1 (then the decoder concatenates in slot order and XLA reshards)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.manual_axes:
        return 1
    axes = dict(nn.get_logical_axis_rules()).get(LENGTH_AXIS)
    axes = as_mesh_axes(axes)
    n = math.prod(mesh.shape.get(a, 1) for a in axes)
    return n if n > 1 and all(t % n == 0 for t in lengths) else 1


def join(und, gen, n: int):
    """und [B, U, ...], gen [B, G, ...] → [B, U+G, ...] in the shard-local order of ``n`` shards."""
    if n == 1 or gen.shape[1] == 0:
        return und if gen.shape[1] == 0 else jnp.concatenate([und, gen], axis=1)
    b, rest = und.shape[0], und.shape[2:]
    parts = [x.reshape(b, n, x.shape[1] // n, *rest) for x in (und, gen)]
    return jnp.concatenate(parts, axis=2).reshape(b, und.shape[1] + gen.shape[1], *rest)


def split(x, und_len: int, n: int):
    """Inverse of ``join``: [B, U+G, ...] in shard-local order → (und [B, U, ...], gen [B, G, ...])."""
    if n == 1:
        return x[:, :und_len], x[:, und_len:]
    b, length, rest = x.shape[0], x.shape[1], x.shape[2:]
    y = x.reshape(b, n, length // n, *rest)
    u = und_len // n
    return y[:, :, :u].reshape(b, und_len, *rest), y[:, :, u:].reshape(b, length - und_len, *rest)


def join_row(x, und_len: int, n: int):
    """A row-shaped array in slot order [B, U+G, ...] (positions, mask metadata) → the shard-local order."""
    return x if n == 1 else join(x[:, :und_len], x[:, und_len:], n)
