"""``transformers`` checkpoints → bagel_jax params.

Qwen2 / Qwen3 CausalLM (and BAGEL's MoT LM, whose gen expert keys carry ``_moe_gen``) ⇄ the
``LanguageModel`` param tree documented in ``bagel_jax/model/mot.py``. Tensor layouts:

| HF key (under ``model.``)                          | ours                                    | transform |
|----------------------------------------------------|-----------------------------------------|-----------|
| ``embed_tokens.weight`` [V, D]                     | ``embed_tokens/embedding`` [V, D]       | — |
| ``layers.i.self_attn.{q,k,v}_proj{s}.weight`` [H·hd, D] | ``…/{q,k,v}_proj{s}/kernel`` [D, H, hd] | T, reshape |
| ``layers.i.self_attn.{q,k,v}_proj{s}.bias`` [H·hd] | ``…/bias`` [H, hd]                      | reshape |
| ``layers.i.self_attn.o_proj{s}.weight`` [D, H·hd]  | ``…/o_proj{s}/kernel`` [H, hd, D]       | T, reshape |
| ``layers.i.self_attn.{q,k}_norm{s}.weight`` [hd]   | ``…/{q,k}_norm{s}/scale``               | — |
| ``layers.i.mlp{s}.{gate,up,down}_proj.weight``     | ``layers_i/mlp{s}/…/kernel``            | T |
| ``layers.i.{input,post_attention}_layernorm{s}.weight`` / ``norm{s}.weight`` | ``…/scale`` | — |
| ``lm_head.weight`` [V, D] (top level)              | ``lm_head/kernel`` [D, V]               | T |

(``{s}`` = ``""`` for the und expert, ``"_moe_gen"`` for the gen expert.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bagel_jax.config import head_dim
from bagel_jax.convert.layer_stack import ConversionError, stack_layers, unstack_layers  # noqa: F401 (re-exported)
from bagel_jax.model.mot import GEN_SUFFIX, init_params

# Non-persistent buffers some exporters still write; never parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through f32)
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def lm_entries(cfg, key_prefix: str = "", path_prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], str]]:
    """(HF key, our param path, layout kind) for every ``LanguageModel`` parameter of ``cfg``; ``key_prefix`` and
    ``path_prefix`` place the LM inside a larger model (BAGEL: ``language_model.`` / ``("language_model",)``)."""
    suffixes = ("", GEN_SUFFIX) if cfg.layer_module == "mot" else ("",)
    out = [(f"{key_prefix}model.embed_tokens.weight", path_prefix + ("embed_tokens", "embedding"), "copy")]
    for i in range(cfg.num_layers):
        hf, ours = f"{key_prefix}model.layers.{i}.", path_prefix + (f"layers_{i}",)
        for s in suffixes:
            for p in ("q", "k", "v"):
                out.append(
                    (f"{hf}self_attn.{p}_proj{s}.weight", ours + ("self_attn", f"{p}_proj{s}", "kernel"), "in_heads")
                )
                if cfg.qkv_bias:
                    out.append(
                        (f"{hf}self_attn.{p}_proj{s}.bias", ours + ("self_attn", f"{p}_proj{s}", "bias"), "heads")
                    )
            out.append((f"{hf}self_attn.o_proj{s}.weight", ours + ("self_attn", f"o_proj{s}", "kernel"), "heads_out"))
            if cfg.qk_norm:
                for p in ("q", "k"):
                    out.append(
                        (f"{hf}self_attn.{p}_norm{s}.weight", ours + ("self_attn", f"{p}_norm{s}", "scale"), "copy")
                    )
            for p in ("gate", "up", "down"):
                out.append((f"{hf}mlp{s}.{p}_proj.weight", ours + (f"mlp{s}", f"{p}_proj", "kernel"), "linear"))
            for p in ("input_layernorm", "post_attention_layernorm"):
                out.append((f"{hf}{p}{s}.weight", ours + (f"{p}{s}", "scale"), "copy"))
    for s in suffixes:
        out.append((f"{key_prefix}model.norm{s}.weight", path_prefix + (f"norm{s}", "scale"), "copy"))
    if not cfg.tie_word_embeddings:
        out.append((f"{key_prefix}lm_head.weight", path_prefix + ("lm_head", "kernel"), "linear"))
    return out


def hf_to_ours(kind: str, w: np.ndarray, hd: int) -> np.ndarray:
    """Torch layout → ours for a layout ``kind`` (copy | linear | in_heads | heads | heads_out)."""
    if kind == "copy":
        return w
    if kind == "linear":  # [out, in] → [in, out]
        return w.T
    if kind == "in_heads":  # [H·hd, D] → [D, H, hd]
        return w.T.reshape(w.shape[1], -1, hd)
    if kind == "heads":  # [H·hd] → [H, hd]
        return w.reshape(-1, hd)
    if kind == "heads_out":  # [D, H·hd] → [H, hd, D]
        return w.T.reshape(-1, hd, w.shape[0])
    raise ValueError(f"unknown layout kind {kind!r}")


def ours_to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    """Our layout → torch layout (inverse of ``hf_to_ours``)."""
    if kind == "copy":
        return w
    if kind == "linear":
        return w.T
    if kind == "in_heads":  # [D, H, hd] → [H·hd, D]
        return w.reshape(w.shape[0], -1).T
    if kind == "heads":
        return w.reshape(-1)
    if kind == "heads_out":  # [H, hd, D] → [D, H·hd]
        return w.reshape(-1, w.shape[-1]).T
    raise ValueError(f"unknown layout kind {kind!r}")


def expected_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path → shape of an *unscanned* LanguageModel for ``cfg`` (abstract init, no compute)."""
    unscanned = ml_collections.ConfigDict(cfg.to_dict())
    unscanned.scan_layers, unscanned.remat = False, "none"
    tree = jax.eval_shape(lambda: nn.unbox(init_params(unscanned, jax.random.key(0))))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: tuple[str, ...], value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def qwen2_to_params(state_dict: Mapping[str, Any], cfg, copy_to_gen: bool = True, prefix: str = "") -> dict:
    """HF Qwen2/Qwen3 CausalLM (or BAGEL MoT LM) state dict → ``{"params": ...}`` for ``LanguageModel(cfg)``.

    Args:
      state_dict: name → np.ndarray | torch.Tensor (``model.state_dict()`` or safetensors contents).
      cfg: the config ``model`` section the params are for (shapes, qk_norm, qkv_bias, layer_module,
        scan_layers, param_dtype).
      copy_to_gen: for ``layer_module="mot"`` when the state dict has no ``_moe_gen`` keys: copy the und
        expert into the gen expert (BAGEL's ``init_moe``). If False, the gen expert is left out of the
        returned tree (merge it from an init). State dicts that do carry ``_moe_gen`` keys are read as is.
      prefix: key prefix to strip, e.g. ``"language_model."`` for a BAGEL checkpoint; keys outside it are
        ignored.

    Returns:
      {"params": tree} of numpy arrays in cfg.param_dtype; stacked (leading ``layers`` axis) when
      cfg.scan_layers.

    Raises:
      ConversionError naming the first missing / unexpected key or a shape mismatch.
    """
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    has_gen = any(GEN_SUFFIX in k for k in sd)
    if has_gen and cfg.layer_module != "mot":
        first = next(k for k in sd if GEN_SUFFIX in k)
        raise ConversionError(f"{prefix}{first}: unexpected key (gen expert) for layer_module={cfg.layer_module!r}")
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied exports repeat the embedding
    shapes = expected_shapes(cfg)
    hd = head_dim(cfg)
    pdtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    gen_entries = []
    for key, path, kind in lm_entries(cfg):
        is_gen = GEN_SUFFIX in key
        if is_gen and not has_gen:
            gen_entries.append((key, path))
            continue
        if key not in sd:
            raise ConversionError(f"{prefix}{key}: missing from the state dict")
        w = hf_to_ours(kind, _to_numpy(sd.pop(key)), hd)
        if w.shape != shapes[path]:
            raise ConversionError(
                f"{prefix}{key}: expected shape {shapes[path]} for {'/'.join(path)}, found {w.shape} after conversion"
            )
        _set(params, path, np.asarray(w, dtype=pdtype))
    if sd:
        raise ConversionError(f"{prefix}{sorted(sd)[0]}: unexpected key ({len(sd)} unexpected in all)")
    if gen_entries and copy_to_gen:
        for _, path in gen_entries:
            und_path = tuple(p.replace(GEN_SUFFIX, "") for p in path)
            _set(params, path, _get(params, und_path).copy())
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_layers)
    return {"params": params}


