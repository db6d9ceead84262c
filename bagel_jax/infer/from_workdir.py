"""A training run's workdir as an inference model: its config, its checkpoint (EMA or raw params) or the untrained
model. The eval CLI scores runs through it::

    python -m bagel_jax.eval.runner --workdir=/tmp/bagel_repro [--params=ema|params|untrained]
        [--only=geneval,vqa] [--output=scores.json]

``untrained`` is the baseline the reproduction is compared against: the same config, the same frozen VAE
(``model.vae.init_from``) and pretrained ViT (``model.vit.init_from``) with the other weights freshly initialised
(``train.seed``), i.e. the model at step 0.
"""

from __future__ import annotations

import jax

from bagel_jax.config import ConfigError
from bagel_jax.convert.run_checkpoint import load_run_config  # noqa: F401  (re-exported: the eval CLI uses it)

PARAMS = ("ema", "params", "untrained")


def load_run_params(config, workdir: str, which: str = "ema"):
    """``(model, params)`` of the run: the latest checkpoint's EMA / raw params, or the untrained init. The EMA
    holds the trained leaves only; frozen ones come from the checkpoint's params, fixed ones (the frozen VAE, the
    sin-cos tables) from the config (``convert.fixed_params``), as the trainer makes them.

    The untrained model is the run's step-0 params (same seed and init key as the trainer) with the run's
    frozen VAE and pretrained ViT, so it differs from the trained one only in what training changed. Params are
    unboxed host arrays.
    """
    from flax.core import meta

    from bagel_jax.convert.fixed_params import fixed_params
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
    fixed = lambda: fixed_params(config, init_fn)  # noqa: E731  (the frozen VAE and tables, if not in the checkpoint)
    params = load_params(workdir, abstract, use_ema=which == "ema", base=fixed)
    return model, jax.device_get(params)


def run_inferencer(workdir: str, which: str = "ema", config=None, *, placement=None, cached: bool = True):
    """An ``Inferencer`` on the run at ``workdir`` (``config`` defaults to the run's own). ``placement``
    (``infer/placement.py``): params sharded on its mesh by its logical rules, as training shards them (default one
    device); ``cached``: the KV-cached batched path, else the cache-free oracle."""
    from bagel_jax.data.pipeline import tokenizer_from_config
    from bagel_jax.infer.api import Inferencer
    from bagel_jax.infer.placement import place_params
    from bagel_jax.model.bagel import make_init_fn

    config = load_run_config(workdir) if config is None else config
    model, params = load_run_params(config, workdir, which)
    kw = {}
    if placement is not None:
        params = place_params(params, make_init_fn(config)[1], placement)
        kw = dict(mesh=placement.mesh, rules=placement.rules)
    return Inferencer(model, params, tokenizer_from_config(config), config.data, cached=cached, **kw)
