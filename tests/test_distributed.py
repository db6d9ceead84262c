"""Multi-host start-up (bagel_jax.distributed): two CPU processes on loopback find each other and reduce
across processes; a single host stays single-process; (slow) two processes train the tiny config like one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bagel_jax import distributed

REPO = Path(__file__).resolve().parents[1]

WORKER = r'''
"""One process of a 2-process CPU job: starts via bagel_jax.distributed's absl flags, then reduces across
processes (a jitted global sum and a shard_map psum) and prints one JSON line."""
import json, os
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from absl import app
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from bagel_jax import distributed

def main(_):
    started = distributed.initialize_distributed()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    pid = jax.process_index()
    local = np.arange(jax.local_device_count() * 3, dtype=np.float32).reshape(-1, 3) + 100 * pid
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "data"), mesh=mesh, in_specs=P("data"),
                                 out_specs=P()))(x)
    print(json.dumps(dict(started=started, index=pid, count=jax.process_count(), devices=jax.device_count(),
                          local=jax.local_device_count(), main=distributed.is_main_process(),
                          total=float(total), psum=np.asarray(psum.addressable_data(0)).tolist(),
                          describe=distributed.describe())), flush=True)
    jax.distributed.shutdown()

app.run(main)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    # no persistent compilation cache across jax.distributed processes: each compiles its own programs, as a pod does
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false", **extra)
    return env


def run_processes(argvs, env, timeout):
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for argv in argvs
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    return [out for _, out, _ in outs]


def test_two_processes_on_loopback_reduce_across_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    address = f"127.0.0.1:{free_port()}"
    outs = run_processes(
        [
            [sys.executable, str(script), f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
            for i in range(2)
        ],
        clean_env(),
        timeout=180,
    )
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    # Formula: process p holds rows arange(6).reshape(2, 3) + 100 p on its 2 devices.
    shards = [np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * p for p in range(2)]
    expected_total = float(sum(s.sum() for s in shards))
    expected_psum = np.concatenate(shards).sum(0, keepdims=True).tolist()
    for i, r in enumerate(results):
        assert r["started"] is True and r["index"] == i and r["count"] == 2
        assert r["devices"] == 4 and r["local"] == 2 and r["main"] == (i == 0)
        assert r["total"] == expected_total and r["psum"] == expected_psum
        assert r["describe"] == f"process {i}/2: 2 local of 4 devices (cpu)"


def test_single_host_is_a_no_op():
    assert distributed.initialize_distributed() is False
    assert distributed.initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=1, process_id=0) is False
    assert not jax.distributed.is_initialized()
    assert distributed.on_cloud_tpu_vm() is False  # this CPU host has no TPU chips on its PCI bus
    assert distributed.is_main_process() and jax.process_count() == 1


def test_incomplete_or_bad_explicit_arguments():
    with pytest.raises(ValueError, match="must be given together"):
        distributed.initialize_distributed(coordinator_address="127.0.0.1:1234")
    with pytest.raises(ValueError, match="must be given together"):
        distributed.initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id 2 not in \[0, num_processes=2\)"):
        distributed.initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)


def _metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_two_process_tiny_training_matches_one_process(tmp_path):
    """Two processes × 2 CPU devices vs one process × 4 devices reading as 2 hosts (data.emulate_hosts=2):
    same global mesh and batch, so the
    losses of every step (functions of the state after the previous update) agree to tolerance."""
    steps = 4
    common = [
        sys.executable,
        "-m",
        "bagel_jax.train",
        "--config=configs/tiny_shapes.py",
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=1000",
        "--config.data.batch_size=4",
        "--config.data.synthetic_examples=40",
    ]
    run_processes(
        [[*common, f"--workdir={tmp_path / 'single'}", "--config.data.emulate_hosts=2"]],
        clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        timeout=1800,
    )
    address = f"127.0.0.1:{free_port()}"
    run_processes(
        [
            [
                *common,
                f"--workdir={tmp_path / 'multi'}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            for i in range(2)
        ],
        clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        timeout=1800,
    )
    single = [r for r in _metrics(tmp_path / "single") if "ce" in r]
    multi = [r for r in _metrics(tmp_path / "multi") if "ce" in r]
    assert [r["step"] for r in single] == [r["step"] for r in multi] and single[-1]["step"] == steps
    for a, b in zip(single, multi):
        np.testing.assert_allclose([a["ce"], a["mse"]], [b["ce"], b["mse"]], rtol=2e-4, atol=1e-5)
