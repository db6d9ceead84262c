"""Shared pieces of the launchers: sweep files, config overrides as trainer flags, shell quoting.

Contract with the trainer (an absl app using ``ml_collections.config_flags``)::

    python -m bagel_jax.train --config=configs/x.py[:arg] --config.a.b=v ... --workdir=DIR

A sweep file defines ``get_sweep(arg=None) -> list[dict]``; every dict maps dotted config keys
(``"train.lr"``) to values and is one run. ``override_flags`` turns such a dict into
``--config.<key>=<value>`` arguments that ``config_flags`` parses back to the same values (strings
are passed raw, so a value with spaces or quotes survives as long as the *argv* is kept intact;
``shell_join`` quotes an argv for a POSIX shell).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

TRAIN_MODULE = "bagel_jax.train"
METRICS_FILE = "metrics.jsonl"


class LaunchError(ValueError):
    """A bad sweep file, override or launch argument; the message is one line naming the culprit."""


# --- config / sweep files ----------------------------------------------------------------------------


def split_file_arg(spec: str) -> tuple[str, str | None]:
    """``"configs/x.py:arg"`` → ``("configs/x.py", "arg")``; ``"configs/x.py"`` → ``(…, None)``."""
    path, sep, arg = spec.partition(".py:")
    if sep:
        return path + ".py", arg
    return spec, None


def _load_module(path: str, what: str):
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"{what} {path!r}: no such file")
    name = f"_bagel_{what}_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as for an import: dataclasses and pickling look modules up there
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``get_config(arg)`` from ``"path.py[:arg]"`` the way ``config_flags`` does."""
    path, arg = split_file_arg(spec)
    module = _load_module(path, "config")
    if not hasattr(module, "get_config"):
        raise LaunchError(f"config {path!r}: defines no get_config(arg=None)")
    return module.get_config(arg) if arg is not None else module.get_config()


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """Loads ``get_sweep(arg)`` from ``"path.py[:arg]"``; checks it is a non-empty list of flat dicts."""
    path, arg = split_file_arg(spec)
    module = _load_module(path, "sweep")
    if not hasattr(module, "get_sweep"):
        raise LaunchError(f"sweep {path!r}: defines no get_sweep(arg=None)")
    points = module.get_sweep(arg) if arg is not None else module.get_sweep()
    if not isinstance(points, (list, tuple)) or not points:
        raise LaunchError(f"sweep {path!r}: get_sweep must return a non-empty list of dicts, got {points!r}")
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise LaunchError(f"sweep {path!r}: point {i} is {type(point).__name__}, expected a dict")
        for key in point:
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise LaunchError(f"sweep {path!r}: point {i} has a bad key {key!r} (want dotted names)")
        out.append(dict(point))
    return out


def grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Cartesian product of value lists; keyword names use ``__`` for dots.

    ``grid(train__lr=[1e-3, 3e-4], model__timestep_shift=[1.0, 3.0])`` → 4 dicts with keys
    ``"train.lr"`` and ``"model.timestep_shift"``, the last axis varying fastest.
    """
    keys = [k.replace("__", ".") for k in axes]
    return [dict(zip(keys, values)) for values in itertools.product(*(list(v) for v in axes.values()))]


def check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = "override"):
    """Raises ``LaunchError`` unless every dotted key exists in ``config`` with a compatible type."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            from bagel_jax.config import config_keys, unknown_key_message

            raise LaunchError(f"{where}: {unknown_key_message(key, config_keys(config))}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise LaunchError(f"{where}: {key}: is a section, override one of its keys")
        if not _compatible(current, value):
            raise LaunchError(
                f"{where}: {key}: expected {type(current).__name__}, got {type(value).__name__} {value!r}"
            )


def _compatible(current, value) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, (tuple, list)):
        return isinstance(value, (tuple, list))
    if current is None:
        return True
    return isinstance(value, type(current))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the dotted ``overrides`` set (checked first), as the trainer will see it."""
    check_overrides(config, overrides)
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = float(value) if isinstance(node[leaf], float) and not isinstance(value, bool) else value
    return out


def load_points(config_spec: str, sweep_spec: str | None) -> list[dict[str, Any]]:
    """The sweep's override dicts (``[{}]`` without a sweep), each validated against the config schema."""
    from bagel_jax.config import ConfigError, validate

    config = load_config(config_spec)
    points = load_sweep(sweep_spec) if sweep_spec else [{}]
    for i, point in enumerate(points):
        try:
            validate(apply_overrides(config, point))
        except (ConfigError, LaunchError) as e:
            raise LaunchError(f"sweep point {i} {point}: {e}") from e
    return points


# --- overrides as command-line flags -----------------------------------------------------------------


def format_value(value: Any) -> str:
    """The text ``config_flags`` parses back to ``value`` (strings raw, the rest as Python literals)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise LaunchError(
        f"override value {value!r}: unsupported type {type(value).__name__} "
        "(use str, bool, int, float or a tuple of them)"
    )


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    """``{"train.lr": 1e-4}`` → ``["--config.train.lr=0.0001"]`` (one argv element each, unquoted)."""
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def trainer_args(config: str, workdir: str, overrides: Mapping[str, Any] = (), extra: Sequence[str] = ()) -> list[str]:
    """The trainer's flags (no interpreter): config, sweep-point overrides, user flags, workdir."""
    return [f"--config={config}", *override_flags(dict(overrides)), *extra, f"--workdir={workdir}"]


def trainer_command(
    config: str, workdir: str, overrides: Mapping[str, Any] = (), extra: Sequence[str] = (), python: str | None = None
) -> list[str]:
    """Full argv: ``python -m bagel_jax.train --config=… --config.k=v … --workdir=…``."""
    return [python or sys.executable, "-m", TRAIN_MODULE, *trainer_args(config, workdir, overrides, extra)]


def shell_join(argv: Sequence[str]) -> str:
    """One POSIX-shell line that re-splits into exactly ``argv`` (single quotes where needed)."""
    return shlex.join(list(argv))


# --- naming -------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (tuple, list)):
        text = "x".join(_short(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^0-9A-Za-z.+-]+", "-", text).strip("-") or "empty"


def point_name(index: int, overrides: Mapping[str, Any]) -> str:
    """A path-safe label: ``"03_lr=0.001_timestep_shift=3"`` (index, then the last part of each key)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in overrides.items()]
    return "_".join([f"{index:02d}", *parts])


def point_workdir(base: str, index: int, overrides: Mapping[str, Any]) -> str:
    """``base/<point_name>``; works for local paths and ``gs://`` URLs alike."""
    return base.rstrip("/") + "/" + point_name(index, overrides)
