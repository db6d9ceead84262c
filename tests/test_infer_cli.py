"""The inference CLI end to end on a random tiny checkpoint (subprocesses, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

import bagel_testlib as lib


def _run(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "bagel_jax.infer.cli", *args],
        cwd=lib.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_t2i_then_understanding(tmp_path):
    ckpt, png = tmp_path / "ckpt", tmp_path / "out" / "x.png"
    r = _run(
        [
            "--random_tiny",
            f"--checkpoint={ckpt}",
            "--mode=t2i",
            "--prompt=a red square on the left",
            f"--out={png}",
            "--num_timesteps=3",
            "--seed=1",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.model"):
        assert (ckpt / name).exists(), name
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
        assert np.asarray(img).std() > 0

    answer = tmp_path / "answer.txt"
    r = _run(
        [
            f"--checkpoint={ckpt}",
            "--config=configs/tiny.py",
            "--mode=understand",
            f"--image={png}",
            "--prompt=what is in the image",
            "--max_length=4",
            f"--out={answer}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert answer.read_text().strip() == r.stdout.strip().splitlines()[-1].strip()


def test_cli_rejects_bad_arguments(tmp_path):
    r = _run(["--random_tiny", "--mode=edit", "--prompt=x", f"--out={tmp_path / 'x.png'}"], tmp_path)
    assert r.returncode == 2 and "--mode=edit needs --image" in r.stderr
    r = _run(["--mode=t2i", "--prompt=x", f"--out={tmp_path / 'x.png'}"], tmp_path)
    assert r.returncode == 2 and "--checkpoint is required" in r.stderr


def test_random_tiny_is_written_once_per_model_shape(tmp_path, monkeypatch):
    """--random_tiny without --checkpoint: one cached directory per model config, reused, no temp dirs left."""
    from bagel_jax.infer import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = lib.tiny_config()
    first = cli.random_tiny_dir(config)
    stamp = os.stat(os.path.join(first, "ema.safetensors")).st_mtime_ns
    assert cli.random_tiny_dir(config) == first and os.stat(os.path.join(first, "ema.safetensors")).st_mtime_ns == stamp
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(first, name)), name
    config.model.num_layers = 1
    second = cli.random_tiny_dir(config)
    assert second != first and os.path.dirname(second) == os.path.dirname(first)
    assert sorted(os.listdir(os.path.dirname(first))) == sorted(os.path.basename(d) for d in (first, second))


def test_cli_inputs_beyond_the_limits_are_one_line_errors(tmp_path, monkeypatch):
    """An output size beyond the latent position table, a prompt longer than the KV cache: exit 2, one line naming
    the limit, no traceback."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    png = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    r = _run(
        ["--random_tiny", "--mode=t2i", "--prompt=a red square", "--height=1024", f"--out={tmp_path / 'x.png'}"],
        tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "max_latent_size=" in r.stderr
    r = _run(
        [
            "--random_tiny",
            "--mode=understand",
            f"--image={png}",
            "--prompt=what is in the image",
            "--max_context_tokens=16",
        ],
        tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "max_context_tokens=16" in r.stderr.strip().splitlines()[-1]
