"""The absl entry point shared by the trainers: ``--config`` (a get_config() file), ``--workdir``, the
multi-host flags of ``bagel_jax.distributed``; prints the final scalars as one JSON line on host 0."""
from __future__ import annotations

import json
from typing import Callable


def run(train_fn: Callable, *, example_config: str, workdir_help: str) -> None:
    """Parses flags and calls ``train_fn(config, workdir) -> dict`` after multi-host start-up."""
    from absl import app, flags
    from ml_collections import config_flags

    from bagel_jax import distributed  # defines --coordinator_address/--num_processes/--process_id

    config_flags.DEFINE_config_file("config", None, f"Python config file (get_config()), e.g. {example_config}",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        import jax
        distributed.initialize_distributed()
        result = train_fn(flags.FLAGS.config, flags.FLAGS.workdir)
        if jax.process_index() == 0:
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, sort_keys=True))

    app.run(main)
