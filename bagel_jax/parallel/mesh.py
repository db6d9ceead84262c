"""Device mesh from ``config.parallel`` and the sharding helpers built on it.

Mesh axes are ``("data", "fsdp", "tensor", "sequence")`` (``rules.MESH_AXES``), all of type Auto so that
flax's logical constraints apply under ``jax.set_mesh``. ``parallel.{data,fsdp,tensor,sequence}`` are the
*total* sizes (one may be -1: it fills the remaining devices); ``parallel.dcn_data`` / ``dcn_fsdp`` say how
many slices (DCN granules) the data / fsdp axes span on a multi-slice pod; they must divide ``data`` / ``fsdp``.

Typical use::

    mesh = make_mesh(config)                       # validates against jax.devices(), one-line ConfigError
    rules = logical_rules(config)
    with use_mesh(mesh, rules):                    # jax.set_mesh + flax logical rules
        ...
    global_batch = shard_batch(host_batch, mesh, rules)   # per-host numpy -> global jax.Array
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax.config import ConfigError, check_devices
from bagel_jax.parallel.rules import MESH_AXES, as_mesh_axes, axis_rules

BATCH_AXIS = "activation_batch"  # logical name of the leading (row) dim of every batch array


def mesh_sizes(config, num_devices: int) -> dict[str, int]:
    """{axis: size} with -1 resolved; raises ``ConfigError`` if the mesh or batch does not fit the devices."""
    return dict(zip(MESH_AXES, check_devices(config, num_devices)))


def _dcn_sizes(config, sizes: dict[str, int]) -> tuple[int, ...]:
    p = config.parallel
    dcn = {"data": p.dcn_data, "fsdp": p.dcn_fsdp, "tensor": 1, "sequence": 1}
    for axis in ("data", "fsdp"):
        if dcn[axis] < 1 or sizes[axis] % dcn[axis]:
            raise ConfigError(f"parallel.dcn_{axis}: {dcn[axis]} must be >= 1 and divide parallel.{axis}={sizes[axis]}")
    return tuple(dcn[a] for a in MESH_AXES)


def make_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default ``jax.devices()``) shaped by ``config.parallel``; Auto axis types.

    Single slice: ``mesh_utils.create_device_mesh`` (topology-aware on TPU). Multi-slice (``dcn_* > 1``):
    ``create_hybrid_device_mesh`` with per-slice (ICI) sizes ``size // dcn`` and DCN sizes ``dcn``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(config, len(devices))
    dcn = _dcn_sizes(config, sizes)
    shape = tuple(sizes[a] for a in MESH_AXES)
    num_slices = int(np.prod(dcn))
    if num_slices > 1:
        found = len({getattr(d, "slice_index", 0) for d in devices})
        if found != num_slices:
            raise ConfigError(
                f"parallel.dcn_data: dcn_data×dcn_fsdp = {num_slices} slices, but the devices span {found}"
            )
        ici = tuple(s // k for s, k in zip(shape, dcn))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules with ``config.parallel.rules_override`` applied."""
    overrides = dict(config.parallel.rules_override) if config.parallel.rules_override else None
    try:
        return axis_rules(overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
    """``jax.set_mesh(mesh)`` + ``nn.logical_axis_rules(rules)``: the context every trace of the model needs."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(tree: Any, mesh: Mesh, rules) -> Any:
    """``NamedSharding`` tree for ``tree`` (values or ShapeDtypeStructs, possibly ``nn.LogicallyPartitioned``).

    Boxed leaves map through ``rules``; unboxed array leaves are replicated. The result has the *unboxed*
    structure (one sharding per array).
    """
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_spec(rules) -> P:
    """PartitionSpec of a batch array: rows over the mesh axes ``activation_batch`` maps to, rest replicated."""
    return nn.logical_to_mesh_axes((BATCH_AXIS,), rules)


def batch_shardings(batch: Any, mesh: Mesh, rules) -> Any:
    """One ``NamedSharding`` per batch leaf (same for all: leading dim over the batch mesh axes)."""
    sharding = NamedSharding(mesh, batch_spec(rules))
    return jax.tree.map(lambda _: sharding, batch)


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch (row) dim is split."""
    axes = batch_spec(rules)[0]
    axes = as_mesh_axes(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def host_batch_size(config) -> int:
    """Rows each host's pipeline produces per step (``data.batch_size`` is global)."""
    n = jax.process_count()
    if config.data.batch_size % n:
        raise ConfigError(f"data.batch_size: {config.data.batch_size} not divisible by {n} hosts")
    return config.data.batch_size // n


def shard_batch(host_batch: Any, mesh: Mesh, rules) -> Any:
    """Per-host numpy batch (pytree, leading dim = this host's rows) -> global ``jax.Array`` pytree.

    Each host passes only its own rows; the global batch is their concatenation along dim 0. On one host the local
    rows are the global batch: one ``device_put`` of the whole tree (one batched transfer; half the host time of a
    per-leaf ``make_array_from_process_local_data``, which a step waits for when it is not dispatched ahead).
    """
    sharding = NamedSharding(mesh, batch_spec(rules))
    n_proc = jax.process_count()
    if n_proc == 1:
        return jax.device_put(jax.tree.map(np.asarray, host_batch), sharding)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])

    return jax.tree.map(put, host_batch)


def abstract_batch(global_batch: Any, mesh: Mesh, rules) -> Any:
    """``ShapeDtypeStruct``s with the batch sharding for a pytree of arrays/structs with *global* shapes."""
    sharding = NamedSharding(mesh, batch_spec(rules))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), global_batch)
