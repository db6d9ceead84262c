"""One step's parameter update: optimizer, EMA and the non-finite guard (``train.update_impl``).

``optax_update`` (the oracle): ``optim.make_optimizer``'s transformation (global-norm clip, ``optax.adamw``,
per-module lr factors), ``optax.apply_updates``, the EMA, then ``where(ok, new, old)`` over params, optimizer state
and EMA, which drops a non-finite step. ``fused_update`` (the default): the same operations in the same order on
each leaf, written as one elementwise expression per parameter. Equal to rounding, not bit for bit: XLA:CPU
contracts some multiply-adds into FMAs in one program's fusions and not the other's (~1 ulp a step;
``tests/test_update.py``). The optimizer state keeps ``optax``'s tree (checkpoints do not change).

Why: written as optax's chain, XLA:CPU materialises each stage (the clipped gradient, the new moments, the update)
and then selects old against new in separate passes; the selects read buffers the updates overwrite in place, so it
also copies every param and moment at the start of the step. Here the guard is applied to the moments before the
update reads them, and every output is written once, in place: at 512×8 (64M trainable f32 params) the update takes
0.15 s against 0.31 s (torch's ``clip_grad_norm_`` + ``AdamW.step`` + EMA: 0.29 s), DESIGN_NOTES 65.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bagel_jax.convert import param_subtree
from bagel_jax.train.optim import lr_factors, module_lr_factor, param_path
from bagel_jax.train.state import ema_update

_NODES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def _is_node(x) -> bool:
    return isinstance(x, _NODES)


def _adam_and_schedule(opt_state: Any) -> tuple[optax.ScaleByAdamState, optax.ScaleByScheduleState]:
    """The one ``ScaleByAdamState`` and the one ``ScaleByScheduleState`` in ``make_optimizer``'s state."""
    nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_node) if _is_node(x)]
    adam = [x for x in nodes if isinstance(x, optax.ScaleByAdamState)]
    sched = [x for x in nodes if isinstance(x, optax.ScaleByScheduleState)]
    if len(adam) != 1 or len(sched) != 1:
        raise ValueError(
            f"fused_update expects make_optimizer's state (one Adam and one schedule state), found {len(adam)} "
            f"and {len(sched)}; use train.update_impl='optax'"
        )
    return adam[0], sched[0]


