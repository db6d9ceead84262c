"""The ViT stage: pretrain the SigLIP NaViT architecture (``model.vit``) on the synthetic shapes scenes, then export
it for BAGEL. ``python -m bagel_jax.train.vit_train --config=configs/tiny_vit.py --workdir=DIR``.

BAGEL starts from a pretrained SigLIP (and a pretrained VAE and LLM). At tiny scale, trained from scratch inside
BAGEL, the ViT does not learn: the language model first learns the answers' priors, stops attending to the image
tokens, and the ViT's gradient vanishes (measured on configs/tiny_repro.py: VQA 0.27–0.29 after 1000–2000 steps,
answers that ignore the image). This stage gives the tiny ViT what SigLIP's pretraining gives the real one:
patch features that say what is where. It stands in for SigLIP's contrastive image–text pretraining with a
denser, cheaper objective that the synthetic scenes make exact: every patch belongs to one cell of the 3×3 grid,
the ViT's output patch features are averaged per cell and two linear heads classify each cell's shape
(empty, circle, square, triangle) and colour (empty + 6). The heads are discarded at export, as SigLIP's pooling
head is in BAGEL.

Data: the scenes of the run's own ``t2i`` split (``Generator(data.seed, square=data.synthetic_square).t2i_scene(i)``,
i < ``data.synthetic_examples``: the very images the BAGEL run trains on, no extra data), rendered, resized by
``data.vit_transform`` and patchified exactly as the BAGEL pipeline feeds its ViT, one image per row padded to
(max_size / patch)² patches. Seeded shuffle, reshuffled each epoch, ``data.batch_size`` images per step.

Loss: mean over the 9 cells of CE(shape) + CE(colour). Metrics: ``cls`` (that loss), ``cell_acc`` (both right) on
the train batch; every ``vit_stage.eval_every`` steps ``eval/cell_acc``, ``eval/object_acc`` (cells that hold an
object) and ``eval/scene_acc`` (all 9 cells right) of params and EMA params on ``vit_stage.eval_images`` held-out
scenes drawn with ``vit_stage.eval_seed``.

Export (end of training; DIR/export/), a transformers ``SiglipVisionModel`` checkpoint::

    model.safetensors   vision_model.* tensors (HF layout, conv patch embedding)
    config.json         SiglipVisionConfig (vision_use_head false), loadable by transformers
    vit_stage.json      the stage's result (step, weights, held-out accuracies, wall time)

BAGEL loads it with ``--config.model.vit.init_from=DIR`` (on a fresh start ``params['vit_model']`` and its EMA
copy are replaced, sharded like the originals); the same key loads any HF SigLIP vision checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.config import ConfigError, validate
from bagel_jax.convert.vit_export import EXPORT_DIR, INFO_FILE, export_vit
from bagel_jax.data import images as img_lib
from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.model.bagel import pixels_to_unit
from bagel_jax.model.siglip import SiglipNaViT
from bagel_jax.train import loop

NUM_CELLS = 9
NUM_SHAPES, NUM_COLORS = 1 + len(shapes.SHAPES), 1 + len(shapes.COLORS)  # class 0 = empty cell
SHUFFLE_STREAM = 11  # seeds the shuffle with (data.seed, 11): a stream no other pipeline uses


def validate_vit_config(config, num_devices: int | None = None):
    """``config.validate`` plus the ViT stage's own rules; one-line ``ConfigError`` naming the key."""
    validate(config, num_devices)
    s, d = config.vit_stage, config.data
    checks = [
        ("vit_stage.export", s.export in ("ema", "params"), f"must be 'ema' or 'params', got {s.export!r}"),
        ("vit_stage.eval_every", s.eval_every >= 0, f"must be >= 0, got {s.eval_every}"),
        ("vit_stage.eval_images", s.eval_images >= 0, f"must be >= 0, got {s.eval_images}"),
        ("vit_stage.eval_batch", s.eval_batch > 0, f"must be > 0, got {s.eval_batch}"),
        ("vit_stage.eval_seed", s.eval_seed != d.seed, f"{s.eval_seed} equals data.seed (held-out scenes must differ)"),
        (
            "data.builder",
            d.builder == "synthetic_shapes",
            f"the ViT stage trains on synthetic_shapes scenes, got {d.builder!r}",
        ),
        (
            "data.synthetic_examples",
            d.synthetic_examples > 0,
            f"must be > 0 (scenes to train on), got {d.synthetic_examples}",
        ),
        (
            "train.freeze",
            not tuple(config.train.freeze),
            f"must be empty for the ViT stage, got {tuple(config.train.freeze)}",
        ),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    return config


# --- data --------------------------------------------------------------------------------------------------------


class ScenePatches:
    """Scene index → one ViT row: ``patches`` uint8 [P, p·p·3], ``pos`` / ``image`` / ``cell`` int32 [P] (image 1,
    0 = padding; cell = the 3×3 grid cell holding the patch centre), ``shape`` / ``color`` int32 [9] labels.
    Renders ``t2i`` scene i of ``Generator(seed)`` and prepares it as the BAGEL pipeline prepares ViT images.
    Picklable (grain workers)."""

    def __init__(
        self,
        seed: int,
        rule: img_lib.ResizeRule,
        patch_size: int,
        max_patches_per_side: int,
        square: bool = False,
        interpolate_pos: bool = False,
    ):
        self.generator = shapes.Generator(seed, square=square)
        self.rule, self.patch, self.side = rule, patch_size, max_patches_per_side
        self.interpolate_pos = interpolate_pos
        self.max_patches = (rule.max_size // patch_size) ** 2

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        objs, w, h = self.generator.t2i_scene(int(index))
        pixels = img_lib.resize(np.asarray(shapes.render(objs, w, h)), self.rule, name=f"scene {index}")
        p = self.patch
        rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
        r, c = np.divmod(np.arange(rows * cols), cols)
        cell = ((2 * r + 1) * 3 // (2 * rows)) * 3 + (2 * c + 1) * 3 // (2 * cols)
        n, total = rows * cols, self.max_patches

        def pad(x):
            return np.concatenate([x, np.zeros((total - n,) + x.shape[1:], x.dtype)])

        shape_ids, color_ids = shapes.cell_labels(objs)
        return dict(
            patches=pad(img_lib.patchify(pixels, p)),
            pos=pad(
                img_lib.flattened_position_ids(pixels.shape[0], pixels.shape[1], p, self.side, self.interpolate_pos)
            ),
            image=pad(np.ones(n, np.int32)),
            cell=pad(cell.astype(np.int32)),
            shape=shape_ids,
            color=color_ids,
        )


def _scenes(config, seed: int) -> ScenePatches:
    return ScenePatches(
        seed,
        img_lib.ResizeRule.from_tuple(config.data.vit_transform),
        config.model.vit.patch_size,
        config.model.vit_max_num_patch_per_side,
        config.data.synthetic_square,
        config.model.interpolate_pos,
    )


def make_scene_dataset(config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless grain dataset of host batches (``ScenePatches`` rows stacked, ``data.batch_size // process_count``
    per host); host i reads scenes ``i::process_count``."""
    d = config.data
    if d.batch_size % process_count:
        raise ConfigError(f"data.batch_size: {d.batch_size} not divisible by {process_count} hosts")
    ds = grain.MapDataset.range(d.synthetic_examples)[process_index::process_count]
    if d.shuffle:
        ds = ds.shuffle(seed=int(np.random.SeedSequence([d.seed, SHUFFLE_STREAM]).generate_state(1)[0]))
    ds = ds.repeat(None).map(_scenes(config, d.seed)).batch(d.batch_size // process_count, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers, per_worker_buffer_size=d.prefetch))
    return ds


def held_out_scenes(config) -> dict[str, np.ndarray]:
    """``vit_stage.eval_images`` rows from scenes drawn with ``vit_stage.eval_seed`` (not the training seed)."""
    fn = _scenes(config, config.vit_stage.eval_seed)
    items = [fn(i) for i in range(config.vit_stage.eval_images)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]} if items else {}


# --- model, loss -------------------------------------------------------------------------------------------------


class CellProbe(nn.Module):
    """``SiglipNaViT`` (params under ``vit_model``, the name BAGEL uses) + per-cell mean pooling + two linear heads.
    ``(patches [B, P, p·p·3], pos, image, cell int32[B, P])`` → shape logits [B, 9, 4], colour logits [B, 9, 7]."""

    cfg: Any  # the config's ``model`` section

    @nn.compact
    def __call__(self, patches, pos, image, cell):
        x = SiglipNaViT(self.cfg, name="vit_model")(pixels_to_unit(patches), pos, image).astype(jnp.float32)
        member = ((cell[..., None] == jnp.arange(NUM_CELLS)) & (image[..., None] > 0)).astype(jnp.float32)
        pooled = jnp.einsum("bpd,bpc->bcd", x, member) / jnp.maximum(member.sum(1), 1.0)[..., None]
        pooled = nn.with_logical_constraint(pooled, ("activation_batch", None, "activation_embed"))

        def head(n, name):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("vit_embed", "classes"))
            return nn.Dense(
                n,
                kernel_init=init,
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
                name=name,
            )(pooled)

        return head(NUM_SHAPES, "shape_head"), head(NUM_COLORS, "color_head")


def make_vit_init_fn(config):
    """``(model, init_fn)``: ``CellProbe(config.model)`` and ``rng -> params`` (boxed, logical names)."""
    model = CellProbe(config.model)
    feat = config.model.vit.patch_size**2 * 3

    def init_fn(rng):
        one = jnp.ones((1, 1), jnp.int32)
        return model.init(rng, jnp.zeros((1, 1, feat), jnp.uint8), one, one, one)["params"]

    return model, init_fn


def _outputs(model, params, batch):
    shape_logits, color_logits = model.apply(
        {"params": params}, batch["patches"], batch["pos"], batch["image"], batch["cell"]
    )
    ce = (_ce(shape_logits, batch["shape"]) + _ce(color_logits, batch["color"])).sum(-1) / NUM_CELLS  # [B]
    right = (shape_logits.argmax(-1) == batch["shape"]) & (color_logits.argmax(-1) == batch["color"])  # [B, 9]
    return ce, right


def _ce(logits, labels):
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]


def make_vit_loss_fn(model: CellProbe):
    """``loss_fn(params, batch, rng) -> (loss, aux)`` for ``make_train_step``; aux: ``cls`` (the classification
    loss) and ``cell_acc`` as sums and counts (per image / per cell)."""

    def loss_fn(params, batch, rng):
        del rng
        ce, right = _outputs(model, params, batch)
        aux = dict(
            cls_sum=ce.sum(),
            cls_count=jnp.asarray(ce.shape[0], jnp.float32),
            cell_acc_sum=right.sum().astype(jnp.float32),
            cell_acc_count=jnp.asarray(right.size, jnp.float32),
        )
        return ce.mean(), aux

    return loss_fn


class CellEval:
    """Held-out accuracy of host-side params: ``cell_acc`` (all cells), ``object_acc`` (cells holding an object:
    shape and colour right), ``scene_acc`` (all 9 cells of an image right)."""

    def __init__(self, model: CellProbe, config, data: dict[str, np.ndarray] | None = None):
        self.data = held_out_scenes(config) if data is None else data
        self.batch = int(config.vit_stage.eval_batch)
        self._right = jax.jit(lambda params, b: _outputs(model, params, b)[1])

    def __call__(self, params) -> dict[str, float]:
        params = jax.device_get(params)
        n = len(self.data["shape"])
        right = np.concatenate(
            [
                np.asarray(self._right(params, {k: v[s : s + self.batch] for k, v in self.data.items()}))
                for s in range(0, n, self.batch)
            ]
        )
        occupied = self.data["shape"] > 0
        return {
            "cell_acc": float(right.mean()),
            "object_acc": float(right[occupied].mean()),
            "scene_acc": float(right.all(-1).mean()),
        }


# --- the loop ----------------------------------------------------------------------------------------------------


def train_vit(config, workdir: str, devices=None) -> dict[str, Any]:
    """Trains to ``train.steps`` (or SIGTERM), evaluates, exports to ``workdir/export``; returns the final scalars
    (last training log + ``eval/*``)."""
    devices = jax.devices() if devices is None else list(devices)
    validate_vit_config(config, num_devices=len(devices))
    return loop.train(config, workdir, vit_stage, devices, build_data=False)  # scenes are rendered on the fly


def vit_stage(config, workdir: str) -> loop.Stage:
    """The ViT stage of the loop (``config`` validated, the workdir prepared)."""
    model, init_fn = make_vit_init_fn(config)
    evaluator = CellEval(model, config) if jax.process_index() == 0 and config.vit_stage.eval_images else None

    due = loop.every(int(config.vit_stage.eval_every))

    def evaluate(step: int, state, logger, final: bool) -> dict[str, float]:
        if evaluator is None or not due(step, final):
            return {}
        out = {
            f"eval/{k}{name}": v
            for name, params in (("", state.params), ("_ema", state.ema_full_params()))
            for k, v in evaluator(params).items()
        }
        logger.write_scalars(step, out)
        logging.info("step %d: %s", step, out)
        return out

    def export(state, result, run_seconds: float, logger) -> dict[str, Any]:
        del logger
        stage, step = config.vit_stage, int(state.step)
        params = state.ema_full_params() if stage.export == "ema" else state.params
        suffix = "_ema" if stage.export == "ema" else ""
        info = dict(
            step=step,
            weights=stage.export,
            run_wall_seconds=run_seconds,
            eval_images=int(stage.eval_images),
            eval_seed=int(stage.eval_seed),
            **{k: result.get(f"eval/{k}{suffix}") for k in ("cell_acc", "object_acc", "scene_acc")},
        )
        directory = export_vit(os.path.join(workdir, EXPORT_DIR), params["vit_model"], config.model, info)
        print(
            f"ViT exported to {directory}; use it in BAGEL with\n  --config.model.vit.init_from={workdir}", flush=True
        )
        return dict(run_wall_seconds=run_seconds)

    return loop.Stage(
        name="ViT stage",
        init_fn=init_fn,
        loss_fn=make_vit_loss_fn(model),
        make_data=lambda index, count: iter(make_scene_dataset(config, index, count)),
        evaluate=evaluate,
        export=export,
        exported=lambda: os.path.isfile(os.path.join(workdir, EXPORT_DIR, INFO_FILE)),
    )


def main():
    from bagel_jax.train.app import run as run_app

    run_app(
        train_vit,
        example_config="configs/tiny_vit.py",
        workdir_help="output directory: checkpoints, metrics, TensorBoard, export/",
        stage="vit",
    )


if __name__ == "__main__":
    main()
