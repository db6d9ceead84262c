"""The official BAGEL release layout ⇄ ``Bagel`` params (bagel.md §9).

A release directory holds

* ``ema.safetensors`` (or ``model.safetensors``, or a sharded ``*.safetensors.index.json``): the
  ``Bagel`` state dict with the reference's key names (§9.3), every tensor in torch layout;
* ``llm_config.json`` (Qwen2 config) and ``vit_config.json`` (SigLIP vision config; its
  ``num_hidden_layers`` counts the layer the reference drops, so we use one less);
* ``ae.safetensors``: the FLUX autoencoder in BFL's key layout (not part of ``ema.safetensors``).

The conversion is one table (``entries``): official key → our param path + a layout kind:

| kind       | official (torch)        | ours                        |
|------------|-------------------------|-----------------------------|
| copy       | any                     | same array                  |
| linear     | weight [out, in]        | kernel [in, out]            |
| in_heads   | q/k/v weight [H·hd, D]  | kernel [D, H, hd]           |
| heads      | q/k/v bias [H·hd]       | bias [H, hd]                |
| heads_out  | o_proj weight [D, H·hd] | kernel [H, hd, D]           |

Loading streams: tensors are read one key at a time (``safe_open``), shard by shard, checked against
the expected key set and shapes (``official_shapes``: the §9.3 formulas for a config), converted, and
optionally handed to ``place`` (e.g. ``jax.device_put`` to its sharding) before the next is read. A
missing or unexpected key raises ``CheckpointError`` naming it; a wrong shape names the key, the
expected and the found shape. ``export_checkpoint`` writes the same layout back; a load → export
round trip reproduces keys, shapes and values exactly (in the file's dtype).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bagel_jax.config import base_config, head_dim
from bagel_jax.convert.hf import hf_to_ours, lm_entries, ours_to_hf
from bagel_jax.convert.hf_vision import flux_ae_keys, flux_ae_to_params, params_to_flux_ae
from bagel_jax.convert.layer_stack import scanned_stacks, stack_layers, unstack_layers
from bagel_jax.model.embeddings import sincos_2d_table

GEN = "_moe_gen"
EMA_FILE, AE_FILE, LLM_CONFIG, VIT_CONFIG = "ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")
VIT_PREFIX = "vit_model.vision_model."


class CheckpointError(ValueError):
    """A checkpoint that does not match the expected layout; the message names the key."""


# --- the table -------------------------------------------------------------------------------------


def _dense(key: str, path: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    return [(f"{key}.weight", path + ("kernel",), "linear"), (f"{key}.bias", path + ("bias",), "copy")]


def _norm(key: str, path: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    return [(f"{key}.weight", path + ("scale",), "copy"), (f"{key}.bias", path + ("bias",), "copy")]


def entries(cfg) -> list[tuple[str, tuple[str, ...], str]]:
    """(official key, our param path, layout kind) for every tensor of ``ema.safetensors`` for ``cfg``."""
    e = lm_entries(cfg, "language_model.", ("language_model",))
    if cfg.visual_gen:
        e += _dense("time_embedder.mlp.0", ("time_embedder", "mlp_0"))
        e += _dense("time_embedder.mlp.2", ("time_embedder", "mlp_2"))
        e += _dense("vae2llm", ("vae2llm",)) + _dense("llm2vae", ("llm2vae",))
        e.append(("latent_pos_embed.pos_embed", ("latent_pos_embed", "pos_embed"), "copy"))
    if cfg.visual_und:
        v, ours = VIT_PREFIX, ("vit_model",)
        e += _dense(f"{v}embeddings.patch_embedding", ours + ("patch_embedding",))
        e.append((f"{v}embeddings.position_embedding.weight", ours + ("position_embedding",), "copy"))
        for i in range(cfg.vit.num_layers):
            k, p = f"{v}encoder.layers.{i}.", ours + (f"layers_{i}",)
            for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
                e += _dense(f"{k}self_attn.{x}", p + ("self_attn", x))
            e += _norm(f"{k}layer_norm1", p + ("layer_norm1",)) + _norm(f"{k}layer_norm2", p + ("layer_norm2",))
            e += _dense(f"{k}mlp.fc1", p + ("mlp", "fc1")) + _dense(f"{k}mlp.fc2", p + ("mlp", "fc2"))
        e += _norm(f"{v}post_layernorm", ours + ("post_layernorm",))
        e += _dense("connector.fc1", ("connector", "fc1")) + _dense("connector.fc2", ("connector", "fc2"))
        e.append(("vit_pos_embed.pos_embed", ("vit_pos_embed", "pos_embed"), "copy"))
    return e


def official_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every key of ``ema.safetensors`` for the ``model`` config ``cfg`` → its torch shape (§9.3 formulas)."""
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, head_dim(cfg)
    hq, hkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    dv, fv = cfg.vit.hidden_size, cfg.vit.intermediate_size
    patch_dim = cfg.latent_patch_size**2 * cfg.vae.z_channels
    shapes: dict[str, tuple[int, ...]] = {}
    for key, _, _ in entries(cfg):
        name = key.rsplit(".", 1)[0]
        is_bias = key.endswith(".bias")
        if key.startswith("language_model."):
            if "embed_tokens" in key or "lm_head" in key:
                s = (v, d)
            elif ".q_proj" in key:
                s = (hq,) if is_bias else (hq, d)
            elif ".k_proj" in key or ".v_proj" in key:
                s = (hkv,) if is_bias else (hkv, d)
            elif ".o_proj" in key:
                s = (d, hq)
            elif "_norm" in name.rsplit(".", 1)[-1] and "self_attn" in key:
                s = (hd,)
            elif "gate_proj" in key or "up_proj" in key:
                s = (f, d)
            elif "down_proj" in key:
                s = (d, f)
            else:  # input/post_attention layernorms, final norms
                s = (d,)
        elif key.startswith("time_embedder.mlp.0"):
            s = (d,) if is_bias else (d, 256)
        elif key.startswith("time_embedder.mlp.2") or key.startswith("connector.fc2"):
            s = (d,) if is_bias else (d, d)
        elif key.startswith("vae2llm"):
            s = (d,) if is_bias else (d, patch_dim)
        elif key.startswith("llm2vae"):
            s = (patch_dim,) if is_bias else (patch_dim, d)
        elif key == "latent_pos_embed.pos_embed":
            s = (cfg.max_latent_size**2, d)
        elif key == "vit_pos_embed.pos_embed":
            s = (cfg.vit_max_num_patch_per_side**2, d)
        elif key.startswith("connector.fc1"):
            s = (d,) if is_bias else (d, dv)
        elif "patch_embedding" in key:
            s = (dv,) if is_bias else (dv, cfg.vit.patch_size**2 * 3)
        elif "position_embedding" in key:
            s = (cfg.vit.num_positions, dv)
        elif ".mlp.fc1" in key:
            s = (fv,) if is_bias else (fv, dv)
        elif ".mlp.fc2" in key:
            s = (dv,) if is_bias else (dv, fv)
        else:  # ViT q/k/v/out projections and layer norms
            s = (dv,) if (is_bias or "norm" in key) else (dv, dv)
        shapes[key] = s
    return shapes


