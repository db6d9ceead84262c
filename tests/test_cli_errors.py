"""Every CLI on every class of bad config / input, run as a user runs it (``python -m ...`` subprocesses): exactly one
line on stderr naming the key or file, exit status 2, and no compile (``JAX_LOG_COMPILES=1`` logs a line per compile
to stderr, so one line means none; the control test shows the flag reaches a compile through absl)."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from bagel_jax import cli
from bagel_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VAE, VIT, AOT = "bagel_jax.train", "bagel_jax.train.vae_train", "bagel_jax.train.vit_train", "bagel_jax.aot"
SWEEP, EVAL, INFER = "bagel_jax.sweep", "bagel_jax.eval.runner", "bagel_jax.infer.cli"
SECONDS = 60  # a bad input fails in seconds; compiling the tiny model alone takes 15-25 s on 2 cores


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return dict(env, PYTHONPATH=ROOT, JAX_LOG_COMPILES="1", **extra)


def run_cli(module: str, args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=SECONDS * 3,
    )


@pytest.fixture
def paths(tmp_path):
    """Files and directories the cases refer to: ``{name}`` in a case's args is formatted with these."""
    file = tmp_path / "a_file"
    file.write_text("x")
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not an image")
    run = tmp_path / "run"  # a training workdir that has started (config.json) but saved no checkpoint yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(base_config().to_json(sort_keys=True))
    release = tmp_path / "release"  # a release-layout directory without weights
    release.mkdir()
    (release / "llm_config.json").write_text(json.dumps({}))
    return dict(
        tmp=str(tmp_path),
        wd=str(tmp_path / "wd"),
        file=str(file),
        bad_image=str(bad_image),
        run=str(run),
        release=str(release),
        missing=str(tmp_path / "missing"),
    )


TINY = ["--config=configs/tiny.py", "--workdir={wd}"]
SHAPES = TINY + ["--config.data.synthetic_examples=8"]  # the trainer would build the data: inputs exist
SWEEP_ARGS = ["--config=configs/tiny_shapes.py", "--workdir={wd}"]
T2I = ["--mode=t2i", "--prompt=a red circle", "--out={tmp}/x.png"]

