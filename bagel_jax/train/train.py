"""The training loop (absl app): ``python -m bagel_jax.train --config=configs/x.py[:arg] --workdir=DIR``.

    config → validate (one-line errors, before anything compiles) → mesh + logical rules
    → sharded TrainState (resumed from DIR/checkpoints, or fresh / ``train.init_from``)
    → grain iterator of PackedBatch (its state restored with the checkpoint) → jitted train_step
    → metrics (TensorBoard + DIR/metrics.jsonl), periodic samples and evals, async Orbax checkpoints.

SIGTERM (preemption) saves a checkpoint and exits; the next start resumes it. Every host runs this same
program; only process 0 writes logs, every process joins checkpoints.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from bagel_jax.config import validate
from bagel_jax.data.pipeline import make_train_iterator, tokenizer_from_config
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.parallel.mesh import logical_rules, make_mesh, shard_batch
from bagel_jax.train.checkpoint import Checkpointer, restore_or_init
from bagel_jax.train.losses import make_loss_fn
from bagel_jax.train.metrics import MetricsLogger, packing_stats
from bagel_jax.train.optim import make_optimizer, trainable_mask
from bagel_jax.train.step import check_finite, make_train_step
from bagel_jax.train.vae_train import apply_vae_init_config, replace_vae_params
from bagel_jax.train.vit_train import check_vit_init, replace_vit_params


def prepare_data(config, workdir: str) -> None:
    """Resolves ``data.data_dir`` (default ``workdir/data``) and builds synthetic shapes there when asked."""
    if not config.data.data_dir:
        config.data.data_dir = os.path.join(workdir, "data")
    if config.data.builder == "synthetic_shapes" and config.data.synthetic_examples > 0:
        from bagel_jax.data.builders import synthetic_shapes
        if jax.process_index() == 0:  # the workdir is shared by all hosts: one builds, the others wait
            synthetic_shapes.build(config.data.data_dir, num_examples=config.data.synthetic_examples,
                                   seed=config.data.seed, vocab_size=config.model.vocab_size,
                                   square=config.data.synthetic_square)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("bagel_jax:synthetic_data_built")


def write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(config.to_json_best_effort(indent=2, sort_keys=True))


def batch_metrics(batch) -> dict[str, Any]:
    """Per-step batch statistics for throughput/MFU: real tokens, Σ len², fill."""
    return packing_stats(batch.doc)


class Sampler:
    """Every ``train.sample_every`` steps: EMA-model images for ``train.sample_prompts`` and an answer to
    ``train.sample_question`` about the first one, written as TensorBoard images / text."""

    def __init__(self, model, config):
        self.model, self.config = model, config
        self.tokenizer = tokenizer_from_config(config) if config.train.sample_every else None

    def due(self, step: int) -> bool:
        every = self.config.train.sample_every
        return every > 0 and step % every == 0

    def __call__(self, step: int, params, logger: MetricsLogger) -> None:
        from bagel_jax.infer.api import Inferencer
        t = self.config.train
        inf = Inferencer(self.model, jax.device_get(params), self.tokenizer, self.config.data)
        images = [inf.generate(p, num_timesteps=t.sample_steps, rng=jax.random.key(step)) for p in t.sample_prompts]
        logger.write_images(step, {"samples": np.stack(images)})
        texts = {"sample_prompts": " | ".join(t.sample_prompts)}
        if t.sample_question:
            texts["sample_answer"] = inf.answer(images[0], t.sample_question, max_length=32)
        logger.write_texts(step, texts)


class Evals:
    """big_vision-style ``config.evals`` run on the EMA params at each evaluator's ``every``."""

    def __init__(self, model, config):
        # imported now, not at the first due step: a run picks up one version of the eval code, all of it
        from bagel_jax.eval import from_workdir, runner
        from bagel_jax.infer.api import Inferencer
        self._fns, self._run, self._inferencer = from_workdir.inferencer_fns, runner.run_evals, Inferencer
        self.model, self.config = model, config
        self.evaluators = runner.build_evaluators(config.evals) if len(config.evals) else {}
        self.tokenizer = tokenizer_from_config(config) if self.evaluators else None

    def __call__(self, step: int, params, logger: MetricsLogger) -> None:
        due = {k: e for k, e in self.evaluators.items() if e.due(step)}
        if not due:
            return
        inf = self._inferencer(self.model, jax.device_get(params), self.tokenizer, self.config.data)
        scores = self._run(due, step=step, **self._fns(inf))
        logger.write_scalars(step, {f"eval/{k}": float(v) for k, v in scores.items()})


