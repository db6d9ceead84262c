"""``python -m bagel_jax.convert.export``: a run's checkpoint → the release layout (key set and shapes of
``official_shapes``), read back by the converter exactly (f32), bf16 = the rounded values; user errors one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import bagel_testlib as lib
from bagel_jax.convert import bagel_ckpt as bc
from bagel_jax.convert import param_subtree
from bagel_jax.convert.export import export_run, main
from bagel_jax.convert.fixed_params import fixed_mask, fixed_params
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.train.checkpoint import Checkpointer
from bagel_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(tmp_path, scan_layers=False):
    """A workdir as the trainer leaves it (config.json, checkpoint 5 with params ≠ EMA), without training."""
    config = lib.tiny_config()
    config.model.scan_layers = config.model.vit.scan_layers = scan_layers
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"a tokenizer")
    config.data.tokenizer = str(tok)
    src = tmp_path / "src"
    bc.write_random_checkpoint(str(src), config.model, seed=1)
    params, ema = bc.load_params(str(src), config.model), None
    bc.write_random_checkpoint(str(tmp_path / "src_ema"), config.model, seed=2)
    ema = bc.load_params(str(tmp_path / "src_ema"), config.model)
    # as the trainer holds them: the fixed params (the frozen VAE, the sin-cos tables) are the config's, the EMA has
    # the trained leaves only
    fixed = jax.device_get(fixed_params(config, make_init_fn(config)[1]))
    params = param_subtree.merge(params, fixed)
    ema = param_subtree.select(ema, jax.tree.map(lambda f: not f, fixed_mask(ema)))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    state = TrainState(
        step=jnp.int32(5),
        params=jax.tree.map(jnp.asarray, params),
        opt_state={},
        ema_params=jax.tree.map(jnp.asarray, ema),
        rng=jax.random.PRNGKey(0),
        nonfinite_steps=jnp.int32(0),
    )
    ckpt = Checkpointer(str(workdir))
    ckpt.save(5, state)
    ckpt.close()
    return config, str(workdir), params, param_subtree.merge(params, ema)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_round_trip_is_exact_in_f32(tmp_path, scan_layers):
    config, workdir, params, ema = _fake_run(tmp_path, scan_layers)
    out = str(tmp_path / "out")
    summary = export_run(workdir, out, which="ema", dtype="float32")
    assert summary["step"] == 5
    with safe_open(os.path.join(out, bc.EMA_FILE), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == bc.official_shapes(config.model)
    assert sorted(os.listdir(out)) == sorted([bc.EMA_FILE, bc.AE_FILE, bc.LLM_CONFIG, bc.VIT_CONFIG, "tokenizer.model"])
    cfg = bc.config_from_checkpoint(out, config.model)
    got = bc.load_params(out, cfg)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)
    raw = bc.load_params(export_run(workdir, str(tmp_path / "raw"), which="params", dtype="float32")["out"], cfg)
    for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_export_bf16_is_the_rounded_params(tmp_path):
    import ml_dtypes

    config, workdir, _, ema = _fake_run(tmp_path)
    out = str(tmp_path / "bf16")
    export_run(workdir, out)  # defaults: ema, bfloat16
    got = bc.load_params(out, config.model)
    for a, b in zip(jax.tree.leaves(got["language_model"]), jax.tree.leaves(ema["language_model"]), strict=True):
        np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_export_user_errors_are_one_line(tmp_path, capsys):
    config, workdir, _, _ = _fake_run(tmp_path)
    cases = [
        ([f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'o1'}"], "--workdir"),
        ([f"--workdir={tmp_path}", f"--out={tmp_path / 'o2'}"], "config.json"),
        ([f"--workdir={workdir}", f"--out={workdir}"], "--out"),
    ]
    for argv, names in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_train_export_infer(tmp_path):
    """tiny_shapes: 2 steps → export (the command) → the converter reads the EMA exactly → the inference CLI
    answers from the exported folder."""
    from bagel_jax.convert.run_checkpoint import load_params
    from bagel_jax.train.train import train
    from configs_util import shipped_config

    c = shipped_config("tiny_shapes")
    c.train.update(steps=2, checkpoint_every=2)
    c.data.update(synthetic_examples=24)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "release")
    train(c, workdir, devices=jax.devices()[:1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "bagel_jax.convert.export", f"--workdir={workdir}", f"--out={out}", "--dtype=float32"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(os.path.join(out, bc.EMA_FILE), framework="numpy") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == bc.official_shapes(c.model)
    import flax.linen as nn

    from bagel_jax.model.bagel import make_init_fn

    abstract = nn.unbox(jax.eval_shape(make_init_fn(c)[1], jax.random.PRNGKey(0)))
    # the checkpoint leaves out the fixed params (frozen VAE, sin-cos tables): the config rebuilds them
    want = load_params(workdir, abstract, use_ema=True, base=fixed_params(c, make_init_fn(c)[1]))
    got = bc.load_params(out, c.model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    png = str(tmp_path / "x.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bagel_jax.infer.cli",
            f"--checkpoint={out}",
            "--mode=t2i",
            "--prompt=a red circle",
            "--num_timesteps=2",
            f"--out={png}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and os.path.getsize(png) > 0, proc.stderr[-3000:]
