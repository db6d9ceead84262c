"""The shipped configs for tests (not a test module), loaded the way the launchers load ``--config`` files."""

from __future__ import annotations

import os

import ml_collections

from bagel_jax.launch_utils import load_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_config(spec: str) -> ml_collections.ConfigDict:
    """``"name[:arg]"`` → ``get_config([arg])`` of ``configs/<name>.py``."""
    name, sep, arg = spec.partition(":")
    return load_config(os.path.join(CONFIG_DIR, f"{name}.py") + sep + arg)