def train(config, workdir: str, devices=None) -> dict[str, float]:
    """Trains until ``config.train.steps`` (or SIGTERM); returns the last logged scalars.

    ``devices``: the devices of the mesh (default all); tests pass subsets to compare meshes.
    """
    devices = jax.devices() if devices is None else list(devices)
    validate(config, num_devices=len(devices))
    apply_vae_init_config(config)  # model.vae.init_from: scale/shift from the VAE stage's vae.json
    check_vit_init(config)  # model.vit.init_from: the checkpoint exists (loaded below, on a fresh start)
    os.makedirs(workdir, exist_ok=True)
    prepare_data(config, workdir)
    write_config(config, workdir)

    mesh, rules = make_mesh(config, devices), logical_rules(config)
    model, init_fn = make_init_fn(config)
    abstract_params = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    optimizer, schedule = make_optimizer(config.train, abstract_params)
    ckpt = Checkpointer.from_config(workdir, config, handle_sigterm=True)
    fresh = ckpt.latest_step() is None
    state, shardings, data_state = restore_or_init(ckpt, init_fn, optimizer, mesh, rules,
                                                   jax.random.PRNGKey(config.train.seed), config)
    if fresh and config.model.vae.init_from:  # the frozen VAE from the VAE stage (no optimizer state to touch)
        state = replace_vae_params(state, shardings, config.model.vae.init_from, config.model.vae)
    if fresh and config.model.vit.init_from:  # the pretrained ViT (the ViT stage, or any HF SigLIP checkpoint)
        state = replace_vit_params(state, shardings, config.model.vit.init_from, config.model)
    trainable = trainable_mask(abstract_params, tuple(config.train.freeze))
    train_step = make_train_step(make_loss_fn(model, config), optimizer, schedule, config, mesh=mesh, rules=rules,
                                 state_shardings=shardings, trainable=trainable, batch_metrics_fn=batch_metrics)

    data = make_train_iterator(config, jax.process_index(), jax.process_count())
    if data_state is not None:
        data.set_state(data_state)
    logger = MetricsLogger(workdir, config, num_devices=len(devices))
    sampler, evals = Sampler(model, config), Evals(model, config)
    start, nonfinite, last = int(state.step), int(state.nonfinite_steps), {}
    logging.info("training %s from step %d to %d on mesh %s", config.name, start, config.train.steps,
                 dict(mesh.shape))

    try:  # an exception (a failing eval, a halt on NaN) still finishes the asynchronous checkpoint writes
        for step in range(start + 1, config.train.steps + 1):
            batch = shard_batch(next(data), mesh, rules)
            state, metrics = train_step(state, batch)
            log_now = step % max(int(config.train.log_every), 1) == 0
            scalars = logger.step(step, metrics, extra=data.metrics() if log_now else None)
            if scalars is not None:
                last = scalars
                nonfinite = check_finite(scalars, config, nonfinite)
            final = step == config.train.steps
            stop = ckpt.stop_requested(step)
            if final or stop or step % config.train.checkpoint_every == 0:  # before samples and evals: if one of
                ckpt.save(step, state, data.get_state())                     # them fails, no training is lost
            if stop and not final:
                logging.warning("stop requested (SIGTERM): saved step %d, exiting", step)
                break
            if sampler.due(step):
                sampler(step, state.ema_params, logger)
            evals(step, state.ema_params, logger)
    finally:
        logger.close()
        ckpt.close()
    return last


def run():
    from bagel_jax.train.app import run as run_app
    run_app(train, example_config="configs/tiny_shapes.py",
            workdir_help="output directory: checkpoints, metrics, TensorBoard, config.json")


if __name__ == "__main__":
    run()
