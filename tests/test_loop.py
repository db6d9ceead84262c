"""The one training loop (bagel_jax/train/loop.py), for each stage: BAGEL, the VAE stage and the ViT stage all
train through ``loop.run``, and a step's checkpoint is written (and finished) before its evals run, so an eval
that raises stops the run with that step on disk, readable."""

import json
import os

import jax
import orbax.checkpoint as ocp
import pytest

from bagel_jax.launch_utils import load_config
from bagel_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bagel(monkeypatch):
    from bagel_jax.eval import runner
    from bagel_jax.train.train import train

    monkeypatch.setattr(runner, "run_evals", _broken)
    c = load_config(os.path.join(ROOT, "configs", "tiny_shapes.py"))
    c.data.synthetic_examples = 40
    c.evals = dict(vqa=dict(type="shapes_vqa", num_examples=1, every=2))
    return c, train


def _vae(monkeypatch):
    from bagel_jax.train import vae_train

    monkeypatch.setattr(vae_train.ReconEval, "__call__", _broken)
    c = load_config(os.path.join(ROOT, "configs", "tiny_vae.py"))
    c.data.update(synthetic_examples=8, batch_size=2, vae_image_size=(32, 32), vae_transform=(32, 16, 16))
    c.vae_stage.update(eval_every=2, eval_images=2, eval_batch=2, stats_images=2)
    return c, vae_train.train_vae


def _vit(monkeypatch):
    from bagel_jax.train import vit_train

    monkeypatch.setattr(vit_train.CellEval, "__call__", _broken)
    c = load_config(os.path.join(ROOT, "configs", "tiny_vit.py"))
    c.data.update(synthetic_examples=16, batch_size=4)
    c.vit_stage.update(eval_every=2, eval_images=4, eval_batch=4)
    return c, vit_train.train_vit


def _broken(*args, **kwargs):
    raise RuntimeError("eval broke")


@pytest.mark.parametrize("make", [_bagel, _vae, _vit], ids=["bagel", "vae", "vit"])
def test_a_failing_eval_loses_no_training(make, tmp_path, monkeypatch):
    config, train_fn = make(monkeypatch)
    config.train.update(steps=4, checkpoint_every=2, log_every=1)
    stages = []
    real_run = loop.run

    def spy(config, workdir, stage, devices=None):
        stages.append(stage.name)
        return real_run(config, workdir, stage, devices)

    monkeypatch.setattr(loop, "run", spy)

    with pytest.raises(RuntimeError, match="eval broke"):
        train_fn(config, str(tmp_path), devices=jax.devices()[:1])
    assert len(stages) == 1  # the stage went through the one loop
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    with open(tmp_path / "metrics.jsonl") as fh:
        assert [r["step"] for r in map(json.loads, fh) if "loss" in r] == [1, 2]
    with ocp.PyTreeCheckpointer() as ckptr:
        assert int(ckptr.restore(str(tmp_path / "checkpoints" / "2" / "state"))["step"]) == 2


# --- what the loop guarantees, on the toy model (tests/train_toy.py) ----------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import train_toy as T  # noqa: E402
from bagel_jax.train.checkpoint import Checkpointer, CheckpointWriteError  # noqa: E402
from bagel_jax.train.nonfinite import NonFiniteError  # noqa: E402
from bagel_jax.train.workdir import WorkdirLock, WorkdirLocked  # noqa: E402


class NanData(T.ToyData):
    """ToyData whose batches with index in ``bad`` carry NaN patches (a loss spike the step cannot apply)."""

    def __init__(self, rows, bad=()):
        super().__init__(rows)
        self.bad, self.served = set(bad), []

    def __next__(self):
        index = self.next_index
        batch = super().__next__()
        self.served.append(index)
        if index in self.bad:
            batch["patches"] = np.full_like(batch["patches"], np.nan)
        return batch


def toy_stage(data):
    return loop.Stage(
        name="toy", init_fn=T.init_fn, loss_fn=T.deterministic_loss_fn, make_data=lambda index, count: data
    )


def toy_config(**train):
    c = T.toy_config(data=1)
    c.train.update(dict(steps=12, checkpoint_every=3, log_every=1, keep_checkpoints=0), **train)
    return c


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def run_toy(workdir, data, **train):
    return loop.run(toy_config(**train), str(workdir), toy_stage(data), devices=jax.devices()[:1])


def test_rollback_resumes_before_the_nan_skips_batches_and_finishes_finite(tmp_path):
    data = NanData(8, bad={6})  # step 7 sees the spike
    result = run_toy(tmp_path, data, nonfinite="rollback", rollback_skip_batches=2, max_rollbacks=2)
    # steps 1-7 ate batches 0-6; back to checkpoint 6 (next batch 6), batches 6 and 7 skipped, steps 7-12 eat 8-13
    assert data.served == list(range(7)) + [6, 7] + list(range(8, 14))
    got = rows(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 13))  # no duplicate steps: the replayed row 7 is gone
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in got)
    assert got[-1]["rollbacks"] == 1 and result["rollbacks"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "3", "6", "9"]


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    data = NanData(8, bad=set(range(6, 40)))  # every batch from step 7 on is bad
    with pytest.raises(NonFiniteError, match="after 2 rollbacks"):
        run_toy(tmp_path, data, nonfinite="rollback", rollback_skip_batches=1, max_rollbacks=2)
    assert os.listdir(tmp_path / "checkpoints") and "9" not in os.listdir(tmp_path / "checkpoints")