def params_to_qwen2(params: Mapping, cfg, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of ``qwen2_to_params``: ``{"params": tree}`` (scanned or not) → HF-named numpy state dict.

    Includes the gen expert (``_moe_gen`` keys) for ``layer_module="mot"``.
    """
    tree = params.get("params", params)
    tree = jax.tree.map(np.asarray, nn.unbox(tree))
    if "layers" in tree:
        tree = unstack_layers(tree)
    return {prefix + key: ours_to_hf(kind, _get(tree, path)) for key, path, kind in lm_entries(cfg)}


def model_config_from_hf(hf_config, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A ``model`` config section with the LLM shapes of a transformers Qwen2/Qwen3 config.

    Starts from ``base`` (default: ``base_config().model``) and sets vocab/hidden/intermediate sizes,
    layers, heads, head_dim, rope_theta (transformers ≥ 5 keeps it in ``rope_parameters``), rms_norm_eps,
    tie_word_embeddings, qk_norm (Qwen3) and qkv_bias.
    """
    from bagel_jax.config import base_config

    m = ml_collections.ConfigDict((base or base_config().model).to_dict())
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ConversionError("rope_theta: not found in the HF config (rope_parameters or rope_theta)")
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_parameters.rope_type: only 'default' RoPE is supported, got {rope['rope_type']!r}")
    heads = hf_config.num_attention_heads
    hd = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    is_qwen3 = getattr(hf_config, "model_type", "") == "qwen3"
    m.update(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=0 if hd * heads == hf_config.hidden_size else hd,
        rope_theta=float(theta),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qk_norm=is_qwen3 or bool(getattr(hf_config, "qk_norm", False)),
        qkv_bias=bool(getattr(hf_config, "attention_bias", True)) if is_qwen3 else True,
    )
    return m


# SigLIP and FLUX VAE converters (bagel_jax/convert/hf_vision.py), re-exported here.
from bagel_jax.convert.hf_vision import *  # noqa: E402,F401,F403
