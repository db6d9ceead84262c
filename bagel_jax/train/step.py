"""The jitted train step, generic in the loss.

``loss_fn(params, batch, rng) -> (loss, aux)``: ``loss`` a f32 scalar (already normalised over the
batch it sees); ``aux`` a flat dict of f32 scalars that are *additive over rows* — per-loss sums and
counts named ``<name>_sum`` / ``<name>_count`` (e.g. ``ce_sum``, ``ce_count``). The step reports each pair's
mean as ``<name>`` (the exact token mean over the global batch, also under gradient accumulation).

Gradient accumulation (``train.grad_accum_steps`` = k > 1) splits the global batch into k microbatches
(microbatch i holds rows i, i+k, ...; every device keeps its own rows). With ``loss_counts`` (``batch -> {name:
count}``, the normalisers of the loss terms from the batch alone) the step first counts the *whole* global batch
(under jit a sum over every data-parallel shard), then each microbatch's loss is ``Σ w·sum_mb / count_global``
(``loss_fn(..., counts=...)``) and the step adds losses and gradients: loss, gradient and update equal one step
on the whole batch, whatever each microbatch holds (MaxText's normalisation by the global weight; packed
microbatches always differ in label and noised tokens). Without ``loss_counts`` the microbatch losses are
averaged (the reference's ``loss / gradient_accumulation_steps``), exact only for equal counts per microbatch.

A step whose gradient norm or loss is NaN/inf is not applied: params, optimizer state and EMA stay, the
step counter advances (the batch is consumed), ``nonfinite_steps`` counts it, metrics carry
``nonfinite=1``. What the run then does (skip, halt, roll back) is the loop's ``train/nonfinite.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax import xla_cpu
from bagel_jax.config import ConfigError
from bagel_jax.parallel.mesh import batch_shards, batch_spec, use_mesh
from bagel_jax.train.optim import trainable_global_norm, update_impl
from bagel_jax.train.state import TrainState
from bagel_jax.train.update import fused_update, optax_update

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (params, batch, rng[, counts=]) -> (loss, aux)
CountsFn = Callable[[Any], dict[str, jax.Array]]  # batch -> {term: f32 normaliser}, additive over rows


def check_accumulation(config, mesh: Mesh, rules) -> int:
    """Validates ``train.grad_accum_steps`` against the batch and mesh; returns k."""
    k, shards, rows = config.train.grad_accum_steps, batch_shards(mesh, rules), config.data.batch_size
    if k < 1 or rows % (shards * k):
        raise ConfigError(
            f"train.grad_accum_steps: {k} microbatches × {shards} batch shards do not divide data.batch_size={rows}"
        )
    return k


def loss_means(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``<name>`` = ``<name>_sum / max(<name>_count, 1)`` for every sum/count pair in ``aux``."""
    out = {}
    for key in aux:
        if key.endswith("_sum") and key[:-4] + "_count" in aux:
            name = key[:-4]
            out[name] = aux[key] / jnp.maximum(aux[name + "_count"], 1.0)
    return out


def _microbatches(batch: Any, k: int, mesh: Mesh, rules) -> Any:
    """[B, ...] -> [k, B/k, ...] with microbatch i = rows i, i+k, ... (no data moves between devices)."""
    spec = batch_spec(rules)
    sharding = NamedSharding(mesh, P(None, *spec))

    def split(x):
        y = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, sharding)

    return jax.tree.map(split, batch)


