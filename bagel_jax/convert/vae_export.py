"""The VAE stage's export, and loading it (or any FLUX ``ae.safetensors`` with its latent statistics) for BAGEL.

Export layout (DIR/export/ of a ``python -m bagel_jax.train.vae_train`` run)::

    ae.safetensors   the VAE in BFL's FLUX layout (what official BAGEL releases ship; bagel_ckpt reads it)
    vae.json         {"scale_factor": 1/std, "shift_factor": mean, "vae": architecture, ...}: mean/std of sampled
                     latents over the stage's ``vae_stage.stats_images`` training images

BAGEL picks it up with ``--config.model.vae.init_from=DIR``: the trainer calls ``apply_vae_init_config`` (sets
``model.vae.scale_factor`` / ``shift_factor`` from vae.json before the model is built) and, on a fresh start, puts
``load_vae_params`` into ``params['vae']``. Loading a pretrained tower is conversion, not training: this module
sits with the other converters, below ``infer`` and ``eval``.
"""

from __future__ import annotations

import json
import logging
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bagel_jax.config import ConfigError, base_config

EXPORT_DIR, AE_FILE, STATS_FILE = "export", "ae.safetensors", "vae.json"
ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")


def _arch(vae_cfg) -> dict:
    return {k: (list(vae_cfg[k]) if k == "ch_mult" else int(vae_cfg[k])) for k in ARCH_KEYS}


def export_vae(directory: str, params, vae_cfg, stats: dict[str, float], info: dict | None = None) -> str:
    """Writes ``directory/ae.safetensors`` (BFL FLUX layout) and ``directory/vae.json`` (scale/shift,
    architecture, ``info``); returns ``directory``."""
    from safetensors.numpy import save_file

    from bagel_jax.convert.hf_vision import params_to_flux_ae

    os.makedirs(directory, exist_ok=True)
    tree = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(params)))
    save_file(params_to_flux_ae(tree, vae_cfg), os.path.join(directory, AE_FILE))
    if not stats["latent_std"] > 0:
        raise ValueError(f"export_vae: latent std {stats['latent_std']} is not positive")
    meta = dict(
        scale_factor=1.0 / stats["latent_std"],
        shift_factor=stats["latent_mean"],
        vae=_arch(vae_cfg),
        **stats,
        **(info or {}),
    )
    with open(os.path.join(directory, STATS_FILE), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    return directory


def _export_dir(path: str) -> str:
    """A VAE-stage workdir, its export/ dir, or the ae.safetensors in it → the export directory."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    for cand in (path, os.path.join(path, EXPORT_DIR)):
        if os.path.isfile(os.path.join(cand, AE_FILE)):
            return cand
    raise FileNotFoundError(
        f"model.vae.init_from: no {AE_FILE} in {path} or {os.path.join(path, EXPORT_DIR)} "
        f"(run python -m bagel_jax.train.vae_train first)"
    )


def load_latent_stats(path: str) -> dict:
    """The export's vae.json (scale_factor, shift_factor, vae architecture, training info)."""
    file = os.path.join(_export_dir(path), STATS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"model.vae.init_from: {file} not found (written next to {AE_FILE} by vae_train)")
    with open(file) as fh:
        return json.load(fh)


def _check_arch(stats: dict, vae_cfg, path: str):
    want = _arch(vae_cfg)
    for key, value in want.items():
        if stats["vae"].get(key) != value:
            raise ConfigError(
                f"model.vae.{key}: {value} differs from the VAE in {path} "
                f"({key}={stats['vae'].get(key)}); use the VAE stage's model.vae"
            )


def load_vae_params(path: str, vae_cfg=None) -> dict:
    """The exported VAE as a ``FluxVAE`` param tree of float32 numpy arrays (``{'encoder', 'decoder'}``, the
    layout of ``Bagel`` ``params['vae']``). ``path``: the VAE-stage workdir, its export/ dir, or the
    ae.safetensors. ``vae_cfg`` (default: the architecture in vae.json) must match the exported architecture."""
    from bagel_jax.convert.bagel_ckpt import load_vae_params as load_ae

    stats = load_latent_stats(path)
    if vae_cfg is None:  # the schema's model.vae with the exported architecture
        vae_cfg = base_config().model.vae
        vae_cfg.update({**stats["vae"], "ch_mult": tuple(stats["vae"]["ch_mult"])})
    _check_arch(stats, vae_cfg, path)
    return load_ae(os.path.join(_export_dir(path), AE_FILE), ml_collections.ConfigDict({"vae": vae_cfg}))


def apply_vae_init_config(config) -> dict | None:
    """If ``model.vae.init_from`` is set: checks the architecture and sets ``model.vae.scale_factor`` /
    ``shift_factor`` from its vae.json (call before the model is built). Returns the stats (None if unset)."""
    path = config.model.vae.init_from
    if not path:
        return None
    stats = load_latent_stats(path)
    _check_arch(stats, config.model.vae, path)
    config.model.vae.scale_factor = float(stats["scale_factor"])
    config.model.vae.shift_factor = float(stats["shift_factor"])
    logging.info(
        "model.vae from %s: scale_factor=%.6g shift_factor=%.6g",
        path,
        config.model.vae.scale_factor,
        config.model.vae.shift_factor,
    )
    return stats
