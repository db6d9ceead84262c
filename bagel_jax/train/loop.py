"""The one training loop. Every stage — BAGEL (``train.py``), the tiny VAE (``vae_train.py``) and ViT
(``vit_train.py``) stages — supplies a ``Stage`` (its model, loss, data, evals and export) and nothing else:

    mesh + logical rules → sharded TrainState (resumed from DIR/checkpoints, or fresh + the stage's pretrained towers
    / ``train.init_from``) → grain iterator (its state in the checkpoints) → jitted ``make_train_step``
    → metrics (TensorBoard + DIR/metrics.jsonl) → the step's async Orbax checkpoint → the stage's evals
    → at ``train.steps``: the stage's export on process 0.

The checkpoint of a step is written before that step's evals: a failing eval loses no training. Any exception
still finishes the asynchronous checkpoint writes (``finally``). SIGTERM (preemption) saves and exits; the next
start resumes. Every host runs this same program; only process 0 writes logs and exports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from bagel_jax.convert.fixed_params import fixed_part
from bagel_jax.parallel.mesh import logical_rules, make_mesh, shard_batch
from bagel_jax.train.checkpoint import Checkpointer, restore_or_init
from bagel_jax.train.metrics import MetricsLogger
from bagel_jax.train.nonfinite import NonFiniteGuard, load_record, usable_step
from bagel_jax.train.optim import make_optimizer, trainable_mask
from bagel_jax.train.state import TrainState, abstract_state
from bagel_jax.train.step import make_train_step
from bagel_jax.train.workdir import claim, prepare_workdir

Scores = dict[str, Any]


@dataclasses.dataclass
class Stage:
    """What one stage plugs into ``run``.

    name: the stage's name in logs. init_fn: ``rng -> params`` (boxed with logical names).
    loss_fn: ``(params, batch, rng) -> (loss, aux)`` (see ``make_train_step``).
    make_data: ``(process_index, process_count) -> iterator`` of host batches with ``get_state``/``set_state`` (and
      optionally ``metrics()``, logged every ``train.log_every`` steps).
    evaluate: ``(step, state, logger, final) -> scores``, called on every process after the step's checkpoint;
      ``final`` is True at ``train.steps``. It decides itself whether it is due and which process works.
    export: ``(state, result, run_seconds, logger) -> dict`` on process 0 once the state is at ``train.steps``
      (after the final eval); its dict joins the result.
    exported: ``() -> bool``, whether the export is on disk: a finished run started again redoes a lost export.
    fresh_state: ``(state, shardings) -> state`` applied to a fresh (not resumed) state, e.g. pretrained towers.
    batch_metrics_fn: per-step batch statistics inside the jitted step (see ``make_train_step``).
    loss_counts: ``batch -> {term: count}``, the loss normalisers from the batch alone; with it gradient accumulation
      equals one step on the whole batch (see ``make_train_step``).
    """

    name: str
    init_fn: Callable
    loss_fn: Callable
    make_data: Callable[[int, int], Iterator]
    evaluate: Callable[[int, TrainState, MetricsLogger, bool], Scores] | None = None
    export: Callable[[TrainState, Scores, float, MetricsLogger], Scores] | None = None
    exported: Callable[[], bool] | None = None
    fresh_state: Callable[[TrainState, TrainState], TrainState] | None = None
    batch_metrics_fn: Callable | None = None
    loss_counts: Callable | None = None


def every(n: int) -> Callable[[int, bool], bool]:
    """Due-rule of a periodic eval: every ``n`` steps (0: never) and at the final step."""
    return lambda step, final: final or (n > 0 and step % n == 0)


def train(
    config, workdir: str, make_stage: Callable[[Any, str], Stage], devices=None, *, build_data: bool = True
) -> Scores:
    """A stage's whole run: holds the workdir's lock, prepares it (``build_data``: build the synthetic data the
    config asks for), builds the stage with ``make_stage(config, workdir)`` and ``run``s it. ``config`` validated."""
    with claim(workdir):  # one trainer per workdir
        prepare_workdir(config, workdir, build_data=build_data)
        return run(config, workdir, make_stage(config, workdir), devices)


def run(config, workdir: str, stage: Stage, devices=None) -> Scores:
    """Trains ``stage`` to ``train.steps`` (or SIGTERM) in ``workdir``; returns the last logged scalars, the final
    eval's scores and the export's entries (an early SIGTERM stop returns the last scalars only).

    ``config`` is validated by the caller (before anything here compiles), which also holds the workdir's lock
    (``train`` above). ``devices``: the mesh's devices (default all); tests pass subsets to compare meshes.
    """
    t0 = time.perf_counter()
    devices = jax.devices() if devices is None else list(devices)
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    abstract_params = jax.eval_shape(stage.init_fn, jax.random.PRNGKey(0))
    optimizer, schedule = make_optimizer(config.train, abstract_params)
    ckpt = Checkpointer.from_config(workdir, config, handle_sigterm=True)
    logger = None
    try:  # an exception (a failing eval, a halt on NaN, a failed write) still finishes the asynchronous writes
        kept = ckpt.all_steps()
        resume_at = usable_step(kept, set(load_record(workdir)["bad_checkpoints"]), "resume") if kept else None
        state, shardings, data_state = restore_or_init(
            ckpt, stage.init_fn, optimizer, mesh, rules, jax.random.PRNGKey(config.train.seed), config, step=resume_at
        )
        if not kept and stage.fresh_state is not None:
            state = stage.fresh_state(state, shardings)
        train_step = make_train_step(
            stage.loss_fn,
            optimizer,
            schedule,
            config,
            mesh=mesh,
            rules=rules,
            state_shardings=shardings,
            trainable=trainable_mask(abstract_params, tuple(config.train.freeze)),
            batch_metrics_fn=stage.batch_metrics_fn,
            loss_counts=stage.loss_counts,
        )
        data = stage.make_data(jax.process_index(), jax.process_count())
        if data_state is not None:
            data.set_state(data_state)
        data_metrics = getattr(data, "metrics", None)
        steps, start = int(config.train.steps), int(state.step)
        logger = MetricsLogger(workdir, config, num_devices=len(devices), start_step=start)
        guard = NonFiniteGuard(config, workdir, step=start, count=int(state.nonfinite_steps))
        guard.forget(ckpt.set_aside_after(start))  # newer checkpoints went non-finite when resumed

        def evaluate(step: int, final: bool) -> Scores:
            return stage.evaluate(step, state, logger, final) if stage.evaluate is not None else {}

        if start >= steps:
            logging.warning(
                "%s: already trained to step %d of train.steps=%d; nothing to train (raise train.steps to continue)",
                workdir,
                start,
                steps,
            )
            result = {"step": start}
            if stage.exported is not None and not stage.exported() and jax.process_index() == 0:
                result.update(evaluate(start, True))  # the run stopped between its last checkpoint and its export
                result.update(stage.export(state, result, time.perf_counter() - t0, logger))
            return result

        last, final_scores, step = {}, {}, start
        logging.info("%s %s from step %d to %d on mesh %s", stage.name, config.name, start, steps, dict(mesh.shape))
        while step < steps:
            step += 1
            state, metrics = train_step(state, shard_batch(next(data), mesh, rules))
            log_now = step % max(int(config.train.log_every), 1) == 0
            extra = {"rollbacks": guard.rollbacks, **(data_metrics() if data_metrics else {})} if log_now else None
            scalars = logger.step(step, metrics, extra=extra)
            final, stop = step == steps, ckpt.stop_requested(step)
            save = final or stop or step % config.train.checkpoint_every == 0
            ckpt.check_for_errors()
            if scalars is not None or save:  # no checkpoint is ever written after a non-finite step
                last = scalars if scalars is not None else last
                count = int(scalars["nonfinite_steps"]) if scalars is not None else int(state.nonfinite_steps)
                if guard.update(step, count):
                    state, step = _roll_back(stage, data, ckpt, guard, logger, mesh, rules, optimizer, state, config)
                    continue
            if save:  # before the evals: if one of them fails, no training is lost
                ckpt.save(step, state, data.get_state())
                guard.saved(step)
            if stop and not final:
                logging.warning("stop requested (SIGTERM): saved step %d, exiting", step)
                return last
            scores = evaluate(step, final)
            if final:
                final_scores = scores
        result = {**last, **final_scores}
        if stage.export is not None and jax.process_index() == 0:
            result.update(stage.export(state, result, time.perf_counter() - t0, logger))
        return result
    finally:
        try:
            ckpt.close()
        finally:
            if logger is not None:
                logger.close()


def _roll_back(
    stage: Stage,
    data,
    ckpt: Checkpointer,
    guard: NonFiniteGuard,
    logger: MetricsLogger,
    mesh,
    rules,
    optimizer,
    state: TrainState,
    config,
):
    """(state, step) restored from the newest usable checkpoint, ``data`` set to its position and then
    ``train.rollback_skip_batches`` batches further; metrics rows after it are dropped (those steps train again).
    The fixed params (not in checkpoints, never trained) are the current ``state``'s."""
    ckpt.wait()
    target = usable_step(ckpt.all_steps(), guard.bad_checkpoints, "train.nonfinite=rollback")
    abstract = abstract_state(stage.init_fn, optimizer, mesh, rules, tuple(config.train.freeze))
    state, data_state = ckpt.restore(abstract, target, fixed=fixed_part(state.params))
    if data_state is None:
        raise RuntimeError(f"train.nonfinite=rollback: checkpoint {target} holds no data-iterator state")
    data.set_state(data_state)
    for _ in range(guard.skip_batches):
        next(data)
    step = int(state.step)
    guard.forget(ckpt.set_aside_after(step))
    guard.restarted_from(step, int(state.nonfinite_steps))
    logger.rewind(step)
    logging.warning("rolled back to the checkpoint of step %d and skipped %d data batches", step, guard.skip_batches)
    return state, step
