"""The *fixed* params of a BAGEL model: the frozen VAE and the 2-D sin-cos position tables. They are functions of the
config, so a training state holds them once (in ``params``: no optimizer state, no EMA) and checkpoints leave them
out; a resume, an eval or an export rebuilds them here exactly as a fresh start made them:

    the init (``train.seed``) → the VAE of ``model.vae.init_from`` (the VAE stage's export, or any FLUX
    ``ae.safetensors``).

A run started from ``train.init_from`` (a release folder, a params pytree, a run) took them from that folder: it
checkpoints them (``Checkpointer(store_fixed=True)``), so a restart never depends on the folder.

Loading weights is conversion: this sits with the converters, below ``infer``, ``eval`` and ``train``.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bagel_jax.config import ConfigError
from bagel_jax.convert import param_subtree

FIXED = r"^(vae(_model)?|latent_pos_embed|vit_pos_embed)/"  # '/'-joined param paths: the frozen VAE, the tables


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _path(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(keys[1:] if keys and keys[0] == "params" else keys)


def fixed_mask(params: Any) -> Any:
    """Tree of Python bools over ``params`` (boxed, abstract or a sharding tree): True for the fixed leaves."""
    pattern = re.compile(FIXED)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.search(_path(p))), params, is_leaf=_is_box)


def fixed_part(tree: Any) -> dict:
    """The fixed leaves of a param tree (or of an abstract / sharding tree of the same nesting)."""
    return param_subtree.select(tree, fixed_mask(tree))


def init_fixed(init_fn, rng: jax.Array, shardings: Any = None) -> dict:
    """The fixed leaves exactly as ``init_fn(split_init_key(rng)[0])`` makes them (the trainer's fresh init), placed
    with ``shardings`` (their part of the params' shardings, or None); XLA drops the init of every other leaf."""
    from bagel_jax.model.init_key import split_init_key

    def fixed(r):
        return fixed_part(nn.meta.unbox(init_fn(split_init_key(r)[0])))

    return jax.jit(fixed, out_shardings=shardings)(rng)


def fixed_params(config, init_fn, shardings: Any = None, rng: jax.Array | None = None, start: Any = None) -> dict:
    """The fixed leaves of the BAGEL ``config`` (``start``, default the init, → ``model.vae.init_from``), placed with
    ``shardings`` (the fixed part of the params' shardings; None: the default device). ``rng``: the trainer's
    ``PRNGKey(train.seed)`` (the default). ``start``: the fixed part of params already built (a fresh start from
    ``train.init_from`` holds that folder's; such a run checkpoints them, as they cannot be rebuilt from the config)."""
    from bagel_jax.convert.vae_export import load_vae_params

    rng = jax.random.PRNGKey(config.train.seed) if rng is None else rng
    fixed = init_fixed(init_fn, rng, shardings) if start is None else start
    if not fixed:
        return fixed
    if "vae" in fixed and config.model.vae.get("init_from"):
        loaded = load_vae_params(config.model.vae.init_from, config.model.vae)
        where = shardings["vae"] if shardings is not None else jax.tree.map(lambda _: None, fixed["vae"])
        fixed = {**fixed, "vae": place(loaded, fixed["vae"], where, "model.vae.init_from")}
    return fixed


def place(loaded: Any, like: Any, shardings: Any, source: str) -> Any:
    """``loaded`` (host arrays with ``like``'s tree and shapes) cast to ``like``'s dtypes and put on ``shardings``;
    a tree or shape mismatch is a ``ConfigError`` naming ``source``."""
    if jax.tree.structure(loaded) != jax.tree.structure(like):
        raise ConfigError(f"{source}: its vae param tree differs from the model's")
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(like), strict=True):
        if tuple(a.shape) != tuple(b.shape):
            raise ConfigError(f"{source}: {jax.tree_util.keystr(kp)} has shape {tuple(a.shape)}, the model {b.shape}")
    return jax.tree.map(lambda a, x, s: jax.device_put(np.asarray(a, x.dtype), s), loaded, like, shardings)