# --- tensor layouts --------------------------------------------------------------------------------


def to_ours(kind: str, w: np.ndarray, hd: int) -> np.ndarray:
    """Official (torch) layout → our layout."""
    return hf_to_ours(kind, w, hd)


def to_official(kind: str, w: np.ndarray) -> np.ndarray:
    """Our layout → official (torch) layout (inverse of ``to_ours``)."""
    return ours_to_hf(kind, w)


def _set(tree: dict, path: tuple[str, ...], value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        if k not in tree:
            raise CheckpointError(f"params: missing {'/'.join(path)}")
        tree = tree[k]
    return tree


# --- reading ---------------------------------------------------------------------------------------


class TensorSource:
    """Streaming view of safetensors file(s): key → file, shapes from headers, tensors read on demand."""

    def __init__(self, files: list[str]):
        self.files = files
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():
                    if key in self.where:
                        raise CheckpointError(f"{key}: present in both {self.where[key]} and {path}")
                    sl = f.get_slice(key)
                    self.where[key] = path
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = sl.get_dtype()

    @classmethod
    def from_dir_or_file(cls, path: str) -> TensorSource:
        """A ``.safetensors`` file, a ``.index.json`` (HF sharding), or a directory holding either."""
        return cls(weight_files(path))

    def keys(self):
        return self.where.keys()

    def iter_tensors(self, keys) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (key, array) file by file (each file opened once), one tensor in memory at a time."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        for path in self.files:
            if path not in by_file:
                continue
            with safe_open(path, framework="numpy") as f:
                for key in by_file[path]:
                    yield key, f.get_tensor(key)


def weight_files(path: str) -> list[str]:
    """The safetensors file(s) of a ``.safetensors`` file, a ``.index.json`` (HF sharding), or a directory holding
    either (``ema.safetensors`` first, then ``model.safetensors``); nothing is opened."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                return [os.path.join(path, name)]
            index = os.path.join(path, name + ".index.json")
            if os.path.exists(index):
                return weight_files(index)
        raise CheckpointError(f"{path}: no {' / '.join(WEIGHT_FILES)} (or .index.json) in the directory")
    if path.endswith(".index.json"):
        with open(path) as fh:
            weight_map = json.load(fh)["weight_map"]
        base = os.path.dirname(path)
        return [os.path.join(base, f) for f in sorted(set(weight_map.values()))]
    return [path]


def _check_keys(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str):
    for key in expected:
        if key not in found:
            raise CheckpointError(f"{key}: missing from {what}")
    for key in found:
        if key not in expected:
            raise CheckpointError(f"{key}: unexpected key in {what}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(f"{key}: expected shape {tuple(shape)}, found {tuple(found[key])} in {what}")


def load_params(
    path: str,
    cfg,
    *,
    dtype=None,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    ae_path: str | None = None,
) -> dict:
    """Reads an official ``ema.safetensors`` (+ ``ae.safetensors``) into a ``Bagel`` param tree.

    Args:
      path: the weights file, its ``.index.json``, or the release directory.
      cfg: the ``model`` config the params are for (e.g. from ``config_from_checkpoint``).
      dtype: numpy dtype of the returned leaves (default ``cfg.param_dtype``).
      place: optional ``place(param_path, array) -> leaf`` called on each converted tensor as soon as it is
        read (e.g. ``jax.device_put`` to its sharding), so host memory holds one tensor at a time.
        Not applied to the layers of a scanned stack (``cfg.scan_layers``, ``cfg.vit.scan_layers``: they are
        stacked first; ``place`` gets the stacked ``language_model/layers/...`` / ``vit_model/layers/...`` leaves).
      ae_path: the FLUX ``ae.safetensors`` (default: next to ``path``; required when ``cfg.visual_gen``).

    Returns:
      the ``params`` collection: ``{'language_model': ..., 'vit_model': ..., 'vae': ..., ...}``.
    """
    src = TensorSource.from_dir_or_file(path)
    what = ", ".join(src.files)
    _check_keys(src.shapes, official_shapes(cfg), what)
    dtype = np.dtype(dtype or cfg.param_dtype)
    hd = head_dim(cfg)
    table = {key: (p, kind) for key, p, kind in entries(cfg)}
    stacks = scanned_stacks(cfg)
    put = place or (lambda _path, a: a)
    params: dict = {}
    for key, w in src.iter_tensors(list(table)):
        p, kind = table[key]
        value = np.ascontiguousarray(to_ours(kind, w, hd).astype(dtype))
        deferred = p[0] in stacks and p[1].startswith("layers_")
        _set(params, p, value if deferred else put(p, value))
    for name, num_layers in stacks.items():
        sub = stack_layers(params[name], num_layers)
        sub["layers"] = jax.tree_util.tree_map_with_path(
            lambda kp, a, name=name: put((name, "layers") + tuple(k.key for k in kp), a), sub["layers"]
        )
        params[name] = sub
    if cfg.visual_gen:
        ae_path = ae_path or os.path.join(path if os.path.isdir(path) else os.path.dirname(path), AE_FILE)
        params["vae"] = load_vae_params(ae_path, cfg, dtype=dtype, place=place)
    return params


def load_vae_params(ae_path: str, cfg, *, dtype=np.float32, place=None) -> dict:
    """FLUX ``ae.safetensors`` (BFL names) → the ``vae`` subtree; strict on keys and shapes."""
    if not os.path.exists(ae_path):
        raise CheckpointError(f"{ae_path}: FLUX autoencoder file not found (needed when visual_gen)")
    src = TensorSource([ae_path])
    expected = set(flux_ae_keys(cfg.vae))
    for key in expected:
        if key not in src.shapes:
            raise CheckpointError(f"{key}: missing from {ae_path}")
    for key in src.keys():
        if key not in expected:
            raise CheckpointError(f"{key}: unexpected key in {ae_path}")
    sd = dict(src.iter_tensors(sorted(expected)))
    try:
        tree = flux_ae_to_params(sd, cfg.vae)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ae_path}: {e}") from e
    return jax.tree_util.tree_map_with_path(
        lambda kp, a: (place or (lambda _p, x: x))(("vae",) + tuple(k.key for k in kp), np.asarray(a, dtype)), tree
    )


# --- configs ---------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: config file not found")
    with open(path) as fh:
        return json.load(fh)


def config_from_checkpoint(directory: str, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The ``model`` config of a release directory.

    LLM shapes from ``llm_config.json``; ViT shapes from ``vit_config.json`` (layers − 1, as the
    reference); from the weights' headers: MoT vs dense (``_moe_gen`` keys), QK-norm, visual_gen /
    visual_und, ``max_latent_size`` and ``vit_max_num_patch_per_side`` (position tables), and the VAE
    architecture (``ae.safetensors``). Everything else (dtype, attention impl, connector act, VAE
    scale/shift, …) comes from ``base`` (default ``base_config().model``).
    """
    m = ml_collections.ConfigDict((base or base_config().model).to_dict())
    llm = _read_json(os.path.join(directory, LLM_CONFIG))
    src = TensorSource.from_dir_or_file(directory)
    keys = set(src.keys())
    heads = llm["num_attention_heads"]
    hd = llm.get("head_dim") or llm["hidden_size"] // heads
    theta = llm.get("rope_theta", (llm.get("rope_parameters") or {}).get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{LLM_CONFIG}: rope_theta missing")
    m.update(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_layers=llm["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=llm["num_key_value_heads"],
        head_dim=0 if hd * heads == llm["hidden_size"] else hd,
        rope_theta=float(theta),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        layer_module="mot" if any(GEN in k for k in keys) else "dense",
        qk_norm=any(k.endswith("self_attn.q_norm.weight") for k in keys),
        qkv_bias=any(k.endswith("self_attn.q_proj.bias") for k in keys),
        visual_gen="vae2llm.weight" in keys,
        visual_und=f"{VIT_PREFIX}post_layernorm.weight" in keys,
    )
    if m.visual_gen:
        m.max_latent_size = math.isqrt(src.shapes["latent_pos_embed.pos_embed"][0])
        m.vae.update(_vae_config_from_ae(os.path.join(directory, AE_FILE)))
    if m.visual_und:
        vit = _read_json(os.path.join(directory, VIT_CONFIG))
        side = vit["image_size"] // vit["patch_size"]
        m.vit.update(
            hidden_size=vit["hidden_size"],
            intermediate_size=vit["intermediate_size"],
            num_layers=vit["num_hidden_layers"] - 1,
            num_heads=vit["num_attention_heads"],
            patch_size=vit["patch_size"],
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
            hidden_act=vit.get("hidden_act", "gelu_pytorch_tanh"),
            num_positions=side * side,
        )
        m.vit_max_num_patch_per_side = math.isqrt(src.shapes["vit_pos_embed.pos_embed"][0])
    return m


def _vae_config_from_ae(ae_path: str) -> dict:
    if not os.path.exists(ae_path):
        raise CheckpointError(f"{ae_path}: FLUX autoencoder file not found (the weights have vae2llm: visual_gen)")
    shapes = TensorSource([ae_path]).shapes
    if "encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"encoder.conv_in.weight: missing from {ae_path}")
    ch = shapes["encoder.conv_in.weight"][0]
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels))
    return dict(
        ch=ch,
        ch_mult=mult,
        num_res_blocks=blocks,
        z_channels=shapes["decoder.conv_in.weight"][1],
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_ch=shapes["decoder.conv_out.weight"][0],
    )


def llm_config_json(cfg) -> dict:
    """``llm_config.json`` content (Qwen2 config fields the reference reads)."""
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=head_dim(cfg),
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        max_position_embeddings=32768,
        qk_norm=cfg.qk_norm,
        layer_module="Qwen2MoTDecoderLayer" if cfg.layer_module == "mot" else "Qwen2DecoderLayer",
    )


