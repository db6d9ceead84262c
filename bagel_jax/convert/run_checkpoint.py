"""Reading params out of a training run's Orbax checkpoints (or a params pytree the converter saved): what inference,
evals and ``train.init_from`` need, without the trainer.

Layout (written by ``bagel_jax.train.checkpoint.Checkpointer``): ``<workdir>/checkpoints/<step>/{state, data}``;
``state`` holds the whole ``TrainState`` (``params``, ``ema_params``, ...). Only the asked-for field is read, sharded
onto the given abstract params' shardings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA = "state", "data"  # the items of one checkpoint step


def load_params(path: str, abstract_params: Any, *, use_ema: bool = False) -> Any:
    """Params restored sharded onto ``abstract_params``' shardings.

    ``path``: a params pytree saved with ``ocp.StandardCheckpointer().save(path, params)`` (what the
    converter writes), or a run's workdir / ``checkpoints`` dir / step dir (its ``state.params``, or
    ``state.ema_params`` with ``use_ema``).
    """
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    step_dir = _find_state_dir(root)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    if step_dir is None:  # a plain params pytree
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(root, abstract_params)
    field = "ema_params" if use_ema else "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            step_dir / STATE,
            args=ocp.args.PyTreeRestore(
                item={field: abstract_params}, restore_args={field: restore_args}, partial_restore=True
            ),
        )
    return out[field]


def saved_param_paths(path: str, *, use_ema: bool = False) -> set[str]:
    """The '/'-joined param paths ``load_params(path, ...)`` can read (from the checkpoint's metadata; no array is
    read): e.g. whether a run saved LoRA adapters."""
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    step_dir = _find_state_dir(root)
    if step_dir is None:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(root)
    else:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(step_dir / STATE)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if step_dir is not None:
        tree = tree["ema_params" if use_ema else "params"]
    out: set[str] = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out.add(prefix)

    walk(dict(tree), "")
    return out


def find_state_dir(path: str) -> epath.Path | None:
    """The latest step directory holding a ``state`` item under a workdir / checkpoints dir / step dir, or None."""
    root = epath.Path(path)
    return _find_state_dir(root) if root.exists() else None


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the trainer wrote to ``workdir/config.json`` (lists back to tuples), over
    ``base_config()`` so keys newer than the run keep their defaults. Raises ``FileNotFoundError`` naming it."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir: {path} not found (the trainer writes it on start)")
    with open(path) as fh:
        raw = json.load(fh)

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    from bagel_jax.config import base_config

    def merge(base, new):  # keys added to the schema after the run was started keep their defaults
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(base.get(k), ml_collections.ConfigDict):
                merge(base[k], v)
            else:
                base[k] = v

    config = base_config()
    with config.unlocked():
        merge(config, tuples(raw))
    return config


def _find_state_dir(root: epath.Path) -> epath.Path | None:
    """The step directory holding a ``state`` item under ``root`` (latest step), or None."""
    if (root / STATE).exists():
        return root
    for base in (root / "checkpoints", root):
        steps = [p for p in base.iterdir() if p.name.isdigit() and (p / STATE).exists()] if base.exists() else []
        if steps:
            return max(steps, key=lambda p: int(p.name))
    return None


# --- the loop's entry point ------------------------------------------------------------------------