def test_skip_halts_after_consecutive_nonfinite_steps(tmp_path):
    with pytest.raises(NonFiniteError, match="4 non-finite steps in a row"):
        run_toy(tmp_path, NanData(8, bad=set(range(2, 40))), nonfinite="skip", max_consecutive_nonfinite=4)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_halt_restarts_from_an_older_checkpoint_when_the_newest_goes_nonfinite(tmp_path):
    # the state of checkpoint 6 is "exploded": from it, every batch fails (a restart from it would halt forever)
    with pytest.raises(NonFiniteError, match="train.nonfinite=halt"):
        run_toy(tmp_path, NanData(8, bad={6}), nonfinite="halt")
    assert "6" in os.listdir(tmp_path / "checkpoints")
    with pytest.raises(NonFiniteError, match="train.nonfinite=halt"):
        run_toy(tmp_path, NanData(8, bad=set(range(6, 40))), nonfinite="halt")  # from 6: fails before 9 -> 6 bad
    data = NanData(8)
    run_toy(tmp_path, data, nonfinite="halt")  # the next start resumes from 3, sets 6 aside, and finishes
    assert data.served[0] == 3
    names = os.listdir(tmp_path / "checkpoints")
    assert "6.set_aside" in names and {"3", "6", "9", "12"} <= set(names)
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 13))


def test_keep_checkpoints_never_removes_the_newest(tmp_path):
    state = {"w": np.arange(4.0)}
    for keep, want in ((1, [5]), (2, [4, 5]), (0, [1, 2, 3, 4, 5])):
        ckpt = Checkpointer(str(tmp_path / str(keep)), keep=keep)
        for step in range(1, 6):
            ckpt.save(step, state)
        ckpt.close()
        assert Checkpointer(str(tmp_path / str(keep)), keep=keep).all_steps() == want, keep


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/checkpoints`` on its own 4 MiB tmpfs (needs root, as in CI), unmounted afterwards."""
    mount = tmp_path / "checkpoints"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({proc.stderr.strip()}); CI runs this as root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous(tmp_path, small_disk):
    """The disk fills up after checkpoint 3: writing checkpoint 6 fails, the run stops with one clear error (not a
    stream of background-thread tracebacks) and checkpoint 3 still restores."""

    class DiskFillsUp(NanData):
        def __next__(self):
            if self.next_index == 4:  # step 5: once checkpoint 3 has committed, fill the disk
                deadline = time.time() + 60
                while not (small_disk / "3").exists() and time.time() < deadline:
                    time.sleep(0.05)
                try:  # the checkpoints may have filled the disk already: then even the open fails, which is fine
                    with open(small_disk / "filler", "wb") as fh:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                except OSError:
                    pass
            return super().__next__()

    with pytest.raises(CheckpointWriteError, match="checkpoint.*failed.*the previous checkpoint is intact"):
        run_toy(tmp_path, DiskFillsUp(8))
    assert max(r["step"] for r in rows(tmp_path)) < 12
    os.remove(small_disk / "filler")
    with ocp.PyTreeCheckpointer() as ckptr:
        assert int(ckptr.restore(str(small_disk / "3" / "state"))["step"]) == 3


def test_workdir_lock_refuses_a_second_trainer_and_takes_over_a_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                f"import sys, time; sys.path.insert(0, {ROOT!r})\n"
                "from bagel_jax.train.workdir import WorkdirLock\n"
                f"lock = WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLocked, match=f"in use by a running trainer .*pid {holder.pid}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()  # kill -9: the lock file stays, its holder is gone
        holder.wait()
    with WorkdirLock(str(tmp_path)) as lock:
        assert f"pid {os.getpid()}" in open(lock.path).read()


def test_metrics_continue_without_duplicates_after_kill_9(tmp_path):
    """A trainer killed with SIGKILL after it logged steps beyond its last checkpoint; the restart replays them."""
    script = (
        "import sys; sys.path[:0] = [{!r}, {!r}]\n"
        "import jax, train_toy as T\n"
        "from bagel_jax.train import loop\n"
        "c = T.toy_config(data=1)\n"
        "c.train.update(steps=1000, checkpoint_every=4, log_every=1, keep_checkpoints=0)\n"
        "stage = loop.Stage(name='toy', init_fn=T.init_fn, loss_fn=T.deterministic_loss_fn,\n"
        "                   make_data=lambda i, n: T.ToyData(8))\n"
        "loop.run(c, {!r}, stage, devices=jax.devices()[:1])\n"
    ).format(ROOT, os.path.join(ROOT, "tests"), str(tmp_path))
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [r["step"] for r in rows(tmp_path)] if (tmp_path / "metrics.jsonl").exists() else []
            if len(done) >= 10 and max(done) % 4 not in (0,):
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    logged = [r["step"] for r in rows(tmp_path)]
    kept = Checkpointer(str(tmp_path)).all_steps()
    assert logged and max(logged) > max(kept), (logged, kept)  # steps after the last checkpoint were logged
    run_toy(tmp_path, T.ToyData(8), steps=max(logged) + 3)
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, max(logged) + 4))