def vit_config_json(cfg) -> dict:
    """``vit_config.json`` content; ``num_hidden_layers`` = used layers + 1 (the reference drops the last)."""
    v = cfg.vit
    side = math.isqrt(v.num_positions)
    if side * side != v.num_positions:
        raise CheckpointError(f"model.vit.num_positions: {v.num_positions} is not a square")
    return dict(
        model_type="siglip_vision_model",
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers + 1,
        num_attention_heads=v.num_heads,
        patch_size=v.patch_size,
        image_size=side * v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        num_channels=3,
    )


# --- writing ---------------------------------------------------------------------------------------


def params_to_state_dict(params: Mapping, cfg, dtype="bfloat16") -> dict[str, np.ndarray]:
    """``Bagel`` params (boxed or not, scanned or not) → the official ``ema.safetensors`` dict (no VAE)."""
    tree = dict(nn.unbox(params.get("params", params)))
    for name in scanned_stacks(cfg):
        tree[name] = unstack_layers(tree[name])
    dtype = np.dtype(dtype)
    out = {}
    for key, p, kind in entries(cfg):
        out[key] = np.ascontiguousarray(to_official(kind, np.asarray(_get(tree, p))).astype(dtype))
    _check_keys({k: v.shape for k, v in out.items()}, official_shapes(cfg), "the exported params")
    return out


