"""``train.init_from`` = a release folder: every tensor read straight into its shards (8 CPU devices, fsdp 8 and
fsdp 4 × tensor 2) equals the converter's ``load_params`` bitwise (f32), with the rules' shardings; bad folders are
one-line errors naming the file or key, before anything is created or written."""

from __future__ import annotations

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.config import ConfigError
from bagel_jax.convert import bagel_ckpt as bc
from bagel_jax.convert import param_subtree
from bagel_jax.convert.release_sharded import load_release_sharded
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.parallel.mesh import logical_rules, make_mesh
from bagel_jax.train.checkpoint import Checkpointer, check_init_from, restore_or_init
from bagel_jax.train.optim import make_optimizer
from bagel_jax.train.state import state_shardings


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = lib.tiny_config().model
    d = str(tmp_path_factory.mktemp("release"))
    bc.write_random_checkpoint(d, cfg, seed=5)
    return d


def _config(release_dir, scan_layers=False, **parallel):
    c = lib.tiny_config()
    c.model.scan_layers = c.model.vit.scan_layers = scan_layers
    c.data.batch_size = 8
    c.parallel.update({**dict(data=1, fsdp=1, tensor=1), **parallel})
    c.train.init_from = release_dir
    return c


def _fresh_state(config, workdir):
    _, init_fn = make_init_fn(config)
    mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
    optimizer, _ = make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    ckpt = Checkpointer(workdir)
    try:
        return restore_or_init(ckpt, init_fn, optimizer, mesh, rules, jax.random.PRNGKey(0), config)
    finally:
        ckpt.close()


def _check_params(params, shardings, want):
    assert jax.tree.structure(jax.device_get(params)) == jax.tree.structure(want)
    sharded = 0
    for (kp, got), sharding, ref in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings), jax.tree.leaves(want), strict=True
    ):
        name = jax.tree_util.keystr(kp)
        assert got.sharding == sharding, name
        assert got.dtype == ref.dtype == np.float32, name
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=name)  # bitwise (f32 → f32)
        sharded += any(s is not None for s in sharding.spec)
    assert sharded > 20  # the rules do shard most weights on these meshes
    embed = params["language_model"]["embed_tokens"]["embedding"]
    assert len({str(s.index) for s in embed.addressable_shards}) == 8  # 8 distinct slices, one per device


@pytest.mark.parametrize(
    "parallel,scan",
    [(dict(fsdp=8), False), (dict(fsdp=4, tensor=2), False), (dict(fsdp=4, tensor=2), True)],
    ids=["fsdp8", "fsdp4_tensor2", "scan"],
)
def test_release_loads_sharded_equal_to_the_converter(release, parallel, scan):
    """The loader on the trainer's param shardings (from the logical rules; no state is compiled)."""
    config = _config(release, scan_layers=scan, **parallel)
    _, init_fn = make_init_fn(config)
    optimizer, _ = make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
    shardings = state_shardings(init_fn, optimizer, mesh, rules).params
    like = nn.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    params = load_release_sharded(release, config.model, shardings, like)
    _check_params(params, shardings, bc.load_params(release, config.model))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [dict(fsdp=8), dict(fsdp=4, tensor=2)], ids=["fsdp8", "fsdp4_tensor2"])
def test_restore_or_init_reads_the_release(release, tmp_path, parallel):
    """A fresh start of the trainer (``restore_or_init``): params and EMA = the release, zero moments, step 0."""
    config = _config(release, **parallel)
    state, shardings, data_state = _fresh_state(config, str(tmp_path / "run"))
    assert data_state is None and int(state.step) == 0
    want = bc.load_params(release, config.model)
    _check_params(state.params, shardings.params, want)
    ema_want = param_subtree.like(want, state.ema_params)  # the EMA holds the trainable leaves: no VAE, no tables
    assert "vae" not in state.ema_params and "latent_pos_embed" not in state.ema_params
    _check_params(state.ema_params, shardings.ema_params, ema_want)
    moments = jax.tree.leaves(jax.device_get(state.opt_state))
    assert all(float(np.abs(x).max()) == 0 for x in moments if np.issubdtype(np.asarray(x).dtype, np.floating))


def _broken(release, tmp_path, how):
    d = str(tmp_path / how)
    shutil.copytree(release, d)
    if how == "no_ae":
        os.remove(os.path.join(d, bc.AE_FILE))
    elif how == "truncated":
        path = os.path.join(d, bc.EMA_FILE)
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(size - 100)
    return d


