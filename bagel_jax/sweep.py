r"""Runs a sweep on this machine, one point after another, and prints a table of final metrics.

    python -m bagel_jax.sweep --config=configs/tiny_shapes.py --sweep=configs/sweeps/tiny_lr_shift.py \
        --workdir=/tmp/sweep [--limit=2] [--trainer_arg=--config.train.steps=5]

Each point runs ``python -m bagel_jax.train --config=… <point overrides> --workdir=<workdir>/<point>``
as a subprocess (its output in ``<point>/sweep_run.log``). The table reads the last record of each
run's ``metrics.jsonl`` (JSON lines with at least ``step``, ``ce``, ``mse``); it is also written to
``<workdir>/summary.json``. Exit status 1 if any run failed. Meant for tiny CPU configs; on TPUs use
``launch/xm_launch.py`` or ``launch/gcloud/``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from bagel_jax import launch_utils as lu

METRIC_COLUMNS = ("step", "ce", "mse")


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` in file order ([] if the file is missing)."""
    path = Path(workdir) / lu.METRICS_FILE
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise lu.LaunchError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        if not isinstance(record, dict):
            raise lu.LaunchError(f"{path}:{n}: not a JSON object")
        records.append(record)
    return records


def final_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The training record with the highest step (one that has ``ce`` or ``mse``); {} if none."""
    training = [r for r in records if "step" in r and ("ce" in r or "mse" in r)]
    return dict(max(training, key=lambda r: r["step"])) if training else {}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table, one line per row; missing cells print as ``-``."""
    cells = [[str(c) for c in columns]] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_point(
    index: int, point: Mapping[str, Any], config: str, workdir: str, extra: Sequence[str], python: str, module: str
) -> dict[str, Any]:
    """Runs one point to completion; returns its summary row (overrides, status, final metrics, time)."""
    point_dir = Path(lu.point_workdir(workdir, index, point))
    point_dir.mkdir(parents=True, exist_ok=True)
    argv = [python, "-m", module, *lu.trainer_args(config, str(point_dir), point, extra)]
    log = point_dir / "sweep_run.log"
    print(f"[{index}] {lu.shell_join(argv)}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    row = {
        "point": index,
        **point,
        "status": "ok" if code == 0 else f"failed ({code})",
        "seconds": round(seconds, 1),
        "workdir": str(point_dir),
    }
    row.update({k: v for k, v in final_metrics(read_metrics(point_dir)).items() if k in METRIC_COLUMNS})
    if code != 0:
        tail = log.read_text().splitlines()[-5:]
        print(f"[{index}] failed with exit status {code}; last lines of {log}:\n  " + "\n  ".join(tail), flush=True)
    return row


def run_sweep(
    config: str,
    sweep: str,
    workdir: str,
    limit: int = 0,
    extra: Sequence[str] = (),
    python: str | None = None,
    module: str = lu.TRAIN_MODULE,
) -> list[dict[str, Any]]:
    """Runs the first ``limit`` points (all if 0) sequentially; returns one summary row per point."""
    points = lu.load_points(config, sweep)
    if limit:
        points = points[:limit]
    rows = [run_point(i, p, config, workdir, extra, python or sys.executable, module) for i, p in enumerate(points)]
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = []
    for row in rows:
        keys += [k for k in row if "." in k and k not in keys]  # the overrides, in sweep order
    return format_table(rows, ["point", *keys, "status", *METRIC_COLUMNS, "seconds"])


def define_flags():
    """The command-line flags; defined only when run as a program, so importing stays side-effect free."""
    flags.DEFINE_string("config", None, "Trainer config file path[:arg].")
    flags.DEFINE_string("sweep", None, "Sweep file path[:arg] defining get_sweep(arg) -> list of override dicts.")
    flags.DEFINE_string("workdir", None, "Base directory; point i runs in <workdir>/<i>_<overrides>.")
    flags.DEFINE_integer("limit", 0, "Run only the first N points (0: all).")
    flags.DEFINE_multi_string("trainer_arg", [], "Extra trainer flag for every point, verbatim (repeatable).")
    flags.DEFINE_string("trainer_module", lu.TRAIN_MODULE, "Module run with python -m for each point.")


def check_trainer_args(config: str, extra: Sequence[str]) -> None:
    """Raises ``LaunchError`` for a ``--config.<key>=…`` trainer flag whose key the config lacks (before any point
    runs; the trainer checks the values)."""
    from bagel_jax.config import config_keys, unknown_key_message

    known = None
    for arg in extra:
        if arg.startswith("--config."):
            known = known if known is not None else config_keys(lu.load_config(config))
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known and not any(key.startswith(k + ".") for k in known):
                raise lu.LaunchError(f"--trainer_arg={arg}: {unknown_key_message(key, known)}")


def main(argv):
    """A bad flag, config, sweep file or point is one line on stderr and exit status 2, before any point runs; a
    failed point makes the exit status 1 (its log's last lines are printed)."""
    from bagel_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    for name in ("config", "sweep", "workdir"):
        if not FLAGS[name].value:
            cli.fail(f"--{name} is required")
    if FLAGS.limit < 0:
        cli.fail(f"--limit: must be >= 0, got {FLAGS.limit}")
    with cli.user_errors():
        check_trainer_args(FLAGS.config, FLAGS.trainer_arg)
        rows = run_sweep(
            FLAGS.config, FLAGS.sweep, FLAGS.workdir, FLAGS.limit, FLAGS.trainer_arg, module=FLAGS.trainer_module
        )
    print(summary_table(rows), flush=True)
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    from bagel_jax import cli

    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
