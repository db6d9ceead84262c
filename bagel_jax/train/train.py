"""BAGEL training (absl app): ``python -m bagel_jax.train --config=configs/x.py[:arg] --workdir=DIR``.

config → validate (one-line errors, before anything compiles) → the BAGEL stage: the model, its losses, the
packed grain pipeline, the frozen VAE / pretrained ViT of a fresh start, samples and ``config.evals``
→ the one training loop (``loop.py``: sharded state, resume, metrics, checkpoints before evals, SIGTERM).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from bagel_jax.config import validate
from bagel_jax.convert.vae_export import apply_vae_init_config
from bagel_jax.convert.vit_export import check_vit_init, load_vit_params
from bagel_jax.data.pipeline import make_train_iterator, tokenizer_from_config
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.parallel.mesh import logical_rules
from bagel_jax.train import loop
from bagel_jax.train.checkpoint import check_init_from
from bagel_jax.train.losses import make_loss_counts, make_loss_fn
from bagel_jax.train.metrics import MetricsLogger, packing_stats
from bagel_jax.train.release_tokenizer import keep_tokenizer, resolve_tokenizer
from bagel_jax.train.state import with_pretrained


def write_pngs(directory: str, images) -> None:
    """uint8 [H, W, 3] images → ``directory/<i>.png``."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(np.asarray(img, np.uint8)).save(os.path.join(directory, f"{i}.png"))


def batch_metrics(batch) -> dict:
    """Per-step batch statistics for throughput/MFU: real tokens, Σ len², fill."""
    return packing_stats(batch.doc)


def inference_params(state):
    """The full param tree the in-run samples and evals use: the EMA (trainable leaves) over the frozen params,
    sharded on the training mesh as they are."""
    return state.ema_full_params()


class Sampler:
    """Every ``train.sample_every`` steps: EMA-model images for ``train.sample_prompts`` and an answer to
    ``train.sample_question`` about the first one, written as TensorBoard images / text and (process 0) as
    ``<workdir>/samples/<step>/<i>.png``. Runs on the params' mesh: every process makes the same calls."""

    def __init__(self, model, config, workdir: str = ""):
        self.model, self.config, self.workdir = model, config, workdir
        self.tokenizer = tokenizer_from_config(config) if config.train.sample_every else None

    def due(self, step: int) -> bool:
        every = self.config.train.sample_every
        return every > 0 and step % every == 0

    def __call__(self, step: int, params, logger: MetricsLogger) -> None:
        from bagel_jax.infer.api import Inferencer

        t = self.config.train
        inf = Inferencer(self.model, params, self.tokenizer, self.config.data, rules=logical_rules(self.config))
        prompts = list(t.sample_prompts)
        images = inf.generate_batch(prompts, [jax.random.key(step)] * len(prompts), num_timesteps=t.sample_steps)
        logger.write_images(step, {"samples": np.stack(images)})
        if self.workdir and jax.process_index() == 0:
            write_pngs(os.path.join(self.workdir, "samples", str(step)), images)
        texts = {"sample_prompts": " | ".join(t.sample_prompts)}
        if t.sample_question:
            texts["sample_answer"] = inf.answer(images[0], t.sample_question, max_length=32)
        logger.write_texts(step, texts)


class Evals:
    """big_vision-style ``config.evals`` run on the EMA params at each evaluator's ``every``."""

    def __init__(self, model, config):
        # imported now, not at the first due step: a run picks up one version of the eval code, all of it
        from bagel_jax.eval import runner
        from bagel_jax.eval.inferencer_fns import inferencer_fns
        from bagel_jax.infer.api import Inferencer

        self._fns, self._run, self._inferencer = inferencer_fns, runner.run_evals, Inferencer
        self.model, self.config = model, config
        self.evaluators = runner.build_evaluators(config.evals) if len(config.evals) else {}
        self.tokenizer = tokenizer_from_config(config) if self.evaluators else None

    def __call__(self, step: int, params, logger: MetricsLogger) -> dict[str, float]:
        due = {k: e for k, e in self.evaluators.items() if e.due(step)}
        if not due:
            return {}
        inf = self._inferencer(self.model, params, self.tokenizer, self.config.data, rules=logical_rules(self.config))
        scores = {f"eval/{k}": float(v) for k, v in self._run(due, step=step, **self._fns(inf)).items()}
        logger.write_scalars(step, scores)
        return scores


def bagel_stage(config, workdir: str) -> loop.Stage:
    """The BAGEL stage of the loop (``config`` validated, ``data.data_dir`` resolved in ``workdir``)."""
    model, init_fn = make_init_fn(config)
    sampler, evals = Sampler(model, config, workdir), Evals(model, config)

    def fresh_state(state, shardings):
        # the frozen VAE (model.vae.init_from) is a fixed param: convert/fixed_params.py puts it in on every start
        if config.model.vit.init_from:  # the pretrained ViT (the ViT stage, or any HF SigLIP checkpoint)
            loaded = load_vit_params(config.model.vit.init_from, config.model)
            state = with_pretrained(state, shardings, "vit_model", loaded, "model.vit.init_from")
        return state

    def evaluate(step: int, state, logger: MetricsLogger, final: bool) -> dict[str, float]:
        del final  # samples and evals follow their own schedules
        if sampler.due(step):
            sampler(step, inference_params(state), logger)
        return evals(step, inference_params(state), logger)

    return loop.Stage(
        name="BAGEL",
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, config),
        make_data=lambda index, count: make_train_iterator(config, index, count),
        evaluate=evaluate,
        fresh_state=fresh_state,
        batch_metrics_fn=batch_metrics,
        loss_counts=make_loss_counts(config),
    )


def train(config, workdir: str, devices=None) -> dict[str, float]:
    """Trains BAGEL until ``config.train.steps`` (or SIGTERM); returns the last logged scalars (and final evals).

    ``devices``: the devices of the mesh (default all); tests pass subsets to compare meshes.
    """
    devices = jax.devices() if devices is None else list(devices)
    validate(config, num_devices=len(devices))
    apply_vae_init_config(config)  # model.vae.init_from: scale/shift from the VAE stage's vae.json
    check_vit_init(config)  # model.vit.init_from: the checkpoint exists (loaded on a fresh start)
    shipped = resolve_tokenizer(config, workdir)  # train.init_from = a release: its tokenizer
    if shipped is not None:
        check_init_from(config)  # the release itself, before the workdir gets the tokenizer's copy
        keep_tokenizer(config, workdir, shipped)
    return loop.train(config, workdir, bagel_stage, devices)


def main():
    from bagel_jax.train.app import run as run_app

    run_app(
        train,
        example_config="configs/tiny_shapes.py",
        workdir_help="output directory: checkpoints, metrics, TensorBoard, config.json",
    )


if __name__ == "__main__":
    main()