# (id, module, args, the stderr line after "error: " must match this regex); FAST ones run in the default suite
CASES = [
    # the BAGEL trainer
    (
        "train/unknown_key",
        TRAIN,
        TINY + ["--config.train.lrr=1"],
        r"train\.lrr: unknown config key \(did you mean "
        r"train\.lr\?\)",
    ),
    ("train/unknown_section", TRAIN, TINY + ["--config.trainn.lr=1"], r"trainn\.lr: .*did you mean train\.lr\?"),
    ("train/bad_value", TRAIN, TINY + ["--config.train.lr=fast"], r"flag --config\.train\.lr=fast: "),
    ("train/missing_config", TRAIN, ["--config=configs/nope.py", "--workdir={wd}"], r"--config: .*nope\.py.*no such"),
    ("train/missing_flag", TRAIN, ["--config=configs/tiny.py"], r".*--workdir"),
    ("train/unknown_flag", TRAIN, TINY + ["--lr=1"], r"Unknown command line flag 'lr'"),
    ("train/positional", TRAIN, TINY + ["extra"], r"unexpected arguments \['extra'\]"),
    ("train/negative_steps", TRAIN, TINY + ["--config.train.steps=-5"], r"train\.steps: must be >= 0"),
    ("train/zero_interval", TRAIN, TINY + ["--config.train.checkpoint_every=0"], r"train\.checkpoint_every: "),
    ("train/zero_log_interval", TRAIN, TINY + ["--config.train.log_every=0"], r"train\.log_every: "),
    ("train/block_size", TRAIN, TINY + ["--config.model.attention_block_q=200"], r"model\.attention_block_q: .*128"),
    ("train/impl_vs_backend", TRAIN, TINY + ["--config.model.attention_impl=tpu"], r"model\.attention_impl: .*cpu"),
    ("train/accumulation", TRAIN, TINY + ["--config.train.grad_accum_steps=3"], r"train\.grad_accum_steps: "),
    ("train/mesh_vs_devices", TRAIN, TINY + ["--config.parallel.data=2"], r"parallel: .*1 are present"),
    ("train/schema_rule", TRAIN, TINY + ["--config.model.num_kv_heads=3"], r"model\.num_kv_heads: "),
    ("train/no_data", TRAIN, TINY, r"data\.data_dir: no built dataset 'synthetic_shapes'.*synthetic_examples"),
    ("train/missing_tokenizer", TRAIN, SHAPES + ["--config.data.tokenizer={missing}"], r"data\.tokenizer: .*missing"),
    ("train/missing_init_from", TRAIN, SHAPES + ["--config.train.init_from={missing}"], r"train\.init_from: "),
    ("train/missing_vae_init", TRAIN, SHAPES + ["--config.model.vae.init_from={tmp}"], r"model\.vae\.init_from: "),
    ("train/missing_vit_init", TRAIN, SHAPES + ["--config.model.vit.init_from={missing}"], r"model\.vit\.init_from: "),
    (
        "train/lora_rank",
        TRAIN,
        ["--config=configs/finetune_bagel_7b.py:lora", "--workdir={wd}", "--config.model.lora.rank=1000"],
        r"model\.lora\.rank: 1000 > the smaller dim 512 of the 'k' layers",
    ),
    (
        "train/finetune_variant",
        TRAIN,
        ["--config=configs/finetune_bagel_7b.py:qlora", "--workdir={wd}"],
        r"flag --config=configs/finetune_bagel_7b\.py:qlora: .*unknown variant 'qlora'",
    ),
    ("train/workdir_is_file", TRAIN, ["--config=configs/tiny.py", "--workdir={file}"], r"workdir: .*not a directory"),
    ("train/workdir_unwritable", TRAIN, ["--config=configs/tiny.py", "--workdir={file}/sub"], r"workdir: "),
    # the tower stages
    (
        "vae/unknown_key",
        VAE,
        ["--config=configs/tiny_vae.py", "--workdir={wd}", "--config.vae_stage.losss=l1"],
        r"vae_stage\.losss: .*did you mean vae_stage\.loss\?",
    ),
    (
        "vae/stage_rule",
        VAE,
        ["--config=configs/tiny_vae.py", "--workdir={wd}", "--config.vae_stage.loss=l3"],
        r"vae_stage\.loss: ",
    ),
    (
        "vae/no_data",
        VAE,
        ["--config=configs/tiny_vae.py", "--workdir={wd}", "--config.data.synthetic_examples=0"],
        r"data\.data_dir: .*data\.mixture\.t2i",
    ),
    (
        "vit/stage_rule",
        VIT,
        ["--config=configs/tiny_vit.py", "--workdir={wd}", "--config.vit_stage.eval_seed=42"],
        r"vit_stage\.eval_seed: ",
    ),
    (
        "vit/negative_steps",
        VIT,
        ["--config=configs/tiny_vit.py", "--workdir={wd}", "--config.train.steps=-1"],
        r"train\.steps: ",
    ),
    # the AOT planner (fails before libtpu builds the topology)
    (
        "aot/unknown_key",
        AOT,
        ["--config=configs/tiny.py", "--config.model.hiden_size=8"],
        r"model\.hiden_size: .*did you mean model\.hidden_size\?",
    ),
    (
        "aot/block_size",
        AOT,
        ["--config=configs/tiny.py", "--config.model.attention_block_kv=100"],
        r"model\.attention_block_kv: ",
    ),
    ("aot/unknown_loss", AOT, ["--config=configs/tiny.py", "--loss=nope"], r"--loss: unknown 'nope'"),
    ("aot/loss_module", AOT, ["--config=configs/tiny.py", "--loss=no_such_module:fn"], r"--loss=no_such_module:fn: "),
    # the local sweep runner (before any point runs)
    ("sweep/missing_sweep", SWEEP, SWEEP_ARGS + ["--sweep={missing}.py"], r"sweep .*missing\.py.*no such file"),
    (
        "sweep/bad_point",
        SWEEP,
        SWEEP_ARGS + ["--sweep=configs/sweeps/tiny_lr_shift.py:-3"],
        r"sweep point 0 .*train\.steps: must be >= 0",
    ),
    (
        "sweep/unknown_trainer_key",
        SWEEP,
        SWEEP_ARGS + ["--sweep=configs/sweeps/tiny_lr_shift.py", "--trainer_arg=--config.train.lrr=1"],
        r"--trainer_arg=.*train\.lrr: unknown config key \(did you mean train\.lr\?\)",
    ),
    ("sweep/missing_flag", SWEEP, ["--config=configs/tiny.py", "--workdir={wd}"], r"--sweep is required"),
    # the eval runner (before any weights load)
    ("eval/missing_workdir", EVAL, ["--workdir={missing}"], r"--workdir: .*missing is not a directory"),
    ("eval/no_checkpoint", EVAL, ["--workdir={run}"], r"--workdir: .*has no checkpoint .*--params=untrained"),
    ("eval/bad_fns", EVAL, ["--fns=no_such_module:f"], r"--fns=no_such_module:f: cannot import"),
    (
        "eval/unknown_key",
        EVAL,
        ["--config=configs/tiny.py", "--config.evalz.x=1", "--fns=a:b"],
        r"evalz\.x: unknown config key \(did you mean evals\?\)",
    ),
    ("eval/unknown_only", EVAL, ["--fns=bagel_jax.eval.runner:ground_truth_fns", "--only=zz"], r"--only: "),
    (
        "eval/unwritable_output",
        EVAL,
        ["--fns=bagel_jax.eval.runner:ground_truth_fns", "--output={file}/m.json"],
        r"--output: ",
    ),
    # the inference CLI (before any weights load)
    (
        "infer/missing_image",
        INFER,
        ["--random_tiny", "--mode=understand", "--prompt=q", "--image={missing}.png"],
        r"--image: .*missing\.png: No such file",
    ),
    (
        "infer/unreadable_image",
        INFER,
        ["--random_tiny", "--mode=understand", "--prompt=q", "--image={bad_image}"],
        r"--image: .*bad\.png: undecodable image",
    ),
    (
        "infer/workdir_as_checkpoint",
        INFER,
        ["--checkpoint={run}"] + T2I,
        r"--checkpoint: .*run is a training workdir .*bagel_jax\.eval\.runner --workdir=",
    ),
    ("infer/missing_checkpoint", INFER, ["--checkpoint={missing}"] + T2I, r"--checkpoint: .*missing does not exist"),
    ("infer/no_tokenizer", INFER, ["--checkpoint={release}"] + T2I, r"--tokenizer: no tokenizer\.json or "),
    ("infer/unwritable_out", INFER, ["--random_tiny", "--mode=t2i", "--prompt=x", "--out={file}/x.png"], r"--out: "),
    ("infer/bad_number", INFER, ["--random_tiny"] + T2I + ["--cfg_interval=0.4"], r"--cfg_interval: "),
    ("infer/bad_choice", INFER, ["--random_tiny", "--mode=paint"], r"argument --mode: invalid choice"),
    ("infer/missing_config", INFER, ["--random_tiny"] + T2I + ["--config={missing}.py"], r"--config: "),
    (
        "infer/unknown_config_key",
        INFER,
        ["--random_tiny"] + T2I + ["--config.parallel.fsdq=2"],
        r"--config\.parallel\.fsdq: unknown config key \(did you mean parallel\.fsdp\?\)",
    ),
    ("infer/stray_argument", INFER, ["--random_tiny"] + T2I + ["--fsdp=2"], r"unrecognized arguments: --fsdp=2"),
    (
        "infer/bad_config_value",
        INFER,
        ["--random_tiny"] + T2I + ["--config=configs/tiny_repro.py:big"],
        r"--config=.*tiny_repro\.py:big: .*unknown argument 'big'",
    ),
]
# one or two of each kind in the default suite (each costs a python start; the trainer's ~1-3 s): the rest is slow
FAST = {
    "train/unknown_key",
    "train/negative_steps",
    "train/zero_interval",
    "train/block_size",
    "train/impl_vs_backend",
    "train/accumulation",
    "train/no_data",
    "train/missing_tokenizer",
    "train/missing_init_from",
    "train/lora_rank",
    "train/workdir_unwritable",
    "train/missing_config",
    "vae/stage_rule",
    "vit/stage_rule",
    "aot/unknown_key",
    "sweep/bad_point",
    "sweep/unknown_trainer_key",
    "eval/no_checkpoint",
    "eval/bad_fns",
    "infer/missing_image",
    "infer/unreadable_image",
    "infer/workdir_as_checkpoint",
    "infer/unwritable_out",
    "infer/unknown_config_key",
}


