"""The absl entry point shared by the trainers: ``--config`` (a get_config() file), ``--workdir``, the
multi-host flags of ``bagel_jax.distributed``; prints the final scalars as one JSON line on host 0.

Before anything is built it checks the flags, the config (``config.validate`` against the devices) and the
filesystem (``config.check_paths``): a user error is one line on stderr and exit status 2 (``bagel_jax.cli``).
A run with nothing to do (``train.steps=0``, or a workdir already trained to ``train.steps``) says so in one line
and exits 0. A run that stops itself (non-finite steps, a failed checkpoint write) prints one line and exits 1; a
workdir held by another trainer is a user error (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

# stage -> the file its trainer writes last (None: the last checkpoint); a workdir that has it and a checkpoint at
# train.steps is finished
DONE_FILES = {"bagel": None, "vae": os.path.join("export", "vae.json"), "vit": os.path.join("export", "vit_stage.json")}


def nothing_to_do(config, workdir: str, stage: str = "bagel") -> str | None:
    """Why a run of ``config`` in ``workdir`` would train nothing (one line), or None."""
    from bagel_jax.config import latest_checkpoint

    steps = config.train.steps
    if steps == 0:
        return "train.steps=0: nothing to train"
    latest = latest_checkpoint(workdir)
    done = DONE_FILES[stage]
    if latest is not None and latest >= steps and (done is None or os.path.isfile(os.path.join(workdir, done))):
        return (
            f"{workdir}: already trained to step {latest} (train.steps={steps}); nothing to do "
            f"(raise --config.train.steps to train on)"
        )
    return None


def preflight(config, workdir: str, stage: str = "bagel") -> None:
    """The checks that need no model: the config against the schema and this job's devices and hosts; exits 0 with
    one line if there is nothing to train; then the filesystem. Raises ``ConfigError``."""
    import jax

    from bagel_jax import cli
    from bagel_jax.config import check_paths, latest_checkpoint, validate

    devices = jax.devices()
    validate(config, num_devices=len(devices), platform=jax.default_backend(), num_processes=jax.process_count())
    reason = nothing_to_do(config, workdir, stage)
    if reason:
        cli.say_and_exit(reason)
    if stage == "bagel":
        from bagel_jax.train.release_tokenizer import resolve_tokenizer

        resolve_tokenizer(config, workdir)  # train.init_from = a release folder: data.tokenizer from it
    check_paths(config, workdir, stage)
    if stage == "bagel" and config.train.init_from and latest_checkpoint(workdir) is None:
        from bagel_jax.train.checkpoint import check_init_from

        check_init_from(config)  # a release folder against the model config: json and headers only


def _resolve(train_fn: Callable | str) -> Callable:
    if callable(train_fn):
        return train_fn
    import importlib

    module, _, name = train_fn.partition(":")
    return getattr(importlib.import_module(module), name)


def run(train_fn: Callable | str, *, example_config: str, workdir_help: str, stage: str = "bagel") -> None:
    """Parses flags and calls ``train_fn(config, workdir) -> dict`` after multi-host start-up and ``preflight``.

    ``train_fn`` may be ``"package.module:function"``, imported only once the checks passed (a user error then
    costs the import of jax, not of the model and the data pipeline). ``stage`` (bagel | vae | vit): which inputs
    ``config.check_paths`` looks for, and what a finished workdir holds.
    """
    from bagel_jax import cli, huge_pages

    huge_pages.reexec_with_huge_pages()  # on CPU: XLA's large buffers on huge pages (re-executes once)
    cli.quiet_platforms()
    from absl import app, flags
    from ml_collections import config_flags

    from bagel_jax import distributed  # defines --coordinator_address/--num_processes/--process_id
    from bagel_jax.config import validate

    config_flags.DEFINE_config_file(
        "config", None, f"Python config file (get_config()), e.g. {example_config}", lock_config=True
    )
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}")
        cli.quiet_libraries()
        import jax

        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        with cli.user_errors():
            validate(config)  # the config alone, before waiting for other hosts
            try:
                distributed.initialize_distributed()
            except ValueError as e:
                if not str(e).startswith("distributed:"):
                    raise
                raise cli.InputError(str(e)) from None
            preflight(config, workdir, stage)
            train = _resolve(train_fn)
            from bagel_jax.train.checkpoint import CheckpointWriteError
            from bagel_jax.train.nonfinite import NonFiniteError
            from bagel_jax.train.workdir import WorkdirLocked

            try:
                result = train(config, workdir)
            except WorkdirLocked as e:
                raise cli.InputError(str(e)) from None
            except (NonFiniteError, CheckpointWriteError) as e:  # the run stopped: one line, exit status 1
                sys.stdout.flush()
                sys.stderr.write(f"error: {cli.one_line(e)}\n")
                sys.exit(1)
        if jax.process_index() == 0:
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, sort_keys=True))

    app.run(main, flags_parser=cli.parse_flags)
