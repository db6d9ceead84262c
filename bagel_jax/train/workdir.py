"""A run's workdir before training starts: the directory, the synthetic data built into it when the config asks,
and the resolved ``config.json`` (what ``bagel_jax.infer.from_workdir`` reads back)."""

from __future__ import annotations

import os

import jax


def prepare_data(config, workdir: str) -> None:
    """Resolves ``data.data_dir`` (default ``workdir/data``) and builds synthetic shapes there when asked."""
    if not config.data.data_dir:
        config.data.data_dir = os.path.join(workdir, "data")
    if config.data.builder == "synthetic_shapes" and config.data.synthetic_examples > 0:
        from bagel_jax.data.builders import synthetic_shapes

        if jax.process_index() == 0:  # the workdir is shared by all hosts: one builds, the others wait
            synthetic_shapes.build(
                config.data.data_dir,
                num_examples=config.data.synthetic_examples,
                seed=config.data.seed,
                vocab_size=config.model.vocab_size,
                square=config.data.synthetic_square,
                question_weights=tuple(config.data.synthetic_question_weights),
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("bagel_jax:synthetic_data_built")


def write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(config.to_json_best_effort(indent=2, sort_keys=True))


def prepare_workdir(config, workdir: str, build_data: bool = True) -> None:
    """Creates ``workdir``, builds the synthetic data there when the config asks (``build_data``) and writes the
    resolved config.json."""
    os.makedirs(workdir, exist_ok=True)
    if build_data:
        prepare_data(config, workdir)
    write_config(config, workdir)


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirLock:
    """An exclusive lock on ``<workdir>/lock`` for the life of one trainer (process 0 takes it for the run).

    ``fcntl.flock``: the kernel releases it when the holder exits, however it dies, so a lock left by a dead process
    is simply taken over; the file records who holds it (host, pid, start time) for the refusal message. On a
    filesystem without ``flock`` support (some network mounts) it warns and runs unlocked.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        self._fh = None

    def acquire(self) -> WorkdirLock:
        import fcntl
        import socket
        import time

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise WorkdirLocked(
                f"{os.path.dirname(self.path)}: in use by a running trainer ({holder}); "
                f"stop it or choose another --workdir"
            ) from None
        except OSError as e:  # no flock on this filesystem
            import logging

            logging.warning("%s: cannot lock (%s); make sure no other trainer uses this workdir", self.path, e)
            fh.close()
            return self
        fh.seek(0)
        fh.truncate()
        fh.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim(workdir: str):
    """Creates ``workdir`` and, on process 0, holds its ``WorkdirLock`` for the ``with`` block."""
    import contextlib

    os.makedirs(workdir, exist_ok=True)
    return WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