def _accumulated_grads(
    loss_fn: LossFn,
    params,
    batch,
    rng,
    k: int,
    mesh: Mesh,
    rules,
    param_shardings,
    mask_leaves: list[bool],
    loss_counts: CountsFn | None = None,
):
    """(loss, aux, grads): gradients are taken w.r.t. the trainable leaves only (``mask_leaves``, in
    ``jax.tree.leaves(params)`` order), so frozen params (a LoRA base, ``train.freeze``) get no gradient
    computation and no accumulation buffer; their entries in ``grads`` are zeros the optimizer never reads.
    With ``loss_counts`` and k > 1 every microbatch is normalised by the whole batch's counts and the
    microbatch losses and gradients are summed (the module docstring)."""
    leaves, treedef = jax.tree.flatten(params)
    idx = [i for i, keep in enumerate(mask_leaves) if keep]

    counts = loss_counts(batch) if (loss_counts is not None and k > 1) else None

    def loss_of_trainable(train_leaves, mb, key):
        full = list(leaves)
        for i, x in zip(idx, train_leaves, strict=True):
            full[i] = x
        if counts is None:
            return loss_fn(jax.tree.unflatten(treedef, full), mb, key)
        return loss_fn(jax.tree.unflatten(treedef, full), mb, key, counts=counts)

    def full_grads(train_grads):
        full = [jnp.zeros(x.shape, x.dtype) for x in leaves]
        for i, g in zip(idx, train_grads, strict=True):
            full[i] = g
        return jax.tree.unflatten(treedef, full)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
    train = [leaves[i] for i in idx]
    if k == 1:
        (loss, aux), grads = grad_fn(train, batch, rng)
        return loss, aux, full_grads(grads)
    micro = _microbatches(batch, k, mesh, rules)
    first = jax.tree.map(lambda x: x[0], micro)
    _, aux_shape = jax.eval_shape(loss_fn, params, first, rng)
    shardings = jax.tree.leaves(param_shardings)
    zeros = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
        [jax.lax.with_sharding_constraint(jnp.zeros_like(leaves[i]), shardings[i]) for i in idx],
    )

    def body(carry, xs):
        mb, i = xs
        (loss, aux), grads = grad_fn(train, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    if counts is not None:  # each microbatch already holds its share of the whole batch's mean
        return loss, aux, full_grads(grads)
    return loss / k, aux, full_grads([g / k for g in grads])


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config,
    *,
    mesh: Mesh,
    rules,
    state_shardings: TrainState,
    trainable: Any,
    batch_metrics_fn: Callable[[Any], dict[str, jax.Array]] | None = None,
    loss_counts: CountsFn | None = None,
    donate: bool = True,
) -> TrainStep:
    """A ``TrainStep``: ``(state, batch) -> (state, metrics)``, jitted with explicit shardings.

    trainable: bool tree (``optim.trainable_mask``); the gradient and its norm cover trainable leaves only; the EMA
    updates the leaves ``state.ema_params`` holds (the trainable ones, ``state.py``); frozen and fixed leaves pass
    through the step untouched.
    batch_metrics_fn: optional ``batch -> {name: scalar}`` added to metrics (e.g. ``metrics.packing_stats``).
    loss_counts: optional ``batch -> {term: count}``; with it, accumulation equals one step on the whole batch.
    metrics: loss, grad_norm (before clipping), lr (used by this update), nonfinite (0/1), nonfinite_steps,
    every aux entry (summed over microbatches) and every ``<name>`` mean.
    """
    k = check_accumulation(config, mesh, rules)
    decay = float(config.train.ema_decay)
    mask_leaves = jax.tree.leaves(trainable)
    if update_impl(config, mesh.devices.size) == "fused":  # one elementwise pass per leaf, guard included
        apply_update = functools.partial(fused_update, config.train, schedule)
    else:  # the oracle: optax's chain, apply_updates, EMA, then old-vs-new selects (train/update.py)
        apply_update = functools.partial(optax_update, optimizer)

    def step_fn(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, aux, grads = _accumulated_grads(
            loss_fn, state.params, batch, rng, k, mesh, rules, state_shardings.params, mask_leaves, loss_counts
        )
        grad_norm = trainable_global_norm(grads, trainable)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        params, opt_state, ema = apply_update(
            state.params, grads, state.opt_state, state.ema_params, mask_leaves, ok, decay
        )
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            nonfinite_steps=state.nonfinite_steps + bad,
        )
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            lr=schedule(state.step - state.nonfinite_steps),
            nonfinite=bad,
            nonfinite_steps=new_state.nonfinite_steps,
            **aux,
            **loss_means(aux),
        )
        if batch_metrics_fn is not None:
            metrics.update(batch_metrics_fn(batch))
        return new_state, metrics

    return TrainStep(step_fn, mesh, rules, state_shardings, donate)


class TrainStep:
    """Callable jitted step; ``lower(abstract_state, abstract_batch)`` for AOT compilation."""

    def __init__(self, step_fn, mesh: Mesh, rules, state_shardings: TrainState, donate: bool):
        self.mesh, self.rules = mesh, rules
        batch_sharding = NamedSharding(mesh, batch_spec(rules))
        self.jitted = xla_cpu.jit(
            step_fn,
            platform=mesh.devices.flat[0].platform,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, NamedSharding(mesh, P())),
            donate_argnums=(0,) if donate else (),
        )

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with use_mesh(self.mesh, self.rules):
            return self.jitted(state, batch)

    def lower(self, state, batch):
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(state, batch)
