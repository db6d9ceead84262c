"""A training run's workdir as an inference model: its config, its checkpoint (EMA or raw params) or the untrained
model. The eval CLI scores runs through it::

    python -m bagel_jax.eval.runner --workdir=/tmp/bagel_repro [--params=ema|params|untrained]
        [--only=geneval,vqa] [--output=scores.json]

``untrained`` is the baseline the reproduction is compared against: the same config, the same frozen VAE
(``model.vae.init_from``) and pretrained ViT (``model.vit.init_from``) with the other weights freshly initialised
(``train.seed``), i.e. the model at step 0.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from bagel_jax.config import ConfigError

PARAMS = ("ema", "params", "untrained")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the trainer wrote to ``workdir/config.json`` (lists back to tuples), over
    ``base_config()`` so keys newer than the run keep their defaults."""
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


def load_run_params(config, workdir: str, which: str = "ema"):
    """``(model, params)`` of the run: the latest checkpoint's EMA / raw params, or the untrained init.

    The untrained model is the run's step-0 params (same seed and init key as the trainer) with the run's
    frozen VAE and pretrained ViT, so it differs from the trained one only in what training changed. Params are
    unboxed host arrays.
    """
    from flax.core import meta

    from bagel_jax.convert.run_checkpoint import load_params
    from bagel_jax.convert.vae_export import load_vae_params
    from bagel_jax.convert.vit_export import load_vit_params
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.model.init_key import split_init_key

    if which not in PARAMS:
        raise ConfigError(f"--params: expected one of {PARAMS}, got {which!r}")
    model, init_fn = make_init_fn(config)
    if which == "untrained":
        params = meta.unbox(jax.jit(init_fn)(split_init_key(jax.random.PRNGKey(config.train.seed))[0]))
        if config.model.vae.init_from:
            params = {**params, "vae": load_vae_params(config.model.vae.init_from, config.model.vae)}
        if config.model.vit.init_from:
            params = {**params, "vit_model": load_vit_params(config.model.vit.init_from, config.model)}
        return model, jax.device_get(params)
    abstract = meta.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    params = load_params(workdir, abstract, use_ema=which == "ema")
    return model, jax.device_get(params)


def run_inferencer(workdir: str, which: str = "ema", config=None):
    """An ``Inferencer`` on the run at ``workdir`` (``config`` defaults to the run's own)."""
    from bagel_jax.data.pipeline import tokenizer_from_config
    from bagel_jax.infer.api import Inferencer

    config = load_run_config(workdir) if config is None else config
    model, params = load_run_params(config, workdir, which)
    return Inferencer(model, params, tokenizer_from_config(config), config.data)
