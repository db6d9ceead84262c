"""The loop shared by the pretraining stages that make BAGEL's frozen/initial towers at tiny scale (the VAE stage,
``vae_train.py``; the ViT stage, ``vit_train.py``): the trainer's conventions without the BAGEL model.

    mesh + logical rules → sharded TrainState (resumed from DIR/checkpoints) → grain iterator (its state in the
    checkpoints) → jitted ``make_train_step`` → MetricsLogger (TensorBoard + DIR/metrics.jsonl) → periodic evals
    → async Orbax checkpoints (SIGTERM saves and exits) → a final eval and the stage's export on process 0.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax

from bagel_jax.parallel.mesh import logical_rules, make_mesh, shard_batch
from bagel_jax.train.checkpoint import Checkpointer, restore_or_init
from bagel_jax.train.metrics import MetricsLogger
from bagel_jax.train.optim import make_optimizer, trainable_mask
from bagel_jax.train.step import check_finite, make_train_step


def run_stage(config, workdir: str, *, init_fn: Callable, loss_fn: Callable, make_data: Callable,
              evaluate: Callable | None, export: Callable, every: int, what: str,
              devices=None) -> dict[str, Any]:
    """Trains ``init_fn``'s params with ``loss_fn`` to ``train.steps`` (or SIGTERM), then evaluates and exports.

    Args:
      config: a validated config (the stage's own validation is the caller's).
      init_fn: ``rng -> params`` (boxed with logical names); loss_fn: ``(params, batch, rng) -> (loss, aux)``.
      make_data: ``(process_index, process_count) -> grain iterator`` of host batches (``get_state`` /
        ``set_state``).
      evaluate: ``(step, state, logger) -> {name: value}`` on process 0 (writes its own summaries), or None.
      export: ``(state, result, run_seconds, logger) -> dict`` on process 0 after the final eval; its dict joins the
        result.
      every: steps between evals (0 = only at the end); what: the stage's name in logs.

    Returns:
      the last logged training scalars, the final eval and the export's entries (an early SIGTERM stop returns
      the last scalars only).
    """
    t0 = time.perf_counter()
    devices = jax.devices() if devices is None else list(devices)
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    abstract_params = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    optimizer, schedule = make_optimizer(config.train, abstract_params)
    ckpt = Checkpointer.from_config(workdir, config, handle_sigterm=True)
    state, shardings, data_state = restore_or_init(ckpt, init_fn, optimizer, mesh, rules,
                                                   jax.random.PRNGKey(config.train.seed), config)
    train_step = make_train_step(loss_fn, optimizer, schedule, config, mesh=mesh, rules=rules,
                                 state_shardings=shardings, trainable=trainable_mask(abstract_params, ()))
    data = make_data(jax.process_index(), jax.process_count())
    if data_state is not None:
        data.set_state(data_state)
    lead = jax.process_index() == 0
    logger = MetricsLogger(workdir, config, num_devices=len(devices))

    def run_eval(step: int) -> dict[str, float]:
        return evaluate(step, state, logger) if lead and evaluate is not None else {}

    start, nonfinite, last = int(state.step), int(state.nonfinite_steps), {}
    logging.info("%s %s from step %d to %d on mesh %s", what, config.name, start, config.train.steps, dict(mesh.shape))
    for step in range(start + 1, config.train.steps + 1):
        state, metrics = train_step(state, shard_batch(next(data), mesh, rules))
        scalars = logger.step(step, metrics)
        if scalars is not None:
            last = scalars
            nonfinite = check_finite(scalars, config, nonfinite)
        final = step == config.train.steps
        if every and step % every == 0 and not final:
            run_eval(step)
        stop = ckpt.stop_requested(step)
        if final or stop or step % config.train.checkpoint_every == 0:
            ckpt.save(step, state, data.get_state())
        if stop and not final:
            logging.warning("stop requested (SIGTERM): saved step %d, exiting", step)
            ckpt.close()
            logger.close()
            return last
    result = {**last, **run_eval(int(state.step))}
    if lead:
        result.update(export(state, result, time.perf_counter() - t0, logger))
    logger.close()
    ckpt.close()
    return result


def prepare_workdir(config, workdir: str, build_data: bool = True) -> None:
    """Creates ``workdir``, builds the synthetic data there when the config asks (``build_data``) and writes the
    resolved config.json."""
    from bagel_jax.train.train import prepare_data, write_config
    os.makedirs(workdir, exist_ok=True)
    if build_data:
        prepare_data(config, workdir)
    write_config(config, workdir)