def fused_update(
    train_cfg,
    schedule: optax.Schedule,
    params: Any,
    grads: Any,
    opt_state: Any,
    ema: Any,
    mask_leaves: list[bool],
    ok: jax.Array,
    ema_decay: float,
) -> tuple[Any, Any, Any]:
    """``(params, opt_state, ema)`` after one step; all three unchanged where ``ok`` (bool scalar) is False.

    params / grads: the param tree (f32 leaves); opt_state: ``make_optimizer(train_cfg, ...)``'s state; ema: the
    trainable leaves' subtree (``state.ema_params``, same leaf order as the trainable params); mask_leaves: the
    trainable mask's leaves. Frozen leaves pass through (no update, no state).
    """
    b1, b2, eps, eps_root = float(train_cfg.beta1), float(train_cfg.beta2), float(train_cfg.eps), 0.0
    max_norm, wd = float(train_cfg.max_grad_norm), float(train_cfg.weight_decay)
    factors = lr_factors(train_cfg)
    adam, sched = _adam_and_schedule(opt_state)

    with_paths = jax.tree_util.tree_leaves_with_path(params)
    p_leaves = [p for (_, p), keep in zip(with_paths, mask_leaves, strict=True) if keep]
    paths = [param_path(path) for (path, _), keep in zip(with_paths, mask_leaves, strict=True) if keep]
    g_leaves = [g for g, keep in zip(jax.tree.leaves(grads), mask_leaves, strict=True) if keep]
    mu_leaves, nu_leaves, e_leaves = jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), jax.tree.leaves(ema)
    if not len(p_leaves) == len(mu_leaves) == len(nu_leaves) == len(e_leaves):
        raise ValueError(
            f"fused_update: {len(p_leaves)} trainable params, {len(mu_leaves)} / {len(nu_leaves)} moments and "
            f"{len(e_leaves)} EMA leaves"
        )

    # optax.clip_by_global_norm, optax.scale_by_adam's bias corrections, optax.scale_by_learning_rate
    g_norm = optax.tree.norm(g_leaves)
    trigger = jnp.squeeze(g_norm < max_norm)
    count_inc = optax.safe_increment(adam.count)
    bc1, bc2 = 1 - b1**count_inc, 1 - b2**count_inc
    step_size = -1 * schedule(sched.count)

    def one(p, g, m, v, e, path):
        if max_norm > 0:
            g = jax.lax.select(trigger, g, (g / g_norm.astype(g.dtype)) * max_norm)
        m_new = jnp.where(ok, (1 - b1) * g + b1 * m, m)
        v_new = jnp.where(ok, ((1 - b2) * g**2 + b2 * v).astype(v.dtype), v)
        u = (m_new / bc1.astype(m_new.dtype)) / (jnp.sqrt(v_new / bc2.astype(v_new.dtype) + eps_root) + eps)
        if wd != 0.0:
            u = u + wd * p
        u = jnp.array(step_size, dtype=u.dtype) * u
        if factors:
            u = u * jnp.asarray(module_lr_factor(path, factors), u.dtype)
        p_new = jnp.where(ok, jnp.asarray(p + u).astype(p.dtype), p)
        e_new = jnp.where(ok, (ema_decay * e + (1.0 - ema_decay) * p_new).astype(e.dtype), e)
        return p_new, m_new, v_new, e_new

    out = [one(*args) for args in zip(p_leaves, g_leaves, mu_leaves, nu_leaves, e_leaves, paths, strict=True)]
    new_p, new_mu, new_nu, new_e = ([o[i] for o in out] for i in range(4))

    it = iter(new_p)
    params_out = jax.tree.unflatten(
        jax.tree.structure(params), [next(it) if keep else p for (_, p), keep in zip(with_paths, mask_leaves)]
    )
    new_adam = optax.ScaleByAdamState(
        count=jnp.where(ok, count_inc, adam.count),
        mu=jax.tree.unflatten(jax.tree.structure(adam.mu), new_mu),
        nu=jax.tree.unflatten(jax.tree.structure(adam.nu), new_nu),
    )
    new_sched = optax.ScaleByScheduleState(count=jnp.where(ok, optax.safe_increment(sched.count), sched.count))

    def swap(x):
        if isinstance(x, optax.ScaleByAdamState):
            return new_adam
        return new_sched if isinstance(x, optax.ScaleByScheduleState) else x

    opt_out = jax.tree.map(swap, opt_state, is_leaf=_is_node)
    return params_out, opt_out, jax.tree.unflatten(jax.tree.structure(ema), new_e)


def optax_update(
    optimizer: optax.GradientTransformation,
    params: Any,
    grads: Any,
    opt_state: Any,
    ema: Any,
    mask_leaves: list[bool],
    ok: jax.Array,
    ema_decay: float,
) -> tuple[Any, Any, Any]:
    """``fused_update``'s oracle: ``optimizer.update``, ``apply_updates``, the EMA, then old-vs-new selects."""
    updates, new_opt = optimizer.update(grads, opt_state, params)
    updated = jax.tree.leaves(optax.apply_updates(params, updates))
    new_params = jax.tree.unflatten(  # frozen leaves are passed through (no add of a zero update, no copy)
        jax.tree.structure(params),
        [u if keep else p for u, p, keep in zip(updated, jax.tree.leaves(params), mask_leaves, strict=True)],
    )
    new_ema = ema_update(ema, param_subtree.like(new_params, ema), ema_decay)  # trainable leaves

    def where_ok(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    return where_ok(new_params, params), where_ok(new_opt, opt_state), where_ok(new_ema, ema)
