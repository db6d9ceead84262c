"""TrainState and its sharded creation; EMA update.

The state is created *already sharded*: ``jax.eval_shape(init)`` gives the boxed (logically named)
abstract params, the logical rules turn their names into ``NamedSharding``s (optimizer state and EMA
inherit the params' names through optax's tree maps), and ``jax.jit(init, out_shardings=...)`` writes
every shard on its own device. No device or host ever holds a full copy of params, optimizer or EMA.

What is held where: ``params`` holds every leaf once (trainable, frozen and fixed); ``opt_state`` holds state for the
trainable leaves only (``optim.make_optimizer``); ``ema_params`` is the EMA of the trainable leaves only (a
``param_subtree`` part: the params' keys, frozen leaves absent; ``ema_full_params`` completes it with the frozen
ones for evals, samples and exports). A checkpoint stores ``checkpoint_view(state)``: the state without the *fixed*
leaves (``convert.fixed_params``: the frozen VAE, the sin-cos tables), which a resume rebuilds from the config.

Init runs *outside* ``jax.set_mesh``: the out_shardings alone place the params, and flax's
``DenseGeneral`` cannot initialise a logically partitioned multi-dim kernel under a mesh (it constrains
the flat kernel with the N-d names). Activation constraints inside ``init`` are therefore no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax.config import ConfigError
from bagel_jax.convert import param_subtree
from bagel_jax.convert.fixed_params import fixed_mask
from bagel_jax.model.init_key import split_init_key
from bagel_jax.parallel.mesh import logical_shardings
from bagel_jax.train.optim import trainable_mask

InitFn = Callable[[jax.Array], Any]  # rng -> params (leaves may be nn.LogicallyPartitioned)


@struct.dataclass
class TrainState:
    """step: int32[] steps taken (= batches consumed); params: the f32 param tree (every leaf, once);
    ema_params: the EMA of the trainable leaves only (a ``param_subtree`` part of ``params``);
    opt_state: optax state (trainable leaves only); rng: uint32[2] base key (the step's key is
    ``fold_in(rng, step)``); nonfinite_steps: int32[] steps whose update was dropped for NaN/inf gradients or loss."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    nonfinite_steps: jax.Array

    def ema_full_params(self) -> Any:
        """The full param tree of the EMA model: the EMA's trainable leaves over the frozen leaves of ``params``
        (what samples, evals and exports read)."""
        return param_subtree.merge(self.params, self.ema_params)


def checkpoint_view(state: TrainState) -> TrainState:
    """What a checkpoint stores: ``state`` without the fixed leaves of ``params`` (also for abstract states and
    sharding trees, which have the same nesting)."""
    keep = jax.tree.map(lambda fixed: not fixed, fixed_mask(state.params))
    return state.replace(params=param_subtree.select(state.params, keep))


def with_fixed(stored: TrainState, fixed: Any) -> TrainState:
    """A restored ``checkpoint_view`` completed with the ``fixed`` leaves (a part of the params)."""
    return stored.replace(params=param_subtree.merge(stored.params, fixed))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema = decay·ema + (1 − decay)·params`` leafwise (the reference's ``fsdp_ema_update``, no warmup)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def _init_state(
    init_fn: InitFn, optimizer: optax.GradientTransformation, rng: jax.Array, *, boxed: bool, freeze=()
) -> TrainState:
    init_rng, state_rng = split_init_key(rng)
    params = init_fn(init_rng)
    opt_state = optimizer.init(params)
    ema = param_subtree.select(params, trainable_mask(params, freeze))
    if not boxed:
        params, opt_state, ema = nn.meta.unbox(params), nn.meta.unbox(opt_state), nn.meta.unbox(ema)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        rng=state_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def state_shardings(init_fn: InitFn, optimizer: optax.GradientTransformation, mesh: Mesh, rules, freeze=()) -> Any:
    """``TrainState`` of ``NamedSharding``s, from the logical names of the params (no arrays are created).
    ``freeze``: ``train.freeze`` (those modules, like every frozen leaf, get no EMA)."""
    boxed = jax.eval_shape(
        lambda r: _init_state(init_fn, optimizer, r, boxed=True, freeze=freeze), jax.random.PRNGKey(0)
    )
    shardings = logical_shardings(boxed, mesh, rules)
    replicated = NamedSharding(mesh, P())
    return shardings.replace(step=replicated, rng=replicated, nonfinite_steps=replicated)


