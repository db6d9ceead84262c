"""In-run samples and evals on every host (slow): two processes on loopback (2 CPU devices each) train the tiny
config with ``train.sample_every`` and ``config.evals`` on, run inference on the train state's sharded EMA, and
write the same sample PNGs, sample answer and eval scores as one process on 4 devices reading as two hosts
(``data.emulate_hosts=2``); only process 0 writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_distributed import clean_env, free_port, run_processes

CONFIG = """
import os
from bagel_jax.launch_utils import load_config

def get_config(arg=None):
    c = load_config(os.path.join({configs!r}, "tiny_shapes.py"))
    # sized so that the samples and the evals share their programs (2 images of 50 steps, 1 answer of 32 tokens)
    c.train.update(steps=2, checkpoint_every=1000, sample_every=2, sample_steps=50)
    c.data.update(batch_size=4, synthetic_examples=40)
    c.evals = dict(
        geneval=dict(type="shapes_geneval", num_examples=1, categories=("single_object", "colors"), every=2),
        vqa=dict(type="shapes_vqa", num_examples=1, every=2),
    )
    return c
"""


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _outputs(workdir: Path):
    rows = _rows(workdir)
    scores = {k: v for r in rows for k, v in r.items() if k.startswith("eval/") and not k.endswith("/seconds")}
    answers = [r["sample_answer"] for r in rows if "sample_answer" in r]
    pngs = sorted((workdir / "samples" / "2").glob("*.png"))
    return scores, answers, [np.asarray(Image.open(p), np.int32) for p in pngs]


@pytest.mark.slow
def test_two_processes_sample_and_evaluate_like_one(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "multihost_evals.py"
    config.write_text(CONFIG.format(configs=str(repo / "configs")))
    common = [sys.executable, "-m", "bagel_jax.train", f"--config={config}"]
    run_processes(
        [[*common, f"--workdir={tmp_path / 'single'}", "--config.data.emulate_hosts=2"]],
        clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        timeout=1800,
    )
    address = f"127.0.0.1:{free_port()}"
    run_processes(
        [
            [*common, f"--workdir={tmp_path / 'multi'}", f"--coordinator_address={address}", "--num_processes=2"]
            + [f"--process_id={i}"]
            for i in range(2)
        ],
        clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        timeout=1800,
    )
    single, multi = _outputs(tmp_path / "single"), _outputs(tmp_path / "multi")
    scores, answers, images = single
    assert {"eval/geneval/overall", "eval/vqa/overall"} <= set(scores) and len(answers) == 1 and len(images) == 2
    assert multi[0].keys() == scores.keys()
    np.testing.assert_allclose([multi[0][k] for k in scores], list(scores.values()), atol=1e-6)
    assert multi[1] == answers
    assert len(multi[2]) == len(images)
    for a, b in zip(images, multi[2]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 2  # same program on the same mesh; f32 reduction order