@pytest.mark.parametrize(
    "how,config_key,names",
    [
        ("no_ae", None, bc.AE_FILE),
        ("truncated", None, bc.EMA_FILE),
        ("ok", "num_layers", "model.num_layers"),
        ("ok", "vocab_size", "model.vocab_size"),
        ("ok", "max_latent_size", "model.max_latent_size"),
        ("ok", "vit_max_num_patch_per_side", "vit_max_num"),
        ("ok", "qk_norm", "model.qk_norm"),
        ("ok", "hidden_size", "model.hidden_size"),
    ],
)
def test_bad_release_is_one_line_naming_file_or_key(release, tmp_path, how, config_key, names):
    d = _broken(release, tmp_path, how) if how != "ok" else release
    config = _config(d, fsdp=8)
    if config_key:
        v = config.model[config_key]
        config.model[config_key] = (not v) if isinstance(v, bool) else v // 2 if config_key.startswith("vit") else v * 2
    with pytest.raises(ConfigError) as e:
        check_init_from(config)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.init_from: ") and names in msg, msg
    if config_key:
        assert str(config.model[config_key]) in msg  # both values
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError):
        _fresh_state(config, str(workdir))  # the loader checks before it creates the state
    assert not os.path.exists(workdir / "checkpoints" / "0")


@pytest.mark.slow
def test_train_from_release_then_restart_resumes_its_own_checkpoint(tmp_path):
    """tiny_shapes from a release folder (with its tokenizer) on fsdp 4 × tensor 2: trains with the release's tokenizer
    (copied into the workdir), checkpoints; the restart resumes that checkpoint (the release is gone by then) with the
    run's copy of the tokenizer and trains on."""
    from bagel_jax.train.train import train
    from configs_util import shipped_config

    c = shipped_config("tiny_shapes")
    c.train.update(steps=2, checkpoint_every=2, log_every=1)
    c.data.update(synthetic_examples=24, batch_size=8)
    c.parallel.update(data=1, fsdp=4, tensor=2)
    release_dir = str(tmp_path / "release")
    bc.write_random_checkpoint(release_dir, c.model, seed=7)
    from bagel_jax.data.builders import synthetic_shapes
    from bagel_jax.data.tokenizer import train_sentencepiece

    shipped = train_sentencepiece(synthetic_shapes.corpus(), os.path.join(release_dir, "tokenizer.model"), 300).path
    c.train.init_from = release_dir
    workdir = str(tmp_path / "run")
    train(c, workdir, devices=jax.devices())
    import json

    with open(os.path.join(workdir, "config.json")) as fh:  # the run reads (and keeps) the release's tokenizer
        own = json.load(fh)["data"]["tokenizer"]
    assert own == os.path.join(workdir, "tokenizer.model") and open(own, "rb").read() == open(shipped, "rb").read()
    saved = Checkpointer(workdir)
    assert saved.all_steps() == [2]
    saved.close()
    shutil.rmtree(release_dir)  # a restart must not read it
    c.train.steps = 3
    c.data.tokenizer = ""  # as a user restarts it: the run's own copy is found
    train(c, workdir, devices=jax.devices())

    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [r for r in map(json.loads, fh) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    resumed = Checkpointer(workdir)
    assert resumed.all_steps() == [2, 3]
    resumed.close()


@pytest.mark.parametrize(
    "how,extra,names",
    [
        ("no_ae", [], bc.AE_FILE),
        pytest.param("truncated", [], bc.EMA_FILE, marks=pytest.mark.slow),
        pytest.param("ok", ["--config.model.num_layers=4"], "model.num_layers", marks=pytest.mark.slow),
        pytest.param("tokenizer", [], "data.tokenizer", marks=pytest.mark.slow),
    ],
)
def test_cli_bad_release_writes_nothing(release, tmp_path, how, extra, names):
    """``python -m bagel_jax.train`` from a bad release folder (missing ae.safetensors, a truncated weights file, a
    config mismatch, a tokenizer other than the release's): one line naming the file or key, exit 2, no workdir
    content."""
    import subprocess
    import sys

    d = _broken(release, tmp_path, how) if how != "ok" else release
    if how == "tokenizer":  # the release ships one tokenizer, data.tokenizer names another
        from bagel_jax.data.builders import synthetic_shapes
        from bagel_jax.data.tokenizer import train_sentencepiece

        corpus = list(synthetic_shapes.corpus())
        train_sentencepiece(corpus, os.path.join(d, "tokenizer.model"), vocab_size=200)
        other = train_sentencepiece(corpus[:50], str(tmp_path / "other.model"), vocab_size=120).path
        extra = [f"--config.data.tokenizer={other}"]
    workdir = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bagel_jax.train",
            "--config=configs/tiny_shapes.py",
            f"--workdir={workdir}",
            f"--config.train.init_from={d}",
            *extra,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], lines
    assert not workdir.exists() or not any(workdir.iterdir())