def abstract_state(
    init_fn: InitFn, optimizer: optax.GradientTransformation, mesh: Mesh, rules, freeze=()
) -> TrainState:
    """``TrainState`` of ``ShapeDtypeStruct``s carrying their shardings (for AOT compile and sharded restore)."""
    shardings = state_shardings(init_fn, optimizer, mesh, rules, freeze)
    shapes = jax.eval_shape(
        lambda r: _init_state(init_fn, optimizer, r, boxed=False, freeze=freeze), jax.random.PRNGKey(0)
    )
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def make_init(
    init_fn: InitFn, optimizer: optax.GradientTransformation, shardings: TrainState, freeze=()
) -> Callable[[jax.Array], TrainState]:
    """Jitted ``rng -> TrainState`` writing every array straight into ``shardings`` (compile once, call many)."""
    return jax.jit(lambda r: _init_state(init_fn, optimizer, r, boxed=False, freeze=freeze), out_shardings=shardings)


def create_train_state(
    init_fn: InitFn, optimizer: optax.GradientTransformation, mesh: Mesh, rules, rng: jax.Array, freeze=()
) -> tuple[TrainState, TrainState]:
    """(state, shardings): a fresh state with every array created on its own shards.

    ``rng``: a ``jax.random.PRNGKey`` (uint32[2]); split into the init key and the state's base key.
    """
    shardings = state_shardings(init_fn, optimizer, mesh, rules, freeze)
    return make_init(init_fn, optimizer, shardings, freeze)(rng), shardings


def num_params(tree: Any) -> int:
    """Total number of scalars in ``tree``."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def with_pretrained(state: TrainState, shardings: TrainState, name: str, loaded: Any, source: str) -> TrainState:
    """``state`` with ``params[name]`` (and the EMA's trainable leaves of it) replaced by ``loaded`` (a host tree with
    the model's structure and shapes, e.g. a pretrained tower from ``bagel_jax.convert``), cast to the state's dtypes
    and placed with its ``shardings``: separate copies, as the train step donates the state. For a fresh run: the
    optimizer state is zeros (or holds nothing for a frozen tower), so it stays valid. ``source`` names the config
    key in errors."""
    params = put_pretrained(state.params, shardings.params, name, loaded, source)
    if name not in state.ema_params:
        return state.replace(params=params)
    ema = put_pretrained(
        state.ema_params, shardings.ema_params, name, param_subtree.like(loaded, state.ema_params[name]), source
    )
    return state.replace(params=params, ema_params=ema)


def put_pretrained(params: Any, shardings: Any, name: str, loaded: Any, source: str) -> Any:
    """``params`` with ``params[name]`` replaced by ``loaded`` cast to its dtypes and placed with ``shardings[name]``
    (checked: same tree and shapes, else a ``ConfigError`` naming ``source``)."""
    current = params[name]
    if jax.tree.structure(loaded) != jax.tree.structure(current):
        raise ConfigError(f"{source}: its {name} param tree differs from the model's")
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(current)):
        if tuple(a.shape) != tuple(b.shape):
            raise ConfigError(
                f"{source}: {name}{jax.tree_util.keystr(kp)} has shape {tuple(a.shape)}, the model has {tuple(b.shape)}"
            )

    placed = jax.tree.map(lambda a, x, s: jax.device_put(np.asarray(a, x.dtype), s), loaded, current, shardings[name])
    return {**params, name: placed}