def _params():
    return [
        pytest.param(module, args, pattern, id=name, marks=() if name in FAST else pytest.mark.slow)
        for name, module, args, pattern in CASES
    ]


@pytest.mark.parametrize("module,args,pattern", _params())
def test_user_error_is_one_line_exit_2_before_any_compile(module, args, pattern, paths):
    start = time.perf_counter()
    r = run_cli(module, [a.format(**paths) for a in args], JAX_PLATFORMS="cpu")
    seconds = time.perf_counter() - start
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, f"exit {r.returncode}, stderr:\n{r.stderr[-3000:]}"
    assert re.match("error: " + pattern, lines[0]), lines[0]
    assert "Compiling" not in r.stderr and seconds < SECONDS, seconds
    assert not os.path.exists(paths["wd"]) or not os.listdir(paths["wd"]), "a failed start left files in the workdir"


def test_compile_log_reaches_stderr_through_absl():
    """The control for the test above: with JAX_LOG_COMPILES=1 a compile in an absl program writes 'Compiling'."""
    code = "import jax; from absl import app; app.run(lambda argv: print(jax.jit(lambda x: x + 1)(1)))"
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=SECONDS
    )
    assert r.returncode == 0 and "Compiling" in r.stderr, r.stderr[-2000:]


def test_nothing_to_train_is_one_line_exit_0(paths):
    r = run_cli(TRAIN, [a.format(**paths) for a in TINY + ["--config.train.steps=0"]], JAX_PLATFORMS="cpu")
    assert r.returncode == 0 and r.stdout.strip() == "train.steps=0: nothing to train" and not r.stderr, r


