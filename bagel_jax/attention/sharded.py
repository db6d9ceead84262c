"""Runs an attention kernel under ``jax.shard_map`` on the mesh of the context (``jax.set_mesh``).

Pallas kernels cannot be partitioned by XLA, so the kernel runs per device on its shard: batch and
heads are split as the logical-axis rules say (``activation_batch``, ``activation_heads``,
``activation_kv_heads``), and so is the query length (``activation_length``, sequence parallelism):
then each device attends its query slice to the whole gathered K/V, which the metadata supports
because it carries each token's logical index. Axes that do not divide a dimension are left
unsharded. The rules are flax's current ``nn.logical_axis_rules`` or, if none are set, the project
table (bagel_jax/parallel/rules.py).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bagel_jax.attention.mask import MaskMeta
from bagel_jax.parallel.rules import as_mesh_axes

LOGICAL = dict(
    batch="activation_batch", length="activation_length", heads="activation_heads", kv_heads="activation_kv_heads"
)


def _rules():
    rules = tuple(nn.get_logical_axis_rules())
    if not rules:
        from bagel_jax.parallel.rules import LOGICAL_AXIS_RULES

        rules = LOGICAL_AXIS_RULES
    return dict(rules)


def _mesh_axes(mesh, rules, logical: str, dim: int) -> tuple[str, ...]:
    """Mesh axes (present, size > 1) that ``logical`` maps to, kept while their product divides ``dim``."""
    axes = rules.get(logical)
    axes = as_mesh_axes(axes)
    kept, size = [], 1
    for a in axes:
        n = mesh.shape.get(a, 1)
        if n > 1 and dim % (size * n) == 0:
            kept.append(a)
            size *= n
    return tuple(kept)


def _spec_axis(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def shard_attention(fn, q, k, v, q_meta: MaskMeta, kv_meta: MaskMeta | None = None, *, mesh=None, **kwargs):
    """``fn(q, k, v, q_meta, kv_meta, **kwargs)`` per device under shard_map; a plain call without a mesh.

    Args:
      fn: an attention implementation with the ``reference_attention`` signature.
      q [B, Lq, Hq, hd], k/v [B, Lkv, Hkv, hd], q_meta/kv_meta: as ``reference_attention``.
      mesh: a Mesh / AbstractMesh; default the context mesh (``jax.sharding.get_abstract_mesh()``).
    """
    kv_meta = q_meta if kv_meta is None else kv_meta
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(q, k, v, q_meta, kv_meta, **kwargs)
    rules = _rules()
    bsz, lq, hq, _ = q.shape
    hkv = k.shape[2]
    batch = _mesh_axes(mesh, rules, LOGICAL["batch"], bsz)
    heads = tuple(a for a in _mesh_axes(mesh, rules, LOGICAL["heads"], hq) if a not in batch)
    length = tuple(a for a in _mesh_axes(mesh, rules, LOGICAL["length"], lq) if a not in batch + heads)
    n_heads = math.prod(mesh.shape[a] for a in heads)
    if hkv % n_heads:  # repeat kv heads so each head shard holds whole groups
        repeat = n_heads // math.gcd(hkv, n_heads)
        if (hq // hkv) % repeat:
            raise ValueError(
                f"attention: {hq} q / {hkv} kv heads cannot be split over {n_heads} head shards (mesh axes {heads})"
            )
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    b_ax, h_ax, l_ax = _spec_axis(batch), _spec_axis(heads), _spec_axis(length)
    q_spec, kv_spec = P(b_ax, l_ax, h_ax, None), P(b_ax, None, h_ax, None)
    q_meta_spec = MaskMeta(*(P(b_ax, l_ax),) * 4)
    kv_meta_spec = MaskMeta(*(P(b_ax, None),) * 4)

    def local(q, k, v, q_meta, kv_meta):
        return fn(q, k, v, q_meta, kv_meta, **kwargs)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, q_meta_spec, kv_meta_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, q_meta, kv_meta)
