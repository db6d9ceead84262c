"""Where inference runs: a device mesh and the logical-axis rules, the same ones training uses.

Params stay on the mesh as training shards them (``parallel/rules.py``): the trainer's in-run samples and evals
pass the train state's sharded EMA as it is, the CLI places the loaded params with ``place_params``. Every
process of a multi-host job makes the same calls on the same host inputs: ``put`` turns them into global arrays
(replicated on the mesh; the model's logical constraints shard the work), the jitted programs run under
``context()`` (``jax.set_mesh`` + the rules), and ``fetch`` brings a result back to every host's numpy (gathering
across processes when a result is spread over hosts). One process alone with no mesh given: one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax.parallel.mesh import logical_rules, logical_shardings, make_mesh, use_mesh
from bagel_jax.parallel.rules import MESH_AXES, axis_rules


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh (axes ``MESH_AXES``) and logical-axis rules."""

    mesh: Mesh
    rules: tuple

    def context(self):
        """The context every inference program is traced and run in."""
        return use_mesh(self.mesh, self.rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def key(self) -> tuple:
        """What a traced program depends on besides its arguments: the mesh's axes and sizes and the rules."""
        return tuple(self.mesh.shape.items()), self.rules

    def put(self, tree: Any) -> Any:
        """Host values (numpy, scalars; the same on every process) → global arrays replicated on the mesh.
        ``jax.Array``s already on this mesh pass through; ``None`` leaves stay."""
        sharding = self.replicated

        def one(x):
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                if x.sharding.device_set == sharding.device_set:
                    return x
                x = np.asarray(x)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree.map(one, tree)

    def fetch(self, tree: Any) -> Any:
        """Global arrays → numpy on every process (an all-gather when a value spans several hosts)."""

        def one(x):
            if x is None or not isinstance(x, jax.Array) or x.is_fully_addressable:
                return None if x is None else np.asarray(x)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def single_device() -> Placement:
    """Everything on the first device (a one-process run without a mesh)."""
    if jax.process_count() > 1:
        raise ValueError("inference in a multi-process job needs a mesh: pass mesh= (or params placed on one)")
    return Placement(Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), MESH_AXES), axis_rules())


def params_mesh(params: Any) -> Mesh | None:
    """The mesh of the first param placed with a ``NamedSharding`` (e.g. the train state's EMA), else None."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not isinstance(leaf, jax.core.Tracer):
            return sharding.mesh
    return None


def placement_for(params: Any, mesh: Mesh | None = None, rules=None) -> Placement:
    """``mesh`` (default: the params' own mesh, else one device) with ``rules`` (default: the project's table)."""
    mesh = mesh if mesh is not None else params_mesh(params)
    if mesh is None:
        return single_device() if rules is None else dataclasses.replace(single_device(), rules=tuple(rules))
    return Placement(mesh, tuple(rules) if rules is not None else axis_rules())


def placement_from_config(config, devices=None) -> Placement:
    """The mesh of ``config.parallel`` over ``devices`` (default all) with its logical rules: where the inference
    CLI and the standalone eval runner place params. Inference buckets its own batches, so training's check that
    ``data.batch_size`` divides the batch shards is not applied. Raises ``ConfigError`` naming ``parallel.*``."""
    devices = list(jax.devices() if devices is None else devices)
    config = config.copy_and_resolve_references()
    config.data.batch_size = len(devices)  # passes training's rows-per-mesh check
    return Placement(make_mesh(config, devices), logical_rules(config))


def place_params(params: Any, init_fn, placement: Placement) -> Any:
    """Host params (unboxed, the tree of ``init_fn``'s output) → arrays sharded on the mesh by the logical rules
    (each leaf placed on its own, so the device never holds a full copy). ``init_fn``: ``rng -> boxed params``."""
    shardings = logical_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), placement.mesh, placement.rules)

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, params, shardings)