@pytest.mark.skipif(cli.tpu_may_be_present() or cli.gpu_may_be_present(), reason="a machine with accelerators")
def test_cpu_only_machine_never_loads_libtpu(paths):
    """Without JAX_PLATFORMS, on a machine without TPU chips, the CLIs keep jax from trying libtpu: no libtpu
    warnings on stderr, no libtpu log files of this process."""
    before = set(glob.glob("/tmp/tpu_logs/*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", TRAIN, *[a.format(**paths) for a in TINY]],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=SECONDS)
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert not [f for f in set(glob.glob("/tmp/tpu_logs/*")) - before if f.endswith(f".{proc.pid}")]


def test_a_finished_workdir_has_nothing_to_do(tmp_path):
    """A workdir whose newest checkpoint reached train.steps (and, for a tower stage, whose export was written) is
    finished: the trainers say so and exit 0 instead of starting."""
    from bagel_jax.train.app import nothing_to_do

    config = base_config()
    config.train.steps = 30
    assert nothing_to_do(config, str(tmp_path)) is None
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()  # a save that never finished
    assert nothing_to_do(config, str(tmp_path)) is None
    (tmp_path / "checkpoints" / "30").mkdir()
    assert nothing_to_do(config, str(tmp_path)) == (
        f"{tmp_path}: already trained to step 30 (train.steps=30); "
        "nothing to do (raise --config.train.steps to train on)"
    )
    assert nothing_to_do(config, str(tmp_path), "vae") is None  # trained, but the export is missing: redo it
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "vae.json").write_text("{}")
    assert nothing_to_do(config, str(tmp_path), "vae").startswith(f"{tmp_path}: already trained")
    config.train.steps = 0
    assert nothing_to_do(config, str(tmp_path / "new")) == "train.steps=0: nothing to train"
