"""Compiled inference programs shared by every caller of the same model configuration.

``jax.jit`` keeps its compiled executables on the jitted function object, so a program built anew per
``Inferencer`` recompiles. ``shared_program`` builds each program once per (program, model config) and hands the
same jitted function to every later caller (another ``Inferencer`` on other params, the trainer's next eval):
the same shapes never compile twice in a process.
"""
from __future__ import annotations

from typing import Callable

_PROGRAMS: dict[tuple[str, str, str], Callable] = {}


def shared_program(model, name: str, build: Callable) -> Callable:
    """``build(model)`` (a jitted function) for ``model``'s class and config, built on first use."""
    key = (name, type(model).__name__, model.cfg.to_json_best_effort(sort_keys=True))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build(model)
    return _PROGRAMS[key]
