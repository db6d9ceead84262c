"""Reading params out of a training run's Orbax checkpoints (or a params pytree the converter saved): what inference,
evals and ``train.init_from`` need, without the trainer.

Layout (written by ``bagel_jax.train.checkpoint.Checkpointer``): ``<workdir>/checkpoints/<step>/{state, data}``;
``state`` holds the ``TrainState`` (``params``, ``ema_params``: the trainable leaves' EMA, ...) less the fixed params
(the frozen VAE, the sin-cos tables; ``convert.fixed_params`` rebuilds them from the config). Only the asked-for
leaves are read, sharded onto the given abstract params' shardings.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from bagel_jax.convert import param_subtree
from bagel_jax.convert.lora_merge import adapter_rank, merge_adapters, stored_adapters
from bagel_jax.model import lora

STATE, DATA = "state", "data"  # the items of one checkpoint step


def load_params(
    path: str, abstract_params: Any, *, use_ema: bool = False, base: Any = None, lora_alpha: float | None = None
) -> Any:
    """Params restored sharded onto ``abstract_params``' shardings.

    ``path``: a params pytree saved with ``ocp.StandardCheckpointer().save(path, params)`` (what the
    converter writes), or a run's workdir / ``checkpoints`` dir / step dir: its ``state.params``, or with ``use_ema``
    the EMA model (``state.ema_params``, which holds the trainable leaves only, over ``state.params``). A leaf the
    file does not hold (a run's checkpoint leaves out the fixed params: the frozen VAE, the sin-cos tables) is taken
    from ``base`` (a param tree or a part of one, or a callable returning it, called only then: e.g.
    ``convert.fixed_params``); without it, a
    ``FileNotFoundError`` names the first such leaf. ``abstract_params`` may be a part of the params (then only
    its leaves are read). LoRA adapters the file holds where ``abstract_params`` has a kernel and none are merged
    into it (``convert/lora_merge.py``; their alpha from the run's config.json, else ``lora_alpha``).
    """
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    step_dir = _find_state_dir(root)
    adapters = stored_adapters(_params_metadata(root, step_dir), abstract_params)
    wanted = param_subtree.merge(abstract_params, adapters)
    if step_dir is None:  # a plain params pytree
        parts = [_restore_part(root, wanted, None)]
    else:
        parts = [_restore_part(step_dir / STATE, wanted, "params")]
        if use_ema:
            parts.append(_restore_part(step_dir / STATE, wanted, "ema_params"))
    out = param_subtree.merge(*parts)
    lost = param_subtree.missing(abstract_params, out)
    if lost and base is not None:
        base = base() if callable(base) else base
        out = param_subtree.merge(param_subtree.within(base, abstract_params), out)
        lost = param_subtree.missing(abstract_params, out)
    if lost:
        raise FileNotFoundError(f"{path}: holds no param {lost[0]} (and no base to take it from)")
    if adapters:
        out = _merged(path, out, adapters, lora_alpha)
    return out


def _merged(path: str, params: dict, adapters: dict, lora_alpha: float | None) -> dict:
    """``params`` with the restored ``adapters`` merged into their kernels; logs how many."""
    alpha, source = saved_lora_alpha(path), "the run's config.json"
    if alpha is None:
        alpha, source = lora_alpha, "model.lora.alpha"
    rank = adapter_rank(adapters)
    if alpha is None:
        raise ValueError(f"{path}: holds LoRA adapters (rank {rank}) and no config.json to give their alpha")
    params, count = merge_adapters(params, adapters, float(alpha) / rank)
    logging.info(
        "%s: merged %d LoRA adapters (rank %d, alpha %g from %s) into their kernels: W + (alpha/rank)·A·B",
        path,
        count,
        rank,
        alpha,
        source,
    )
    return params


def _restore_part(directory: epath.Path, abstract: Any, field: str | None) -> dict:
    """The leaves of ``abstract`` that the pytree at ``directory`` (under ``field``) holds, restored sharded."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(directory)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        stored = tree if field is None else tree.get(field) or {}
        part = param_subtree.select(abstract, _holds(abstract, stored))
        if not part:
            return {}
        item = part if field is None else {field: part}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        out = ckptr.restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
    return out if field is None else out[field]


def _holds(abstract: Any, stored: Any) -> Any:
    """Bool tree over ``abstract``: True where the metadata tree ``stored`` has the leaf."""
    return {k: (_holds(v, stored.get(k) or {}) if isinstance(v, Mapping) else k in stored) for k, v in abstract.items()}


def load_any_params(path: str, model_cfg, shardings: Any, like: Any) -> Any:
    """The params (or the part ``like`` holds) of ``path`` on ``shardings`` with ``like``'s dtypes: a release folder
    (each tensor read straight into its shards), a params pytree the converter saved, or a run's workdir /
    checkpoint (a leaf it leaves out keeps ``like``'s value; adapters it holds where ``like`` has none are merged).
    Raises ``release_sharded.CheckpointError``."""
    from bagel_jax.convert.release_sharded import is_release, load_release_sharded

    if is_release(path):
        return load_release_sharded(path, model_cfg, shardings, like)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    return load_params(path, abstract, base=like, lora_alpha=model_cfg.lora.alpha)


def saved_params_metadata(path: str, *, use_ema: bool = False) -> dict:
    """The nested metadata (shape and dtype per leaf) of the params ``load_params(path, ...)`` can read."""
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    return _params_metadata(root, _find_state_dir(root), use_ema)


def saved_lora(path: str) -> dict | None:
    """The LoRA adapters a run or params tree saved, ``{"rank", "alpha" (None for a params tree), "experts",
    "targets"}`` (the ``model.lora`` names), from the metadata alone; None if it saved none."""
    meta = saved_params_metadata(path)
    modules = lora.adapted_modules("/".join(p) for p in param_subtree.paths(meta))
    if not modules:
        return None
    first = functools.reduce(lambda node, key: node[key], min(modules).split("/"), meta)
    return {"rank": int(first["lora_a"].shape[-1]), "alpha": saved_lora_alpha(path), **lora.layout(modules)}


def saved_lora_alpha(path: str) -> float | None:
    """``model.lora.alpha`` of the run whose workdir (or checkpoint under it) ``path`` is, from its config.json;
    None for a params pytree or a run without one."""
    step_dir = _find_state_dir(epath.Path(path))
    if step_dir is None or step_dir.parent.name != "checkpoints":
        return None
    config = step_dir.parent.parent / "config.json"
    if not config.exists():
        return None
    alpha = json.loads(config.read_text()).get("model", {}).get("lora", {}).get("alpha")
    return None if alpha is None else float(alpha)


def _params_metadata(root: epath.Path, step_dir: epath.Path | None, use_ema: bool = False) -> dict:
    """The metadata tree (shape and dtype per leaf) of the params a params pytree at ``root`` or a run's
    ``step_dir`` holds (``use_ema``: its EMA's)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(root if step_dir is None else step_dir / STATE)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if step_dir is not None:
        tree = tree.get("ema_params" if use_ema else "params") or {}
    return _plain(tree)


def _plain(tree: Any) -> Any:
    """A metadata tree as nested plain dicts."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


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
