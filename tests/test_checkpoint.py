"""Orbax checkpoints: bitwise resume with the data stream, resharding restore (8 → 4 devices), keep-N,
init_from, kill -9 during an async save, SIGTERM → checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import train_toy as T
from bagel_jax.train.checkpoint import Checkpointer, load_params, restore_or_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(T.host_tree(a)), jax.tree.leaves(T.host_tree(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """8 devices (2,2,2): 3 steps, async save at step 3 (with the data state), then 3 more steps (which
    donate the saved state's buffers while the save may still be writing)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    run = T.toy_run(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(workdir, keep=2)
    data = T.ToyData(8)
    state, first = run.run(run.init(), data, 3)
    at_3 = T.host_tree(state)
    ckpt.save(3, state, data.get_state())
    state, rest = run.run(state, data, 3)
    ckpt.close()
    return workdir, at_3, [h["loss"] for h in first + rest], T.host_tree(state)


def test_resume_is_bitwise(saved_run):
    workdir, at_3, losses, final = saved_run
    run = T.toy_run(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(workdir, keep=2)
    assert ckpt.latest_step() == 3
    state, shardings, data_state = restore_or_init(
        ckpt, T.init_fn, run.tx, run.mesh, run.rules, jax.random.PRNGKey(123), run.config
    )
    assert data_state == {"next_index": 3}
    _leaves_equal(state, at_3)
    data = T.ToyData(8)
    data.set_state(data_state)
    state, rest = run.run(state, data, 3)
    assert [h["loss"] for h in rest] == losses[3:]
    _leaves_equal(state, final)
    ckpt.close()


def test_restore_on_four_devices_reshards_and_continues(saved_run):
    workdir, at_3, losses, final = saved_run
    run = T.toy_run(num_devices=4, data=1, fsdp=4)
    ckpt = Checkpointer(workdir)
    state, data_state = ckpt.restore(run.abstract())
    ckpt.close()
    _leaves_equal(state, at_3)
    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    for tree in (state.params, state.ema_params, adam.mu, adam.nu):
        leaf = tree["language_model"]["embed_tokens"]
        assert leaf.sharding.mesh.devices.size == 4 and leaf.sharding.spec == P("tensor", "fsdp")
        assert {s.data.shape for s in leaf.addressable_shards} == {(64, 8)}  # fsdp=4 splits embed 32 → 8
    data = T.ToyData(8)
    data.set_state(data_state)
    state, rest = run.run(state, data, 3)
    np.testing.assert_allclose([h["loss"] for h in rest], losses[3:], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(T.host_tree(state.params)), jax.tree.leaves(final.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_keep_n_and_init_from(saved_run, tmp_path):
    workdir, at_3, _, _ = saved_run
    run = T.toy_run(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(str(tmp_path / "keep"), keep=2)
    state = run.init()
    for step in (1, 2, 3):
        ckpt.save(step, state)
    ckpt.close()
    assert Checkpointer(str(tmp_path / "keep")).all_steps() == [2, 3]

    abstract = run.abstract().params
    # a converted checkpoint: a plain params pytree
    with ocp.StandardCheckpointer() as saver:
        saver.save(str(tmp_path / "converted"), at_3.params)
    config = T.toy_config(data=2, fsdp=2, tensor=2)
    config.train.init_from = str(tmp_path / "converted")
    fresh = Checkpointer(str(tmp_path / "finetune"))
    state, _, data_state = restore_or_init(fresh, T.init_fn, run.tx, run.mesh, run.rules, jax.random.PRNGKey(0), config)
    fresh.close()
    assert data_state is None and int(state.step) == 0
    _leaves_equal(state.params, at_3.params)
    _leaves_equal(state.ema_params, at_3.params)
    moments = jax.tree.leaves(T.host_tree(state.opt_state))
    assert moments and all(float(np.abs(x).max()) == 0 for x in moments)  # all() of nothing is True
    assert state.params["language_model"]["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    # another run's checkpoint directory: its EMA
    _leaves_equal(load_params(workdir, abstract, use_ema=True), at_3.ema_params)


def test_data_state_is_one_json_file_per_host(tmp_path):
    """grain's handler writes this host's state as ``process_<i>-of-<n>.json``; a host-count change names itself."""
    state = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    data_state = {"pipeline": {"next": [1, 2]}, "skipped": [0, 3], "rows": 5}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(4, state, data_state)
    ckpt.close()
    data_dir = tmp_path / "checkpoints" / "4" / "data"
    assert [p.name for p in data_dir.glob("*.json")] == ["process_0-of-1.json"]
    assert (data_dir / "process_0-of-1.json").read_text() == json.dumps(data_state)
    restored, got = Checkpointer(str(tmp_path)).restore(abstract)
    assert got == data_state
    np.testing.assert_array_equal(restored["w"], state["w"])
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")  # saved by 2 hosts
    with pytest.raises(
        FileNotFoundError,
        match=r"process_0-of-1\.json: no data-iterator state for this host "
        r"\(found \[.*'process_0-of-2\.json'\]\); the host count changed",
    ):
        Checkpointer(str(tmp_path)).restore(abstract)
    _, got = Checkpointer(str(tmp_path)).restore(abstract, data=False)
    assert got is None


def _python(script: str, *args, devices: int = 1):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


BIG = """
import flax.linen as nn, jax, jax.numpy as jnp
from bagel_jax.parallel.mesh import logical_rules, make_mesh
from bagel_jax.train.optim import make_optimizer
from bagel_jax.train.state import create_train_state
import train_toy as T

def big_init(rng):  # 4096 x 2048 f32 = 32 MiB; params + mu + nu + EMA = 128 MiB to write
    return {"language_model": {"w": nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))(
        rng, (4096, 2048))}}

config = T.toy_config(data=1)
mesh, rules = make_mesh(config, jax.devices()[:1]), logical_rules(config)
tx, _ = make_optimizer(config.train, jax.eval_shape(big_init, jax.random.PRNGKey(0)))
state, shardings = create_train_state(big_init, tx, mesh, rules, jax.random.PRNGKey(0))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
"""


def test_kill_9_during_async_save_keeps_previous_checkpoint(tmp_path):
    proc = _python(
        BIG
        + """
import os, signal, sys
from bagel_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=3)
ckpt.save(1, state, {"next_index": 1})
ckpt.wait()
print("digest:", T.digest(state), flush=True)
bumped = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
ckpt.save(2, bumped, {"next_index": 2})
print("in flight:", ckpt.manager.is_saving_in_progress(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
""",
        str(tmp_path),
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert "in flight: True" in out, out
    built = {}
    exec(textwrap.dedent(BIG), built)  # the same state structure and shardings, built here
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [1]
    restored, data_state = ckpt.restore(built["abstract"])
    ckpt.close()
    assert data_state == {"next_index": 1}
    assert T.digest(restored) == out.split("digest:")[1].split()[0]  # bitwise what step 1 held


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    proc = _python(
        """
import sys, time, jax
import train_toy as T
from bagel_jax.train.checkpoint import Checkpointer, restore_or_init
run = T.toy_run(num_devices=2, data=2)
ckpt = Checkpointer(sys.argv[1], handle_sigterm=True)
state, _, _ = restore_or_init(ckpt, T.init_fn, run.tx, run.mesh, run.rules, jax.random.PRNGKey(1), run.config)
data = T.ToyData(8)
for _ in range(100000):
    state, _ = run.run(state, data, 1)
    step = int(state.step)
    if step == 2:
        print("ready", flush=True)
    if ckpt.stop_requested(step):
        ckpt.save(step, state, data.get_state())
        ckpt.close()
        print("saved", step, flush=True)
        sys.exit(0)
    time.sleep(0.01)
sys.exit(3)
""",
        str(tmp_path),
        devices=2,
    )
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved_step = int(out.split("saved")[1])
    assert saved_step >= 2
    # restore the 2-device checkpoint on 8 devices
    run = T.toy_run(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == saved_step
    state, data_state = ckpt.restore(run.abstract())
    ckpt.close()
    assert int(state.step) == saved_step and data_state == {"next_index": saved_step}
