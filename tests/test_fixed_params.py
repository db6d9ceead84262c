"""Frozen params held once (train/state.py, convert/fixed_params.py): the frozen VAE and the sin-cos tables have no
optimizer state, no EMA and no bytes in a checkpoint; the EMA holds the trainable leaves only; a resume rebuilds the
fixed leaves bitwise; the tables get no AdamW update, weight decay included. Tiny BAGEL (configs/tiny.py), 1 device."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as T
from bagel_jax.convert import param_subtree
from bagel_jax.convert.fixed_params import fixed_mask, fixed_part
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.model.embeddings import sincos_2d_table
from bagel_jax.parallel.mesh import logical_rules, make_mesh
from bagel_jax.train.checkpoint import Checkpointer, restore_or_init
from bagel_jax.train.optim import make_optimizer

FIXED_KEYS = ("vae", "latent_pos_embed", "vit_pos_embed")


def _bytes(tree) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _start(config, workdir: str):
    """``restore_or_init`` in ``workdir`` (a fresh state, or the checkpoint's) as the trainer calls it."""
    _, init_fn = make_init_fn(config)
    mesh, rules = make_mesh(config, jax.devices()[:1]), logical_rules(config)
    tx, _ = make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    ckpt = Checkpointer(workdir, async_save=False)
    state, _, _ = restore_or_init(ckpt, init_fn, tx, mesh, rules, jax.random.PRNGKey(config.train.seed), config)
    return state, ckpt, tx


@functools.cache
def _saved(workdir: str):
    config = T.tiny_config()
    config.parallel.update(dict(data=1, fsdp=1, tensor=1))
    state, ckpt, tx = _start(config, workdir)
    ckpt.save(1, state)
    ckpt.close()
    resumed, ckpt2, _ = _start(config, workdir)
    ckpt2.close()
    return config, jax.device_get(state), jax.device_get(resumed), tx


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _saved(str(tmp_path_factory.mktemp("fixed")))


def test_fixed_params_are_held_once_outside_optimizer_ema_and_checkpoint(saved, tmp_path_factory):
    config, state, _, _ = saved
    params = state.params
    fixed = fixed_part(params)
    assert sorted(fixed) == sorted(FIXED_KEYS) and all(k in params for k in FIXED_KEYS)
    assert not any(k in state.ema_params for k in FIXED_KEYS)
    trainable = _bytes(state.ema_params)
    assert trainable == _bytes(params) - _bytes(fixed)  # tiny trains every other leaf
    float_opt = [x for x in jax.tree.leaves(state.opt_state) if np.asarray(x).dtype == np.float32]
    assert sum(int(np.asarray(x).nbytes) for x in float_opt) == 2 * trainable  # AdamW mu, nu: trainable leaves only
    # the checkpoint: one step dir, its state item holds params less the fixed ones, the EMA and the moments
    workdir = [p for p in tmp_path_factory.getbasetemp().glob("fixed*")][0]
    on_disk = _dir_bytes(os.path.join(workdir, "checkpoints", "1", "state"))
    import orbax.checkpoint as ocp

    # the same state in the old layout (fixed leaves in params, a full EMA) for comparison
    old_dir = os.path.join(tmp_path_factory.mktemp("old_layout"), "state")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(old_dir, state.replace(ema_params=state.ema_full_params()))
    before = _dir_bytes(old_dir)
    print(
        f"\ncheckpoint state: {on_disk} B on disk (before this change: {before} B); fixed params {_bytes(fixed)} B, "
        f"held once in params and not written (before: twice, params and EMA)"
    )
    assert on_disk < before - _bytes(fixed)  # at least one of the two copies gone (incompressible random VAE)

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(workdir, "checkpoints", "1", "state"))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    assert not any(k in tree["params"] or k in tree["ema_params"] for k in FIXED_KEYS)


def test_resume_rebuilds_the_fixed_params_bitwise(saved):
    _, state, resumed, _ = saved
    for name in ("params", "ema_params", "opt_state", "rng", "step"):
        a, b = getattr(state, name), getattr(resumed, name)
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_tables_are_the_sincos_constants_and_get_no_update_even_with_weight_decay(saved):
    config, state, _, _ = saved
    cfg = config.model
    d = cfg.hidden_size
    np.testing.assert_array_equal(
        state.params["latent_pos_embed"]["pos_embed"], sincos_2d_table(d, cfg.max_latent_size)
    )
    train = config.train.copy_and_resolve_references()
    train.update(weight_decay=0.1, warmup_steps=0, lr=1e-2)
    tx, _ = make_optimizer(train, state.params)
    params = jax.tree.map(jnp.asarray, state.params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    mask = jax.tree.leaves(fixed_mask(params))
    moved = [bool(np.any(np.asarray(u) != 0)) for u in jax.tree.leaves(updates)]
    assert not any(m for m, f in zip(moved, mask, strict=True) if f)  # the VAE and tables: zero update
    assert any(m for m, f in zip(moved, mask, strict=True) if not f)  # weight decay does move trained leaves


def test_ema_full_params_completes_the_ema_with_the_frozen_leaves(saved):
    _, state, _, _ = saved
    full = state.ema_full_params()
    assert jax.tree.structure(full) == jax.tree.structure(state.params)
    for key in FIXED_KEYS:
        jax.tree.map(np.testing.assert_array_equal, full[key], state.params[key])
    assert param_subtree.missing(state.params, full) == []
