"""Vision-tower checkpoint converters: state dicts (torch or numpy tensors) ⇄ Flax params.

* ``siglip_to_params(sd, cfg)``: ``transformers`` ``SiglipVisionModel`` (or BAGEL's ``vit_model.*``)
  → ``SiglipNaViT`` params (``params_to_siglip`` is the inverse, with the HF conv patch embedding). The conv
  patch embedding becomes the Linear on (ph, pw, c)-ordered features
  (as the reference's ``convert_conv2d_to_linear``); only the first ``cfg.vit.num_layers`` encoder
  layers are taken (the reference drops the last one); the pooling ``head`` is not used.
* ``diffusers_vae_to_params(sd, cfg)``: diffusers ``AutoencoderKL`` (FLUX layout, no quant convs)
  → ``FluxVAE`` params.
* ``flux_ae_to_params(sd, cfg)`` / ``params_to_flux_ae(params, cfg)``: BFL's FLUX ``ae.safetensors``
  key layout (what the reference loads) ⇄ ``FluxVAE`` params. ``flux_ae_keys(cfg)`` lists every key.

Every converter is strict: a missing or unexpected key raises ``KeyError`` naming it, a wrong shape
raises ``ValueError`` naming the key, the expected and the found shape. Returned params are nested
dicts of float32 numpy arrays, i.e. the content of the ``params`` collection
(``module.apply({"params": params}, ...)``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bagel_jax.convert.layer_stack import stack_layers, unstack_layers
from bagel_jax.model.siglip import SiglipNaViT
from bagel_jax.model.vae import FluxVAE

__all__ = [
    "siglip_to_params",
    "params_to_siglip",
    "diffusers_vae_to_params",
    "flux_ae_to_params",
    "params_to_flux_ae",
    "flux_ae_keys",
    "SIGLIP_PREFIXES",
]

SIGLIP_PREFIXES = ("vit_model.vision_model.", "vision_model.", "")


# --- tensor layouts ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one torch tensor maps to one Flax param (and back)."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple]  # flax shape → the torch shape it comes from


SAME = Layout("same", lambda a: a, lambda a: a, tuple)
LINEAR = Layout("linear", lambda a: a.T, lambda a: a.T, lambda s: (s[1], s[0]))  # [O, I] ⇄ [I, O]
CONV = Layout(
    "conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1), lambda s: (s[3], s[2], s[0], s[1])
)  # [O, I, kh, kw] ⇄ [kh, kw, I, O]
CONV1X1 = Layout(
    "conv1x1", lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None], lambda s: (s[1], s[0], 1, 1)
)  # [O, I, 1, 1] ⇄ Dense [I, O]


def _patch_conv_to_flax(a):
    if a.ndim == 2:  # already the reference's Linear form [D, p·p·3]
        return a.T
    d = a.shape[0]  # conv [D, 3, p, p] → Linear over (ph, pw, c) = W.permute(0, 2, 3, 1).reshape(D, -1)
    return a.transpose(0, 2, 3, 1).reshape(d, -1).T


PATCH_CONV = Layout("patch_conv", _patch_conv_to_flax, lambda a: a.T, lambda s: (s[1], s[0]))


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor (any dtype, incl. bf16)
        t = t.detach().cpu()
        return t.float().numpy() if t.is_floating_point() else t.numpy()
    return np.asarray(t, dtype=np.float32)


# --- generic strict conversion -------------------------------------------------------------------

Entry = tuple[str, tuple[str, ...], Layout]  # (source key, flax param path, layout)


def _section(cfg, key: str):
    """Accepts the whole config, the ``model`` section or the sub-section itself."""
    if "model" in cfg:
        cfg = cfg.model
    if key == "model":
        return cfg
    return cfg[key] if key in cfg else cfg


def _expected_shapes(module: nn.Module, *args, method=None) -> dict[tuple[str, ...], tuple]:
    def init():
        return module.init(jax.random.PRNGKey(0), *args, method=method)

    variables = jax.eval_shape(init)
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))
    return {path: tuple(v.shape) for path, v in flat.items()}


def _convert(
    sd: Mapping[str, Any],
    entries: Iterable[Entry],
    expected: dict,
    what: str,
    ignored: Callable[[str], bool] = lambda key: False,
    prefix: str = "",
) -> dict:
    entries = list(entries)
    by_key = {prefix + key: (path, layout) for key, path, layout in entries}
    mapped_paths = {path for _, path, _ in entries}
    if mapped_paths != set(expected):  # a bug in the key table, not in the input
        raise AssertionError(f"{what}: key table does not cover the params: {sorted(set(expected) ^ mapped_paths)[:3]}")
    for key in sd:
        if key not in by_key and not ignored(key[len(prefix) :] if key.startswith(prefix) else key):
            raise KeyError(f"{what}: unexpected key {key!r}")
    flat = {}
    for key, (path, layout) in by_key.items():
        if key not in sd:
            raise KeyError(f"{what}: missing key {key!r}")
        value = _to_numpy(sd[key])
        want = layout.torch_shape(expected[path])
        if layout is PATCH_CONV and value.ndim == 4:
            d, p = expected[path][1], int(round((expected[path][0] / 3) ** 0.5))
            want = (d, 3, p, p)
        if tuple(value.shape) != want:
            raise ValueError(f"{what}: key {key!r} has shape {tuple(value.shape)}, expected {want}")
        flat[path] = np.ascontiguousarray(layout.to_flax(value), dtype=np.float32)
    return traverse_util.unflatten_dict(flat)


def _to_torch(params, entries: Iterable[Entry], expected: dict, what: str, prefix: str = "") -> dict:
    """Inverse of ``_convert``: Flax params → {prefix + key: float32 numpy array in torch layout}; strict."""
    entries = list(entries)
    flat = _flat_params(params)
    wanted = {path for _, path, _ in entries}
    for path in flat:
        if path not in wanted:
            raise KeyError(f"{what}: unexpected param {'/'.join(path)!r}")
    out = {}
    for key, path, layout in entries:
        if path not in flat:
            raise KeyError(f"{what}: missing param {'/'.join(path)!r} (for {key!r})")
        value = np.asarray(flat[path], dtype=np.float32)
        if tuple(value.shape) != expected[path]:
            raise ValueError(
                f"{what}: param {'/'.join(path)!r} has shape {tuple(value.shape)}, expected {expected[path]}"
            )
        out[prefix + key] = np.ascontiguousarray(layout.to_torch(value))
    return out


def _flat_params(params) -> dict:
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return traverse_util.flatten_dict(params)


# --- SigLIP --------------------------------------------------------------------------------------


def _siglip_entries(num_layers: int) -> list[Entry]:
    e: list[Entry] = [
        ("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), PATCH_CONV),
        ("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), SAME),
        ("embeddings.position_embedding.weight", ("position_embedding",), SAME),
        ("post_layernorm.weight", ("post_layernorm", "scale"), SAME),
        ("post_layernorm.bias", ("post_layernorm", "bias"), SAME),
    ]
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"layers_{i}"
        for ln in ("layer_norm1", "layer_norm2"):
            e += [(f"{src}{ln}.weight", (dst, ln, "scale"), SAME), (f"{src}{ln}.bias", (dst, ln, "bias"), SAME)]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e += [
                (f"{src}self_attn.{proj}.weight", (dst, "self_attn", proj, "kernel"), LINEAR),
                (f"{src}self_attn.{proj}.bias", (dst, "self_attn", proj, "bias"), SAME),
            ]
        for fc in ("fc1", "fc2"):
            e += [
                (f"{src}mlp.{fc}.weight", (dst, "mlp", fc, "kernel"), LINEAR),
                (f"{src}mlp.{fc}.bias", (dst, "mlp", fc, "bias"), SAME),
            ]
    return e


def siglip_to_params(hf_state_dict: Mapping[str, Any], cfg, prefix: str | None = None) -> dict:
    """transformers ``SiglipVisionModel`` state dict → ``SiglipNaViT`` params.

    Args:
      hf_state_dict: tensors keyed ``[prefix]embeddings.*``, ``[prefix]encoder.layers.{i}.*``,
        ``[prefix]post_layernorm.*`` (``head.*``, layers ≥ ``cfg.vit.num_layers`` and
        ``embeddings.position_ids`` are ignored). The patch embedding may be the HF conv [D, 3, p, p]
        or BAGEL's Linear [D, p·p·3].
      cfg: the config, or its ``model`` section.
      prefix: key prefix; default: the first of ``SIGLIP_PREFIXES`` under which ``post_layernorm.weight``
        exists.
    """
    model_cfg = _section(cfg, "model")
    if prefix is None:
        found = [p for p in SIGLIP_PREFIXES if p + "post_layernorm.weight" in hf_state_dict]
        if not found:
            raise KeyError(
                f"siglip_to_params: missing key 'post_layernorm.weight' (under any prefix of {SIGLIP_PREFIXES})"
            )
        prefix = found[0]
    v = model_cfg.vit
    expected = _siglip_expected(model_cfg)
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.")

    def ignored(key: str) -> bool:
        m = layer_re.match(key)
        return (
            key.startswith("head.")
            or key == "embeddings.position_ids"
            or (m is not None and int(m.group(1)) >= v.num_layers)
        )

    params = _convert(hf_state_dict, _siglip_entries(v.num_layers), expected, "siglip_to_params", ignored, prefix)
    return stack_layers(params, v.num_layers) if v.get("scan_layers", False) else params


def params_to_siglip(params, cfg, prefix: str = "vision_model.") -> dict[str, np.ndarray]:
    """``SiglipNaViT`` params → a transformers ``SiglipVisionModel`` state dict (inverse of ``siglip_to_params``):
    float32 numpy arrays keyed ``{prefix}embeddings.*`` etc., the patch embedding as the HF conv [D, 3, p, p]."""
    model_cfg = _section(cfg, "model")
    v = model_cfg.vit
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if "layers" in params:  # model.vit.scan_layers: per-layer subtrees for the per-layer keys
        params = unstack_layers(jax.tree.map(np.asarray, params))
    out = _to_torch(params, _siglip_entries(v.num_layers), _siglip_expected(model_cfg), "params_to_siglip", prefix)
    key = prefix + "embeddings.patch_embedding.weight"  # Linear [D, (ph, pw, c)] → conv [D, c, ph, pw]
    out[key] = np.ascontiguousarray(out[key].reshape(-1, v.patch_size, v.patch_size, 3).transpose(0, 3, 1, 2))
    return out


def _siglip_expected(model_cfg) -> dict:
    """Param path → shape of the *unscanned* SigLIP (the converters' per-layer layout)."""
    feat = model_cfg.vit.patch_size**2 * 3
    unscanned = model_cfg.copy_and_resolve_references()
    with unscanned.ignore_type():
        unscanned.vit.scan_layers = False
    return _expected_shapes(
        SiglipNaViT(unscanned), jnp.zeros((1, 1, feat)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)
    )


# --- FLUX VAE: shared structure ------------------------------------------------------------------


def _resnet_entries(src: str, dst: tuple[str, ...], c_in: int, c_out: int, names: dict) -> list[Entry]:
    e: list[Entry] = []
    for part in ("norm1", "norm2"):
        e += [
            (f"{src}.{names[part]}.weight", dst + (part, "scale"), SAME),
            (f"{src}.{names[part]}.bias", dst + (part, "bias"), SAME),
        ]
    for part in ("conv1", "conv2"):
        e += [
            (f"{src}.{names[part]}.weight", dst + (part, "kernel"), CONV),
            (f"{src}.{names[part]}.bias", dst + (part, "bias"), SAME),
        ]
    if c_in != c_out:
        e += [
            (f"{src}.{names['nin_shortcut']}.weight", dst + ("nin_shortcut", "kernel"), CONV1X1),
            (f"{src}.{names['nin_shortcut']}.bias", dst + ("nin_shortcut", "bias"), SAME),
        ]
    return e


def _conv_entries(src: str, dst: tuple[str, ...]) -> list[Entry]:
    return [(f"{src}.weight", dst + ("kernel",), CONV), (f"{src}.bias", dst + ("bias",), SAME)]


def _norm_entries(src: str, dst: tuple[str, ...]) -> list[Entry]:
    return [(f"{src}.weight", dst + ("scale",), SAME), (f"{src}.bias", dst + ("bias",), SAME)]


def _vae_entries(
    cfg, names: Callable[[str, tuple], str], resnet_names: dict, attn_names: dict, attn_layout: Layout
) -> list[Entry]:
    """Entries for both towers; ``names(kind, index)`` gives each source module's key prefix."""
    ch, mult, nrb, levels = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, len(cfg.ch_mult)
    mid_ch = ch * mult[-1]
    e: list[Entry] = []

    def mid(tower):
        out = []
        for which in ("block_1", "block_2"):
            out += _resnet_entries(
                names(f"{tower}.mid.{which}", ()), (tower, f"mid_{which}"), mid_ch, mid_ch, resnet_names
            )
        src = names(f"{tower}.mid.attn_1", ())
        out += _norm_entries(f"{src}.{attn_names['norm']}", (tower, "mid_attn_1", "norm"))
        for part in ("q", "k", "v", "proj_out"):
            out += [
                (f"{src}.{attn_names[part]}.weight", (tower, "mid_attn_1", part, "kernel"), attn_layout),
                (f"{src}.{attn_names[part]}.bias", (tower, "mid_attn_1", part, "bias"), SAME),
            ]
        return out

    # encoder
    e += _conv_entries(names("encoder.conv_in", ()), ("encoder", "conv_in"))
    c_in = ch
    for i in range(levels):
        for j in range(nrb):
            e += _resnet_entries(
                names("encoder.down.block", (i, j)),
                ("encoder", f"down_{i}_block_{j}"),
                c_in,
                ch * mult[i],
                resnet_names,
            )
            c_in = ch * mult[i]
        if i != levels - 1:
            e += _conv_entries(names("encoder.down.downsample", (i,)), ("encoder", f"down_{i}_downsample", "conv"))
    e += mid("encoder")
    e += _norm_entries(names("encoder.norm_out", ()), ("encoder", "norm_out"))
    e += _conv_entries(names("encoder.conv_out", ()), ("encoder", "conv_out"))
    # decoder
    e += _conv_entries(names("decoder.conv_in", ()), ("decoder", "conv_in"))
    e += mid("decoder")
    c_in = mid_ch
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            e += _resnet_entries(
                names("decoder.up.block", (i, j)), ("decoder", f"up_{i}_block_{j}"), c_in, ch * mult[i], resnet_names
            )
            c_in = ch * mult[i]
        if i != 0:
            e += _conv_entries(names("decoder.up.upsample", (i,)), ("decoder", f"up_{i}_upsample", "conv"))
    e += _norm_entries(names("decoder.norm_out", ()), ("decoder", "norm_out"))
    e += _conv_entries(names("decoder.conv_out", ()), ("decoder", "conv_out"))
    return e


_VAE_SHAPES: dict[tuple, dict] = {}


def _vae_expected(cfg) -> dict:
    key = (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels, cfg.in_channels, cfg.out_ch)
    if key not in _VAE_SHAPES:
        f = 2 ** (len(cfg.ch_mult) - 1)
        _VAE_SHAPES[key] = _expected_shapes(FluxVAE(cfg), jnp.zeros((1, f, f, cfg.in_channels)))
    return _VAE_SHAPES[key]


# --- BFL (original FLUX ae.safetensors) layout ---------------------------------------------------

_BFL_RESNET = dict(norm1="norm1", conv1="conv1", norm2="norm2", conv2="conv2", nin_shortcut="nin_shortcut")
_BFL_ATTN = dict(norm="norm", q="q", k="k", v="v", proj_out="proj_out")


def _bfl_names(kind: str, idx: tuple) -> str:
    if kind == "encoder.down.block":
        return f"encoder.down.{idx[0]}.block.{idx[1]}"
    if kind == "encoder.down.downsample":
        return f"encoder.down.{idx[0]}.downsample.conv"
    if kind == "decoder.up.block":  # BFL's up[i] is resolution level i (built reversed, then prepended)
        return f"decoder.up.{idx[0]}.block.{idx[1]}"
    if kind == "decoder.up.upsample":
        return f"decoder.up.{idx[0]}.upsample.conv"
    return kind  # encoder.conv_in, encoder.mid.block_1, encoder.mid.attn_1, encoder.norm_out, ...


def _bfl_entries(cfg) -> list[Entry]:
    return _vae_entries(cfg, _bfl_names, _BFL_RESNET, _BFL_ATTN, CONV1X1)


def flux_ae_keys(cfg) -> list[str]:
    """Every key of a FLUX ``ae.safetensors`` for this config (244 for the release config), in order.

    ``encoder.conv_in``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2[,nin_shortcut]}``,
    ``encoder.down.{i}.downsample.conv`` (i < L-1), ``encoder.mid.{block_1,attn_1.{norm,q,k,v,proj_out},
    block_2}``, ``encoder.norm_out``, ``encoder.conv_out``; ``decoder.conv_in``, ``decoder.mid.*``,
    ``decoder.up.{i}.block.{j}`` (j ≤ num_res_blocks), ``decoder.up.{i}.upsample.conv`` (i > 0),
    ``decoder.norm_out``, ``decoder.conv_out``; each with ``.weight`` and ``.bias``.
    """
    return [key for key, _, _ in _bfl_entries(_section(cfg, "vae"))]


def flux_ae_to_params(sd: Mapping[str, Any], cfg) -> dict:
    """BFL FLUX autoencoder state dict (``ae.safetensors`` names) → ``FluxVAE`` params."""
    cfg = _section(cfg, "vae")
    return _convert(sd, _bfl_entries(cfg), _vae_expected(cfg), "flux_ae_to_params")


def params_to_flux_ae(params, cfg) -> dict[str, np.ndarray]:
    """``FluxVAE`` params → BFL FLUX state dict {key: float32 numpy array in torch layout}."""
    cfg = _section(cfg, "vae")
    return _to_torch(params, _bfl_entries(cfg), _vae_expected(cfg), "params_to_flux_ae")


# --- diffusers AutoencoderKL layout --------------------------------------------------------------

_DIFFUSERS_RESNET = dict(norm1="norm1", conv1="conv1", norm2="norm2", conv2="conv2", nin_shortcut="conv_shortcut")
_DIFFUSERS_ATTN = dict(norm="group_norm", q="to_q", k="to_k", v="to_v", proj_out="to_out.0")


def _diffusers_names(levels: int):
    fixed = {
        "encoder.conv_in": "encoder.conv_in",
        "encoder.norm_out": "encoder.conv_norm_out",
        "encoder.conv_out": "encoder.conv_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.norm_out": "decoder.conv_norm_out",
        "decoder.conv_out": "decoder.conv_out",
    }
    for tower in ("encoder", "decoder"):
        fixed[f"{tower}.mid.block_1"] = f"{tower}.mid_block.resnets.0"
        fixed[f"{tower}.mid.block_2"] = f"{tower}.mid_block.resnets.1"
        fixed[f"{tower}.mid.attn_1"] = f"{tower}.mid_block.attentions.0"

    def names(kind: str, idx: tuple) -> str:
        if kind == "encoder.down.block":
            return f"encoder.down_blocks.{idx[0]}.resnets.{idx[1]}"
        if kind == "encoder.down.downsample":
            return f"encoder.down_blocks.{idx[0]}.downsamplers.0.conv"
        if kind == "decoder.up.block":  # diffusers' up_blocks run in order: block k is level L-1-k
            return f"decoder.up_blocks.{levels - 1 - idx[0]}.resnets.{idx[1]}"
        if kind == "decoder.up.upsample":
            return f"decoder.up_blocks.{levels - 1 - idx[0]}.upsamplers.0.conv"
        return fixed[kind]

    return names


def diffusers_vae_to_params(sd: Mapping[str, Any], cfg) -> dict:
    """diffusers ``AutoencoderKL`` state dict (FLUX layout: no quant convs) → ``FluxVAE`` params.

    ``quant_conv`` / ``post_quant_conv`` keys are rejected (FLUX has none).
    """
    cfg = _section(cfg, "vae")
    entries = _vae_entries(cfg, _diffusers_names(len(cfg.ch_mult)), _DIFFUSERS_RESNET, _DIFFUSERS_ATTN, LINEAR)
    return _convert(sd, entries, _vae_expected(cfg), "diffusers_vae_to_params")
