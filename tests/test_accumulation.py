"""Gradient accumulation equals one step on the whole batch (train/step.py): 4 packed rows, one document each, so
the microbatches hold different numbers of label and noised tokens; f32, rtol 1e-5 on loss, gradients and the
updated params. Also on a 2-device data-parallel mesh (the normalisers are the global counts, not a device's).
Slow (tiny BAGEL compiles); the toy model's version, with the biased average as a control, runs by default
(test_optim.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as T
from bagel_jax.parallel.mesh import logical_rules, make_mesh, shard_batch
from bagel_jax.train.losses import bagel_loss_fn, loss_counts
from bagel_jax.train.optim import make_optimizer, trainable_mask
from bagel_jax.train.state import create_train_state
from bagel_jax.train.step import _accumulated_grads, make_train_step


@functools.cache
def _rows():
    """(params, model, batch with its noise, counts per row): 4 rows, one of the four sample kinds in each."""
    _, cfg, params, model = T.tiny_setup()
    lay, b = T.layout(cfg), T.budgets()
    docs = T.documents(T.four_samples(), lay)
    rows = [[d] for d in docs]
    _, noise = T.image_noise(rows, b)
    batch = (T.packed_batch(rows, b), noise)
    per_row = [jax.device_get(loss_counts(jax.tree.map(lambda x: x[i : i + 1], batch[0]))) for i in range(4)]
    return params, model, batch, per_row


def _loss_fn(model):
    def loss_fn(params, batch, rng, counts=None):
        return bagel_loss_fn(model, params, batch[0], rng, counts=counts, noise=batch[1])

    return loss_fn


def _counts(batch):
    return loss_counts(batch[0])


def _setup(k: int, devices):
    params, model, batch, _ = _rows()
    config = T.tiny_config()
    config.data.batch_size = 4
    config.parallel.update(dict(data=len(devices), fsdp=1, tensor=1))
    config.train.update(grad_accum_steps=k, warmup_steps=0, lr=1e-2, eps=1.0, max_grad_norm=0.0)
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    tx, schedule = make_optimizer(config.train, params)
    state, shardings = create_train_state(lambda r: params, tx, mesh, rules, jax.random.PRNGKey(0))
    return config, mesh, rules, tx, schedule, state, shardings, shard_batch(batch, mesh, rules), _loss_fn(model)


def _grads_and_update(k: int, devices, counts=_counts):
    """(loss, aux, grads, updated params) of ``k`` microbatches (one compile: gradients + the AdamW update)."""
    config, mesh, rules, tx, _, state, shardings, batch, loss_fn = _setup(k, devices)
    mask = jax.tree.leaves(trainable_mask(state.params))

    def fn(params, opt_state, b, r):
        loss, aux, grads = _accumulated_grads(loss_fn, params, b, r, k, mesh, rules, shardings.params, mask, counts)
        updates, _ = tx.update(grads, opt_state, params)
        return loss, aux, grads, jax.tree.map(jnp.add, params, updates)

    return jax.device_get(jax.jit(fn)(state.params, state.opt_state, batch, jax.random.PRNGKey(3)))


def _train_step(k: int, devices):
    """(loss, aux, grads=None, updated params) of the trainer's ``make_train_step`` with ``k`` microbatches."""
    config, mesh, rules, tx, schedule, state, shardings, batch, loss_fn = _setup(k, devices)
    step = make_train_step(
        loss_fn,
        tx,
        schedule,
        config,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        trainable=trainable_mask(state.params),
        loss_counts=_counts,
        donate=False,
    )
    new, metrics = step(state, batch)
    return jax.device_get((metrics["loss"], metrics, None, new.params))


def _assert_same(a, b, rtol=1e-5):
    (la, ma, ga, pa), (lb, mb, gb, pb) = a, b
    np.testing.assert_allclose(la, lb, rtol=rtol)
    for key in ("ce_sum", "ce_count", "mse_sum", "mse_count"):
        np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, err_msg=key)
    if ga is not None:
        scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(gb))
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


@functools.cache
def _whole():
    return _grads_and_update(1, jax.devices()[:1])


@pytest.mark.slow
def test_four_microbatches_equal_one_step_on_the_whole_batch():
    """(The fast toy version, with the biased average as a negative control: test_optim.py.)"""
    per_row = _rows()[3]  # the rows (= microbatches) differ in label and noised tokens
    assert len({float(c["ce"]) for c in per_row}) > 2 and len({float(c["mse"]) for c in per_row}) > 2, per_row
    whole = _whole()
    _assert_same(_grads_and_update(4, jax.devices()[:1]), whole)
    counts = jax.device_get(_counts(_rows()[2]))  # the normalisers from the batch alone = the loss terms' counts
    assert float(whole[1]["ce_count"]) == float(counts["ce"]) and float(whole[1]["mse_count"]) == float(counts["mse"])


@pytest.mark.slow
def test_train_step_on_two_data_shards_normalises_by_the_global_counts():
    """The trainer's step, 2 devices × 2 microbatches: each device holds rows of different counts; the
    normalisers sum over both shards (the loss and the updated params equal one step on the whole batch)."""
    _assert_same(_train_step(2, jax.devices()[:2]), _whole())