def export_checkpoint(directory: str, params: Mapping, cfg, *, dtype="bfloat16", ae_dtype="float32"):
    """Writes ``ema.safetensors``, ``ae.safetensors`` (if visual_gen), ``llm_config.json``, ``vit_config.json``."""
    tree = nn.unbox(params.get("params", params))
    ae = None
    if cfg.visual_gen:
        ae = params_to_flux_ae(jax.tree.map(np.asarray, tree["vae"]), cfg.vae)
        ae = {k: v.astype(np.dtype(ae_dtype)) for k, v in ae.items()}
    _write_release(directory, cfg, params_to_state_dict(tree, cfg, dtype), ae)


def _write_release(directory: str, cfg, ema: Mapping[str, np.ndarray], ae: Mapping[str, np.ndarray] | None):
    """The release layout: ``ema`` → ``ema.safetensors``, ``ae`` (if given) → ``ae.safetensors``, the LLM config
    and (if visual_und) the ViT config as JSON."""
    os.makedirs(directory, exist_ok=True)
    save_file(dict(ema), os.path.join(directory, EMA_FILE))
    if ae is not None:
        save_file(dict(ae), os.path.join(directory, AE_FILE))
    with open(os.path.join(directory, LLM_CONFIG), "w") as fh:
        json.dump(llm_config_json(cfg), fh, indent=2)
    if cfg.visual_und:
        with open(os.path.join(directory, VIT_CONFIG), "w") as fh:
            json.dump(vit_config_json(cfg), fh, indent=2)


