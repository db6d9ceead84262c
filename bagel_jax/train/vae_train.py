"""The autoencoder stage: train the FLUX VAE architecture (``model.vae``) on a dataset's images, then export it
for BAGEL. ``python -m bagel_jax.train.vae_train --config=configs/tiny_vae.py --workdir=DIR``.

The stage plugs its model, loss, data, evals and export into the one training loop (``loop.py``): resume,
metrics, checkpoints before evals, SIGTERM saves and exits.

Data: the ``t2i`` source of ``data`` (``data.sources.t2i`` or ``{data.builder}:t2i``; synthetic shapes are built
into DIR/data when ``data.synthetic_examples`` > 0), first image of each record, resized exactly as BAGEL resizes
VAE images (``data.vae_transform``) and placed top-left on the ``data.vae_image_size`` canvas with its valid size
``hw``. The VAE runs masked by ``hw`` (``FluxVAE``'s padded-batch mode), so it trains on the very inputs BAGEL
encodes. Seeded shuffle, reshuffled each epoch, ``data.batch_size`` images per step (global).

Loss (per step, over the valid pixels / latents of the global batch)::

    z    = mean + exp(logvar / 2)·ε,  (mean, logvar) = encode(x, hw),  logvar clipped to [-30, 20]
    loss = mean (decode(z) − x)²  (vae_stage.loss="l1": mean |decode(z) − x|)
           + vae_stage.kl_weight · mean KL(q(z|x) ‖ N(0, 1))

with the KL averaged per latent element (LDM/FLUX's kl_weight=1e-6 on *sums* is ≈ 2e-8 in this per-element
convention). FLUX's own training used L1 plus LPIPS perceptual and PatchGAN adversarial losses; the perceptual and
adversarial terms are omitted here. L2 is the default: on shapes images mostly background, L1's unit-size gradient
from every nearly-right background pixel drowns the signal from the small objects (measured on configs/tiny_vae.py,
1500 steps: held-out PSNR 25.9 dB with L1 and visibly wrong object colours, 33.9 dB with L2).

Metrics: ``rec`` (the L2/L1 term), ``kl``, ``psnr`` (train batch, sampled latents); every ``vae_stage.eval_every``
steps ``eval/psnr`` (posterior mean) and ``eval/psnr_sample`` (sampled latent) of params and EMA params on held-out
images rendered with ``vae_stage.eval_seed``, plus a reconstruction grid in TensorBoard. PSNR is over the valid
pixels of each image with data range 1 on [0, 1] pixels (= 255 on uint8), decoded pixels clipped, averaged over
images.

Export (end of training; DIR/export/)::

    ae.safetensors   the VAE in BFL's FLUX layout (what official BAGEL releases ship; bagel_ckpt reads it)
    vae.json         {"scale_factor": 1/std, "shift_factor": mean, ...}: mean/std of sampled latents over
                     ``vae_stage.stats_images`` training images (valid positions, all channels)

BAGEL picks it up with ``--config.model.vae.init_from=DIR`` (``bagel_jax.convert.vae_export``: scale/shift from
vae.json, the weights into ``params['vae']`` on a fresh start). The stage also prints the equivalent ``--config``
overrides.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu
from bagel_jax.config import ConfigError, validate
from bagel_jax.convert.vae_export import EXPORT_DIR, STATS_FILE, export_vae, load_latent_stats
from bagel_jax.data import images as img_lib
from bagel_jax.data.builders import common
from bagel_jax.model.vae import FluxVAE, valid_mask
from bagel_jax.train import loop

SHUFFLE_STREAM = 7  # seeds the shuffle with (data.seed, 7): a stream the BAGEL pipeline does not use
LOGVAR_RANGE = (-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution (training loss only)


def validate_vae_config(config, num_devices: int | None = None):
    """``config.validate`` (schema incl. the ``vae_stage`` section, types, mesh) plus the VAE stage's own rules;
    one-line ``ConfigError`` naming the key."""
    validate(config, num_devices)
    s = config.vae_stage
    checks = [
        ("loss", s.loss in ("l1", "l2"), f"must be 'l1' or 'l2', got {s.loss!r}"),
        ("kl_weight", s.kl_weight >= 0, f"must be >= 0, got {s.kl_weight}"),
        ("export", s.export in ("ema", "params"), f"must be 'ema' or 'params', got {s.export!r}"),
    ]
    checks += [(k, s[k] >= 0, f"must be >= 0, got {s[k]}") for k in ("eval_every", "eval_images", "stats_images")]
    checks += [("eval_batch", s.eval_batch > 0, f"must be > 0, got {s.eval_batch}")]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"vae_stage.{key}: {msg}")
    if tuple(config.train.freeze):
        raise ConfigError(f"train.freeze: must be empty for the VAE stage, got {tuple(config.train.freeze)}")
    return config


# --- data --------------------------------------------------------------------------------------------------------


class VaeImage:
    """Encoded image bytes → ``{"images": uint8[H, W, 3] canvas, "hw": int32[2]}``: BAGEL's VAE resize
    (``rule``), placed top-left on the ``canvas`` (H, W). An undecodable / too large image gives an all-zero
    canvas with hw = (0, 0) (it then contributes nothing to losses or metrics). Picklable (grain workers)."""

    def __init__(
        self,
        rule: img_lib.ResizeRule,
        canvas: tuple[int, int],
        max_input_pixels: int = img_lib.DEFAULT_MAX_INPUT_PIXELS,
    ):
        self.rule, self.canvas, self.max_input_pixels = rule, tuple(canvas), max_input_pixels

    def __call__(self, data: bytes, name: str = "image") -> dict[str, np.ndarray]:
        out = np.zeros(self.canvas + (3,), np.uint8)
        try:
            pixels = img_lib.resize(img_lib.decode_image(data, name, self.max_input_pixels), self.rule, name=name)
        except img_lib.ImageError as e:
            logging.info("skipping %s (%s): %s", name, e.reason, e)
            return {"images": out, "hw": np.zeros(2, np.int32)}
        h, w = pixels.shape[:2]
        if h > self.canvas[0] or w > self.canvas[1]:
            raise ValueError(f"{name}: resized to {h}x{w}, larger than data.vae_image_size {self.canvas}")
        out[:h, :w] = pixels
        return {"images": out, "hw": np.array([h, w], np.int32)}


class RecordImage:
    """Record index → ``VaeImage`` of the record's first image (grain map). A record that cannot be read or holds
    no image gives the empty canvas (hw = (0, 0): no loss, no metric), logged; it never stops training."""

    def __init__(self, source, to_image: VaeImage):
        self.source, self.to_image = source, to_image

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        try:
            record = self.source[int(index)]
            images = list(record.get("images", []))
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in record.get("image_names", [])]
        except Exception as e:  # noqa: BLE001  (an unreadable or malformed record is skipped, never fatal)
            logging.info("skipping record %d (unreadable_record): %s: %s", index, type(e).__name__, e)
            images, names = [], []
        return self.to_image(images[0] if images else b"", names[0] if names else f"record {index}")


def _image_transform(config) -> VaeImage:
    d = config.data
    return VaeImage(img_lib.ResizeRule.from_tuple(d.vae_transform), tuple(d.vae_image_size), d.max_input_pixels)


def _t2i_source(config):
    from bagel_jax.data.pipeline import source_spec

    return common.open_source(config.data.data_dir, source_spec(config, "t2i"))


def make_image_dataset(config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless grain dataset of host batches ``{"images": uint8[b, H, W, 3], "hw": int32[b, 2]}``,
    b = ``data.batch_size // process_count``; each host reads records ``process_index::process_count``."""
    d = config.data
    if d.batch_size % process_count:
        raise ConfigError(f"data.batch_size: {d.batch_size} not divisible by {process_count} hosts")
    source = _t2i_source(config)
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    rows = d.batch_size // process_count
    if len(ds) < rows:
        raise ValueError(f"data.sources.t2i: {len(ds)} images per host < {rows} rows per host batch")
    if d.shuffle:
        ds = ds.shuffle(seed=int(np.random.SeedSequence([d.seed, SHUFFLE_STREAM]).generate_state(1)[0]))
    ds = ds.repeat(None).map(RecordImage(source, _image_transform(config)))
    ds = ds.batch(rows, drop_remainder=True).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers, per_worker_buffer_size=d.prefetch))
    return ds


