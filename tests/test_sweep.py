"""The local sweep runner: metrics reading, the summary table, subprocess orchestration, and (slow) a
2-point tiny sweep end to end with the real trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bagel_jax import launch_utils as lu
from bagel_jax import sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP = "configs/sweeps/tiny_lr_shift.py"


def write_jsonl(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_final_metrics_and_table(tmp_path):
    write_jsonl(
        tmp_path / "a",
        [
            {"step": 1, "ce": 5.0, "mse": 2.0},
            {"step": 3, "ce": 4.0, "mse": 1.5},
            {"step": 3, "eval_ce": 9.0},
            {"step": 2, "ce": 4.5, "mse": 1.7},
            {"note": "x"},
        ],
    )
    records = sweep.read_metrics(tmp_path / "a")
    assert len(records) == 5
    assert sweep.final_metrics(records) == {"step": 3, "ce": 4.0, "mse": 1.5}
    assert sweep.read_metrics(tmp_path / "missing") == [] and sweep.final_metrics([]) == {}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(lu.LaunchError, match=r"metrics.jsonl:2: not a JSON object"):
        sweep.read_metrics(tmp_path / "bad")
    rows = [
        {"point": 0, "train.lr": 0.001, "status": "ok", "step": 3, "ce": 4.0, "mse": 1.23456789},
        {"point": 1, "train.lr": 0.003, "status": "failed (1)"},
    ]
    table = sweep.summary_table(rows).splitlines()
    assert table[0].split() == ["point", "train.lr", "status", "step", "ce", "mse", "seconds"]
    assert set(table[1]) <= {"-", " "}
    assert table[2].split() == ["0", "0.001", "ok", "3", "4", "1.235", "-"]
    assert table[3].split() == ["1", "0.003", "failed", "(1)", "-", "-", "-", "-"]


STAND_IN = '''
"""Stand-in with the trainer's command-line contract: parses --config (config_flags) and --workdir, writes
metrics.jsonl whose values are functions of the config, so the test sees which overrides arrived."""
from absl import app, flags
from ml_collections import config_flags
import json, os, sys

config_flags.DEFINE_config_file("config", None, lock_config=True)
flags.DEFINE_string("workdir", None, "")

def main(_):
    c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if c.train.lr > 0.002:
        print("diverged", file=sys.stderr)
        sys.exit(3)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(1, c.train.steps + 1):
            f.write(json.dumps({"step": step, "ce": c.train.lr * 1000 / step, "mse": c.model.timestep_shift,
                                "name": c.name}) + "\\n")

app.run(main)
'''


def test_runner_runs_each_point_in_its_own_workdir(tmp_path, monkeypatch, capsys):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "stand_in_train.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "pkg"), str(REPO)]))
    monkeypatch.chdir(REPO)
    name = "sweep 'one' \"two\""
    rows = sweep.run_sweep(
        "configs/tiny.py",
        SWEEP + ":4",
        str(tmp_path / "sw"),
        limit=3,
        extra=[f"--config.name={name}"],
        module="stand_in_train",
    )
    assert [r["point"] for r in rows] == [0, 1, 2]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed (3)"]
    for row, shift in zip(rows[:2], (1.0, 3.0)):
        assert row["step"] == 4 and row["ce"] == pytest.approx(1e-3 * 1000 / 4) and row["mse"] == shift
        records = sweep.read_metrics(row["workdir"])
        assert records[-1]["name"] == name and len(records) == 4
    assert Path(rows[2]["workdir"], "sweep_run.log").read_text().strip().endswith("diverged")
    assert "ce" not in rows[2]
    assert json.loads((tmp_path / "sw" / "summary.json").read_text()) == rows
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == [
        "00_lr=0.001_timestep_shift=1_steps=4",
        "01_lr=0.001_timestep_shift=3_steps=4",
        "02_lr=0.003_timestep_shift=1_steps=4",
        "summary.json",
    ]
    printed = capsys.readouterr().out
    assert "[2] failed with exit status 3" in printed and "diverged" in printed


@pytest.mark.slow
def test_tiny_sweep_end_to_end_with_trainer(tmp_path):
    """2 points of the tiny lr × shift sweep, 3 steps each, with the real trainer; prints the table."""
    workdir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "bagel_jax.sweep",
        "--config=configs/tiny_shapes.py",
        f"--sweep={SWEEP}:3",
        f"--workdir={workdir}",
        "--limit=2",
        "--trainer_arg=--config.data.synthetic_examples=40",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not the 8 simulated
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, timeout=1800, env={**env, "JAX_PLATFORMS": "cpu"}
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [row["status"] for row in summary] == ["ok", "ok"]
    table = out.stdout.strip().splitlines()[-4:]
    assert table[0].split() == [
        "point",
        "train.lr",
        "model.timestep_shift",
        "train.steps",
        "status",
        "step",
        "ce",
        "mse",
        "seconds",
    ]
    for row, line in zip(summary, table[2:]):
        final = sweep.final_metrics(sweep.read_metrics(row["workdir"]))
        assert final["step"] == 3 and row["ce"] == final["ce"] and row["mse"] == final["mse"]
        assert line.split()[:5] == [
            str(row["point"]),
            f"{row['train.lr']:.4g}",
            f"{row['model.timestep_shift']:.4g}",
            "3",
            "ok",
        ]