def random_state_dict(cfg, seed: int = 0, dtype="float32") -> dict[str, np.ndarray]:
    """A random ``ema.safetensors`` dict with every key of the release layout at ``cfg``'s shapes.

    Position tables get the fixed 2-D sin-cos values (as in the release); norm weights ≈ 1; other
    tensors N(0, 0.02²)-ish; ``llm2vae`` is random too (the reference zero-inits it, which would make
    velocities trivially 0).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in official_shapes(cfg).items():
        if key.endswith("pos_embed"):
            n = math.isqrt(shape[0])
            w = sincos_2d_table(shape[1], n)
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "position_embedding" in key:
            w = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 1
            w = rng.standard_normal(shape) * (min(0.02, fan_in**-0.5) if len(shape) == 2 else 0.02)
        out[key] = np.ascontiguousarray(np.asarray(w).astype(np.dtype(dtype)))
    return out


def random_ae_state_dict(cfg, seed: int = 0, dtype="float32") -> dict[str, np.ndarray]:
    """A random FLUX ``ae.safetensors`` dict (BFL names) for ``cfg.vae``, from an abstract ``FluxVAE`` init."""
    import jax.numpy as jnp

    from bagel_jax.model.vae import FluxVAE

    vae_cfg = cfg.vae
    f = 2 ** (len(vae_cfg.ch_mult) - 1)
    shapes = jax.eval_shape(
        lambda: nn.unbox(FluxVAE(vae_cfg).init(jax.random.key(0), jnp.zeros((1, f, f, vae_cfg.in_channels))))
    )
    rng = np.random.default_rng(seed + 1)

    def fill(kp, s):
        name = kp[-1].key
        if name == "scale":
            return 1.0 + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        if name == "bias":
            return 0.02 * rng.standard_normal(s.shape).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(np.float32)

    tree = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    return {k: v.astype(np.dtype(dtype)) for k, v in params_to_flux_ae(tree, vae_cfg).items()}


def write_random_checkpoint(directory: str, cfg, seed: int = 0, dtype="float32"):
    """Writes a random release-layout directory for the ``model`` config ``cfg`` (tests, CLI smoke runs)."""
    ae = random_ae_state_dict(cfg, seed, "float32") if cfg.visual_gen else None
    _write_release(directory, cfg, random_state_dict(cfg, seed, dtype), ae)


def load_checkpoint(directory: str, base: ml_collections.ConfigDict | None = None, **kwargs):
    """``(model_cfg, params)`` from a release directory (``config_from_checkpoint`` + ``load_params``)."""
    cfg = config_from_checkpoint(directory, base)
    return cfg, load_params(directory, cfg, **kwargs)