def training_images(config, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` images of the t2i source (record order, no shuffle), as one numpy batch."""
    source = _t2i_source(config)
    fn = RecordImage(source, _image_transform(config))
    items = [fn(i) for i in range(min(count, len(source)))]
    return {k: np.stack([it[k] for it in items]) for k in ("images", "hw")}


def held_out_images(config) -> dict[str, np.ndarray]:
    """``vae_stage.eval_images`` t2i images from the synthetic shapes generator with ``vae_stage.eval_seed``
    (a seed the training data does not use), prepared like training images."""
    from bagel_jax.data.builders.synthetic_shapes import Generator

    s = config.vae_stage
    if s.eval_seed == config.data.seed:
        raise ConfigError(f"vae_stage.eval_seed: {s.eval_seed} equals data.seed (held-out images must differ)")
    gen, fn = Generator(seed=s.eval_seed, square=config.data.synthetic_square), _image_transform(config)
    items = [fn(gen.example("t2i", i)["images"][0], f"eval image {i}") for i in range(s.eval_images)]
    return {k: np.stack([it[k] for it in items]) for k in ("images", "hw")}


# --- model, loss, metrics ----------------------------------------------------------------------------------------


def to_unit(pixels):
    """uint8 [0, 255] → float32 [-1, 1] (float input is taken as already in [-1, 1])."""
    if jnp.issubdtype(pixels.dtype, jnp.integer):
        return pixels.astype(jnp.float32) / 127.5 - 1.0
    return pixels.astype(jnp.float32)


def psnr(recon, target, mask=None):
    """float32[N]: per-image PSNR in dB of ``recon`` vs ``target`` (both [N, H, W, C] in [-1, 1]; recon
    clipped), over the pixels where ``mask`` ([N, H, W, 1], 1 = valid; None = all) is set, data range 1 on
    [0, 1] pixels: ``−10·log10(mean(((recon − target) / 2)²))``. An image without valid pixels gives 0."""
    err = jnp.square((jnp.clip(recon, -1.0, 1.0) - target.astype(jnp.float32)) / 2.0)
    if mask is None:
        mask = jnp.ones(err.shape[:3] + (1,), jnp.float32)
    count = mask.sum(axis=(1, 2, 3)) * err.shape[-1]
    mse = (err * mask).sum(axis=(1, 2, 3)) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), 0.0)


def make_vae_init_fn(config):
    """``(model, init_fn)``: ``FluxVAE(config.model.vae)`` and ``rng -> params`` (boxed, logical names)."""
    model = FluxVAE(config.model.vae)
    f = model.downsample

    def init_fn(rng):
        return model.init(rng, jnp.zeros((1, f, f, config.model.vae.in_channels), jnp.float32))["params"]

    return model, init_fn


def make_vae_loss_fn(model: FluxVAE, config):
    """``loss_fn(params, batch, rng) -> (loss, aux)`` for ``make_train_step`` (see the module docstring).

    aux: ``rec_sum`` / ``rec_count`` (valid pixel values), ``kl_sum`` / ``kl_count`` (valid latent values),
    ``psnr_sum`` / ``psnr_count`` (images with a valid region).
    """
    s = config.vae_stage
    kl_weight, square = float(s.kl_weight), s.loss == "l2"
    f = model.downsample

    def loss_fn(params, batch, rng):
        x, hw = to_unit(batch["images"]), batch["hw"]
        mean, logvar = model.apply({"params": params}, x, hw, method=FluxVAE.encode)
        logvar = jnp.clip(logvar, *LOGVAR_RANGE)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
        recon = model.apply({"params": params}, z, hw // f, method=FluxVAE.decode)
        pix = valid_mask(hw, *x.shape[1:3])
        lat = valid_mask(hw // f, *mean.shape[1:3])
        err = recon - x
        rec = jnp.square(err) if square else jnp.abs(err)
        kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        aux = dict(
            rec_sum=(rec * pix).sum(),
            rec_count=pix.sum() * x.shape[-1],
            kl_sum=(kl * lat).sum(),
            kl_count=lat.sum() * mean.shape[-1],
        )
        has_pixels = (hw[:, 0] * hw[:, 1] > 0).astype(jnp.float32)
        aux.update(
            psnr_sum=(psnr(jax.lax.stop_gradient(recon), x, pix) * has_pixels).sum(), psnr_count=has_pixels.sum()
        )
        loss = aux["rec_sum"] / jnp.maximum(aux["rec_count"], 1.0) + kl_weight * aux["kl_sum"] / jnp.maximum(
            aux["kl_count"], 1.0
        )
        return loss, aux

    return loss_fn


class ReconEval:
    """Held-out reconstruction PSNR (and a grid of originals | reconstructions) of host-side params."""

    def __init__(self, model: FluxVAE, config, images: dict[str, np.ndarray] | None = None):
        self.model, self.config = model, config
        self.data = held_out_images(config) if images is None else images
        self.batch = int(config.vae_stage.eval_batch)
        f = model.downsample

        def recon(params, images, hw, rng):
            x = to_unit(images)
            mean, logvar = model.apply({"params": params}, x, hw, method=FluxVAE.encode)
            sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
            pix = valid_mask(hw, *x.shape[1:3])
            out_mean = model.apply({"params": params}, mean, hw // f, method=FluxVAE.decode)
            out_sample = model.apply({"params": params}, sample, hw // f, method=FluxVAE.decode)
            return psnr(out_mean, x, pix), psnr(out_sample, x, pix), out_mean

        self._recon = xla_cpu.jit(recon)

    def __call__(self, params, rng=None) -> tuple[dict[str, float], np.ndarray]:
        """({"psnr": dB, "psnr_sample": dB}, uint8 grid [n, H, 2W, 3] of the first eval batch)."""
        params = jax.device_get(params)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        images, hw = self.data["images"], self.data["hw"]
        valid = hw.prod(-1) > 0
        scores, grid = {"psnr": [], "psnr_sample": []}, None
        for start in range(0, len(images), self.batch):
            sl = slice(start, start + self.batch)
            p_mean, p_sample, out = self._recon(params, images[sl], hw[sl], jax.random.fold_in(rng, start))
            scores["psnr"].append(np.asarray(p_mean)[valid[sl]])
            scores["psnr_sample"].append(np.asarray(p_sample)[valid[sl]])
            if grid is None:
                out = np.asarray(jnp.round((jnp.clip(out, -1, 1) + 1) * 127.5)).astype(np.uint8)
                grid = np.concatenate([images[sl], out], axis=2)
        return {k: float(np.mean(np.concatenate(v))) if v else float("nan") for k, v in scores.items()}, grid


def latent_stats(
    model: FluxVAE, params, data: dict[str, np.ndarray], batch: int = 16, seed: int = 0
) -> dict[str, float]:
    """Mean and std of posterior *samples* (what BAGEL encodes) over the valid latent positions and all
    channels of ``data`` images; float64 accumulation."""
    params = jax.device_get(params)
    f = model.downsample

    @xla_cpu.jit
    def moments(images, hw, rng):
        mean, logvar = model.apply({"params": params}, to_unit(images), hw, method=FluxVAE.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
        m = valid_mask(hw // f, *z.shape[1:3])
        return (z * m).sum(), (jnp.square(z) * m).sum(), m.sum() * z.shape[-1]

    total = total_sq = count = 0.0
    for start in range(0, len(data["images"]), batch):
        s, sq, n = moments(
            data["images"][start : start + batch],
            data["hw"][start : start + batch],
            jax.random.fold_in(jax.random.PRNGKey(seed), start),
        )
        total, total_sq, count = total + float(s), total_sq + float(sq), count + float(n)
    if count == 0:
        raise ValueError("latent_stats: no valid images")
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return {"latent_mean": mean, "latent_std": std, "latent_count": count}


# --- the loop ----------------------------------------------------------------------------------------------------


def train_vae(config, workdir: str, devices=None) -> dict[str, Any]:
    """Trains to ``train.steps`` (or SIGTERM), evaluates, exports to ``workdir/export``; returns the final
    scalars (last training log + ``eval/*`` + scale/shift)."""
    devices = jax.devices() if devices is None else list(devices)
    validate_vae_config(config, num_devices=len(devices))
    return loop.train(config, workdir, vae_stage, devices)


def vae_stage(config, workdir: str) -> loop.Stage:
    """The VAE stage of the loop (``config`` validated, the workdir prepared)."""
    model, init_fn = make_vae_init_fn(config)
    evaluator = ReconEval(model, config) if jax.process_index() == 0 and config.vae_stage.eval_images else None

    due = loop.every(int(config.vae_stage.eval_every))

    def evaluate(step: int, state, logger, final: bool) -> dict[str, float]:
        if evaluator is None or not due(step, final):
            return {}
        out = {}
        for name, params in (("", state.params), ("_ema", state.ema_full_params())):
            scores, grid = evaluator(params)
            out.update({f"eval/{k}{name}": v for k, v in scores.items()})
            logger.write_images(step, {f"eval/reconstruction{name}": grid})
        logger.write_scalars(step, out)
        logging.info("step %d: %s", step, out)
        return out

    def export(state, result, run_seconds: float, logger) -> dict[str, Any]:
        step, stage = int(state.step), config.vae_stage
        params = state.ema_full_params() if stage.export == "ema" else state.params
        stats = latent_stats(
            model, params, training_images(config, stage.stats_images), batch=stage.eval_batch, seed=config.train.seed
        )
        suffix = "_ema" if stage.export == "ema" else ""
        info = dict(
            step=step,
            weights=stage.export,
            loss=stage.loss,
            kl_weight=float(stage.kl_weight),
            run_wall_seconds=run_seconds,
            psnr_eval=result.get(f"eval/psnr{suffix}"),
            psnr_eval_sample=result.get(f"eval/psnr_sample{suffix}"),
            eval_images=int(stage.eval_images),
            eval_seed=int(stage.eval_seed),
        )
        directory = export_vae(os.path.join(workdir, EXPORT_DIR), params, config.model.vae, stats, info)
        meta = load_latent_stats(directory)
        print(
            f"VAE exported to {directory}; use it in BAGEL with\n"
            f"  --config.model.vae.init_from={workdir}\n"
            f"(sets --config.model.vae.scale_factor={meta['scale_factor']:.6g} "
            f"--config.model.vae.shift_factor={meta['shift_factor']:.6g} from {STATS_FILE})",
            flush=True,
        )
        logger.write_scalars(step, {k: meta[k] for k in ("scale_factor", "shift_factor")})
        return dict(scale_factor=meta["scale_factor"], shift_factor=meta["shift_factor"], run_wall_seconds=run_seconds)

    return loop.Stage(
        name="VAE stage",
        init_fn=init_fn,
        loss_fn=make_vae_loss_fn(model, config),
        make_data=lambda index, count: iter(make_image_dataset(config, index, count)),
        evaluate=evaluate,
        export=export,
        exported=lambda: os.path.isfile(os.path.join(workdir, EXPORT_DIR, STATS_FILE)),
    )


def main():
    from bagel_jax.train.app import run as run_app

    run_app(
        train_vae,
        example_config="configs/tiny_vae.py",
        workdir_help="output directory: checkpoints, metrics, TensorBoard, export/",
        stage="vae",
    )


if __name__ == "__main__":
    main()
