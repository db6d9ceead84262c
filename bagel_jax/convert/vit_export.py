"""The ViT stage's export (a transformers ``SiglipVisionModel`` checkpoint), and loading it (or any HF SigLIP vision
checkpoint) for BAGEL.

Export layout (DIR/export/ of a ``python -m bagel_jax.train.vit_train`` run)::

    model.safetensors   vision_model.* tensors (HF layout, conv patch embedding)
    config.json         SiglipVisionConfig (vision_use_head false), loadable by transformers
    vit_stage.json      the stage's result (step, weights, held-out accuracies, wall time)

BAGEL loads it with ``--config.model.vit.init_from=DIR``: on a fresh start the trainer puts ``load_vit_params``
into ``params['vit_model']``. Loading a pretrained tower is conversion, not training.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np

from bagel_jax.config import ConfigError

EXPORT_DIR, WEIGHTS_FILE, CONFIG_FILE, INFO_FILE = "export", "model.safetensors", "config.json", "vit_stage.json"


def hf_vision_config(model_cfg) -> dict:
    """transformers ``SiglipVisionConfig`` of ``model.vit`` (exact layer count, no pooling head)."""
    v = model_cfg.vit
    side = int(round(v.num_positions**0.5))
    if side * side != v.num_positions:
        raise ConfigError(f"model.vit.num_positions: {v.num_positions} is not a square")
    return dict(
        model_type="siglip_vision_model",
        architectures=["SiglipVisionModel"],
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        patch_size=v.patch_size,
        image_size=side * v.patch_size,
        num_channels=3,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        vision_use_head=False,
    )


def export_vit(directory: str, vit_params, model_cfg, info: dict | None = None) -> str:
    """Writes the ViT (``params['vit_model']``) as a transformers SigLIP vision checkpoint; returns ``directory``."""
    from safetensors.numpy import save_file

    from bagel_jax.convert.hf_vision import params_to_siglip

    os.makedirs(directory, exist_ok=True)
    tree = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(vit_params)))
    save_file(params_to_siglip(tree, model_cfg), os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
        json.dump(hf_vision_config(model_cfg), fh, indent=2, sort_keys=True)
    with open(os.path.join(directory, INFO_FILE), "w") as fh:
        json.dump(info or {}, fh, indent=2, sort_keys=True)
    return directory


def _weights_file(path: str) -> str:
    """A ViT-stage workdir, its export/ dir, an HF checkpoint dir, or a .safetensors file → the weights file."""
    if os.path.isfile(path):
        return path
    for cand in (path, os.path.join(path, EXPORT_DIR)):
        if os.path.isfile(os.path.join(cand, WEIGHTS_FILE)):
            return os.path.join(cand, WEIGHTS_FILE)
    raise FileNotFoundError(
        f"model.vit.init_from: no {WEIGHTS_FILE} in {path} or {os.path.join(path, EXPORT_DIR)} "
        f"(run python -m bagel_jax.train.vit_train first)"
    )


def check_vit_init(config) -> None:
    """Raises ``ConfigError`` naming ``model.vit.init_from`` if it is set and holds no weights file."""
    path = config.model.vit.init_from
    if path:
        if not config.model.visual_und:
            raise ConfigError("model.vit.init_from: set, but model.visual_und is False (the model has no ViT)")
        try:
            _weights_file(path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None


def load_vit_params(path: str, model_cfg) -> dict:
    """An exported (or any transformers SigLIP) vision checkpoint as a ``SiglipNaViT`` param tree of float32 numpy
    arrays (the layout of ``Bagel`` ``params['vit_model']``). Keys outside the vision model (a full SigLIP's
    ``text_model.*``, ``logit_scale``) are skipped; a shape that does not fit ``model.vit`` raises."""
    from safetensors.numpy import load_file

    from bagel_jax.convert.hf_vision import SIGLIP_PREFIXES, siglip_to_params

    file = _weights_file(path)
    sd = load_file(file)
    prefix = next((p for p in SIGLIP_PREFIXES if p + "post_layernorm.weight" in sd), None)
    if prefix is None:
        raise ConfigError(f"model.vit.init_from: {file} holds no SigLIP vision model (no post_layernorm.weight)")
    try:
        return siglip_to_params({k: v for k, v in sd.items() if k.startswith(prefix)}, model_cfg, prefix)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.vit.init_from: {file}: {e}") from None
