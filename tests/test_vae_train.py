"""The VAE stage (bagel_jax/train/vae_train.py): PSNR vs numpy, the image transform, a short real run whose loss
falls on a fixed batch, the export (ae.safetensors + vae.json) and its round trip into a Bagel TrainState."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from bagel_jax.config import ConfigError
from bagel_jax.convert import vae_export
from bagel_jax.data import images as img_lib
from bagel_jax.train import vae_train
from configs_util import shipped_config

STEPS = 12


def tiny_vae_config(**stage):
    c = shipped_config("tiny_vae")
    c.vae_stage.update(stage)
    return c


# --- pure functions ----------------------------------------------------------------------------------------------


def test_psnr_matches_numpy_on_uint8_scale():
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (3, 8, 12, 3)).astype(np.float32)
    recon = (target + rng.normal(0, 0.1, target.shape)).astype(np.float32)
    recon[0, 0, 0] = 1.7  # out of range: clipped to 1 before scoring
    mask = np.zeros((3, 8, 12, 1), np.float32)
    mask[0, :8, :12] = 1
    mask[1, :4, :8] = 1  # image 2 has no valid pixel
    got = np.asarray(vae_train.psnr(jnp.asarray(recon), jnp.asarray(target), jnp.asarray(mask)))
    for n in range(2):
        h, w = (8, 12) if n == 0 else (4, 8)
        a = (np.clip(recon[n, :h, :w], -1, 1) + 1) * 127.5
        b = (target[n, :h, :w] + 1) * 127.5
        want = 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))
        assert got[n] == pytest.approx(want, abs=1e-3)
    assert got[2] == 0.0
    full = np.asarray(vae_train.psnr(jnp.asarray(target), jnp.asarray(target * 0.5)))
    want = [10 * np.log10(4.0 / np.mean((t * 0.5) ** 2)) for t in target]
    np.testing.assert_allclose(full, want, rtol=1e-5)


def _png(h, w, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_vae_image_resizes_like_bagel_and_pads_top_left():
    rule = img_lib.ResizeRule(64, 32, 16)
    fn = vae_train.VaeImage(rule, (64, 64))
    out = fn(_png(70, 90))
    w, h = rule.target_size(90, 70)
    assert tuple(out["hw"]) == (h, w) == (48, 64)
    np.testing.assert_array_equal(out["images"][:h, :w], img_lib.resize(img_lib.decode_image(_png(70, 90)), rule))
    assert not out["images"][h:].any()
    bad = fn(b"not an image", "broken.png")
    assert tuple(bad["hw"]) == (0, 0) and not bad["images"].any()
    with pytest.raises(ValueError, match="larger than data.vae_image_size"):
        vae_train.VaeImage(rule, (32, 32))(_png(64, 64))


def test_config_validation_names_the_key():
    vae_train.validate_vae_config(tiny_vae_config())
    with pytest.raises(ConfigError, match="^vae_stage.loss: "):
        vae_train.validate_vae_config(tiny_vae_config(loss="lpips"))
    with pytest.raises(ConfigError, match="^vae_stage.kl_weight: must be >= 0"):
        vae_train.validate_vae_config(tiny_vae_config(kl_weight=-1.0))
    c = tiny_vae_config()
    c.vae_stage.typo = 1
    with pytest.raises(ConfigError, match="^vae_stage.typo: unknown"):
        vae_train.validate_vae_config(c)
    with pytest.raises(ConfigError, match="^vae_stage.eval_batch: must be > 0"):
        vae_train.validate_vae_config(tiny_vae_config(eval_batch=0))
    c = tiny_vae_config()
    c.train.freeze = ("vit",)
    with pytest.raises(ConfigError, match="^train.freeze: "):
        vae_train.validate_vae_config(c)


# --- a short real run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """train_vae on 8 shapes images (batch 8: every step sees the same fixed batch), 1 device, 12 steps."""
    workdir = str(tmp_path_factory.mktemp("vae_run"))
    c = tiny_vae_config(eval_every=0, eval_images=8, eval_batch=8, stats_images=8, export="ema")
    c.data.update(synthetic_examples=8, batch_size=8)
    c.train.update(
        steps=STEPS, lr=2e-3, warmup_steps=0, schedule="constant", log_every=1, checkpoint_every=STEPS, ema_decay=0.5
    )
    result = vae_train.train_vae(c, workdir, devices=jax.devices()[:1])
    return c, workdir, result


def test_run_reduces_reconstruction_loss_on_fixed_batch(vae_run):
    _, workdir, result = vae_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "rec" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["nonfinite"] == 0 and r["psnr_count"] == 8 for r in rows)
    first, last = rows[0]["rec"], np.mean([r["rec"] for r in rows[-3:]])
    assert last < 0.6 * first, (first, last)
    assert np.mean([r["psnr"] for r in rows[-3:]]) > rows[0]["psnr"] + 2.0
    assert np.isfinite(result["eval/psnr_ema"]) and np.isfinite(result["eval/psnr"])


def test_export_is_the_final_ema_params_with_latent_stats(vae_run):
    config, workdir, result = vae_run
    meta = vae_export.load_latent_stats(workdir)
    assert meta["scale_factor"] == pytest.approx(1.0 / meta["latent_std"])
    assert meta["shift_factor"] == meta["latent_mean"] and meta["step"] == STEPS and meta["weights"] == "ema"
    assert meta["vae"] == dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16, in_channels=3, out_ch=3)
    assert meta["psnr_eval"] == pytest.approx(result["eval/psnr_ema"])
    loaded = vae_export.load_vae_params(workdir)
    with ocp.PyTreeCheckpointer() as ckptr:
        saved = ckptr.restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    ema = saved["ema_params"]
    assert jax.tree.structure(loaded) == jax.tree.structure(ema)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # the same file, addressed three ways
    for path in (os.path.join(workdir, "export"), os.path.join(workdir, "export", "ae.safetensors")):
        np.testing.assert_array_equal(jax.tree.leaves(vae_export.load_vae_params(path))[0], jax.tree.leaves(loaded)[0])


def test_load_into_bagel_state_and_latents_are_normalised(vae_run):
    """load_vae_params round trip into a Bagel TrainState (the BAGEL stage's fresh-state hook), and the vae.json
    scale/shift make BAGEL's normalised latents of the training images zero-mean, unit-std."""
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.model.vae import FluxVAE, normalize_latent, sample_posterior, valid_mask
    from bagel_jax.parallel.mesh import logical_rules, make_mesh
    from bagel_jax.train.optim import make_optimizer
    from bagel_jax.train.state import abstract_state, state_shardings, with_pretrained

    vae_config, workdir, _ = vae_run
    config = shipped_config("tiny")
    config.model.vae.init_from = workdir
    stats = vae_export.apply_vae_init_config(config)
    assert (config.model.vae.scale_factor, config.model.vae.shift_factor) == (
        stats["scale_factor"],
        stats["shift_factor"],
    )
    devices = jax.devices()[:2]
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    _, init_fn = make_init_fn(config)
    optimizer, _ = make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    shardings = state_shardings(init_fn, optimizer, mesh, rules)
    rng = np.random.default_rng(0)  # a Bagel TrainState with random values (no init compile), sharded as in train.py
    state = jax.tree.map(
        lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding),
        abstract_state(init_fn, optimizer, mesh, rules),
    )
    before = jax.tree.map(np.asarray, state.params)
    loaded = vae_export.load_vae_params(workdir)
    new = with_pretrained(state, shardings, "vae", loaded, "model.vae.init_from")
    assert "vae" not in new.ema_params  # frozen: held once, in params
    for a, b, s in zip(
        jax.tree.leaves(new.params["vae"]), jax.tree.leaves(loaded), jax.tree.leaves(shardings.params["vae"])
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert a.sharding == s
    for key in before:
        if key != "vae":
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.params[key]), before[key])
    assert jax.tree.structure(new) == jax.tree.structure(state)
    opt_paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(new.opt_state)]
    assert opt_paths and not [p for p in opt_paths if "['vae']" in p]  # frozen: no optimizer state

    data = vae_train.training_images(vae_config, 8)
    x = jnp.asarray(data["images"], jnp.float32) / 127.5 - 1.0
    vae = FluxVAE(config.model.vae)
    mean, logvar = vae.apply({"params": new.params["vae"]}, x, data["hw"], method=FluxVAE.encode)
    z = normalize_latent(sample_posterior(mean, logvar, jax.random.PRNGKey(5)), config.model.vae)
    m = np.asarray(valid_mask(jnp.asarray(data["hw"]) // 8, *z.shape[1:3]))
    vals = np.asarray(z)[np.broadcast_to(m, z.shape) > 0]
    assert abs(vals.mean()) < 0.05 and abs(vals.std() - 1.0) < 0.05, (vals.mean(), vals.std())


def test_init_from_errors_name_the_key(vae_run, tmp_path):
    _, workdir, _ = vae_run
    c = tiny_vae_config()
    c.model.vae.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.vae.init_from"):
        vae_export.apply_vae_init_config(c)
    c.model.vae.init_from = workdir
    c.model.vae.ch = 64
    with pytest.raises(ConfigError, match="^model.vae.ch: 64 differs"):
        vae_export.apply_vae_init_config(c)
    with pytest.raises(ConfigError, match="^model.vae.ch: "):
        vae_export.load_vae_params(workdir, c.model.vae)
