"""A release folder (``ema.safetensors`` or ``model.safetensors``, ``ae.safetensors``, ``llm_config.json``,
``vit_config.json``) → sharded ``Bagel`` params, each tensor straight to its shards.

``load_release_sharded`` builds every param with ``jax.make_array_from_callback``: for each shard a host's devices
hold, it reads only that slice of the official tensor (``safe_open(...).get_slice``), maps it from torch layout to
ours (``bagel_ckpt`` layout kinds: a transposed linear reads the transposed slice; q/k/v/o read whole heads) and
casts it to the param's dtype. A file is opened (memory-mapped) for one param at a time and closed after it, so
host memory holds at most one tensor's pages and its shards beyond the result (scan-stacked layers: one layer at a
time). Values equal ``bagel_ckpt.load_params`` bitwise. The FLUX autoencoder (≤ 84M params) is converted as a
whole on the host, then placed.

``check_release`` compares a ``model`` config with the release's json and headers (no tensor is read): a
mismatch is one ``CheckpointError`` naming the key and both values.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from bagel_jax.config import head_dim
from bagel_jax.convert.bagel_ckpt import (
    AE_FILE,
    LLM_CONFIG,
    VIT_CONFIG,
    WEIGHT_FILES,
    CheckpointError,
    TensorSource,
    _check_keys,
    config_from_checkpoint,
    entries,
    load_vae_params,
    official_shapes,
    weight_files,
)
from bagel_jax.convert.layer_stack import scanned_stacks
from bagel_jax.model.lora import is_lora_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer reads, in order of preference
# model config keys a release fixes, with the release file that holds each
CHECKED_KEYS = (
    ("vocab_size", LLM_CONFIG),
    ("hidden_size", LLM_CONFIG),
    ("intermediate_size", LLM_CONFIG),
    ("num_layers", LLM_CONFIG),
    ("num_heads", LLM_CONFIG),
    ("num_kv_heads", LLM_CONFIG),
    ("tie_word_embeddings", LLM_CONFIG),
    ("layer_module", "the weights"),
    ("qk_norm", "the weights"),
    ("qkv_bias", "the weights"),
    ("visual_gen", "the weights"),
    ("visual_und", "the weights"),
    ("max_latent_size", "the weights"),
    ("vit_max_num_patch_per_side", "the weights"),
    ("vit.hidden_size", VIT_CONFIG),
    ("vit.intermediate_size", VIT_CONFIG),
    ("vit.num_layers", VIT_CONFIG),
    ("vit.num_heads", VIT_CONFIG),
    ("vit.patch_size", VIT_CONFIG),
    ("vit.num_positions", VIT_CONFIG),
    ("vae.ch", AE_FILE),
    ("vae.ch_mult", AE_FILE),
    ("vae.num_res_blocks", AE_FILE),
    ("vae.z_channels", AE_FILE),
)


def is_release(path: str) -> bool:
    """Whether ``path`` is a release folder (``llm_config.json`` or a weights file), not an Orbax tree / workdir."""
    if not os.path.isdir(path):
        return False
    names = (LLM_CONFIG,) + WEIGHT_FILES + tuple(f + ".index.json" for f in WEIGHT_FILES)
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def release_tokenizer(path: str) -> str | None:
    """The tokenizer file a release folder ships (``tokenizer.json``, else a SentencePiece ``tokenizer.model``), or
    None."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return tuple(cfg) if isinstance(cfg, (list, tuple)) else cfg


def check_release(path: str, cfg) -> None:
    """Raises ``CheckpointError`` (one line naming the file or key) unless ``path`` is a readable release folder
    whose shapes are those of the ``model`` config ``cfg``. Reads the json files and safetensors headers only."""
    for name in (LLM_CONFIG,) + ((VIT_CONFIG,) if cfg.visual_und else ()) + ((AE_FILE,) if cfg.visual_gen else ()):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{os.path.join(path, name)}: missing from the release folder")
    src = open_source(path)
    if cfg.visual_gen:
        open_source(os.path.join(path, AE_FILE))
    try:
        rel = config_from_checkpoint(path, cfg)
    except (KeyError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable release config ({type(e).__name__}: {e})") from None
    for key, where in CHECKED_KEYS:
        if key.startswith("vit.") and not cfg.visual_und or key.startswith("vae.") and not cfg.visual_gen:
            continue
        if (
            key in ("max_latent_size",)
            and not cfg.visual_gen
            or key == "vit_max_num_patch_per_side"
            and not (cfg.visual_und)
        ):
            continue
        ours, theirs = _get(cfg, key), _get(rel, key)
        if ours != theirs:
            raise CheckpointError(f"model.{key}: {ours!r} in the config, {theirs!r} in {where} of {path}")
    if head_dim(cfg) != head_dim(rel):
        raise CheckpointError(
            f"model.head_dim: {head_dim(cfg)} in the config, {head_dim(rel)} in {LLM_CONFIG} of {path}"
        )
    _check_keys(src.shapes, official_shapes(cfg), ", ".join(src.files))


def open_source(path: str) -> TensorSource:
    """``TensorSource.from_dir_or_file``, each file's header checked first: an unreadable or truncated file is a
    ``CheckpointError`` naming it."""
    files = weight_files(path)
    for f in files:
        try:
            with safe_open(f, framework="numpy"):
                pass
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
    return TensorSource(files)


# --- one shard of one tensor -----------------------------------------------------------------------


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s}")
        out.append(slice(start, stop))
    return tuple(out)


def read_shard(tensor, kind: str, index: tuple[slice, ...], hd: int) -> np.ndarray:
    """The slice ``index`` (of our layout) of a torch-layout tensor, read through ``tensor[...]`` (a safetensors
    slice), in our layout. ``index`` holds plain ``start:stop`` slices of our shape."""
    if kind == "copy":
        return tensor[index]
    if kind == "linear":  # ours [in, out] = torch [out, in].T
        a, b = index
        return tensor[b, a].T
    if kind == "in_heads":  # ours [D, H, hd][d, h, k] = torch [H·hd, D][h·hd + k, d]
        d, h, k = index
        w = tensor[slice(h.start * hd, h.stop * hd), d]
        return w.T.reshape(w.shape[1], -1, hd)[:, :, k]
    if kind == "heads":  # ours [H, hd] = torch [H·hd]
        h, k = index
        return tensor[slice(h.start * hd, h.stop * hd)].reshape(-1, hd)[:, k]
    if kind == "heads_out":  # ours [H, hd, D][h, k, d] = torch [D, H·hd][d, h·hd + k]
        h, k, d = index
        w = tensor[d, slice(h.start * hd, h.stop * hd)]
        return w.T.reshape(-1, hd, w.shape[0])[:, k, :]
    raise ValueError(f"unknown layout kind {kind!r}")


def _place(
    src: TensorSource, keys: list[str], kind: str, shape: tuple[int, ...], dtype, sharding, hd: int, stacked: bool
) -> jax.Array:
    """One param from ``keys`` (one key; or one per layer when ``stacked`` on a leading layer axis)."""
    cache: dict[tuple, np.ndarray] = {}  # replicated shards read once
    with contextlib.ExitStack() as stack:
        files = {p: stack.enter_context(safe_open(p, framework="numpy")) for p in {src.where[k] for k in keys}}
        tensor = lambda key: files[src.where[key]].get_slice(key)  # noqa: E731

        def shard(index):
            idx = _bounds(index, shape)
            tag = tuple((s.start, s.stop) for s in idx)
            if tag not in cache:
                if stacked:
                    parts = [
                        read_shard(tensor(keys[i]), kind, idx[1:], hd).astype(dtype)
                        for i in range(idx[0].start, idx[0].stop)
                    ]
                    cache[tag] = np.ascontiguousarray(np.stack(parts))
                else:
                    cache[tag] = np.ascontiguousarray(read_shard(tensor(keys[0]), kind, idx, hd).astype(dtype))
            return cache[tag]

        return jax.make_array_from_callback(shape, sharding, shard)


def _path(kp) -> tuple[str, ...]:
    return tuple(k.key for k in kp)


def load_release_sharded(path: str, cfg, shardings: Any, like: Any) -> Any:
    """The ``Bagel`` params of the release folder ``path``, every leaf a ``jax.Array`` with the sharding of the
    same leaf in ``shardings`` and the dtype and shape of ``like`` (a param tree of arrays or
    ``ShapeDtypeStruct``s, e.g. the fresh state's params). ``cfg``: the ``model`` config (``check_release`` it
    first). LoRA adapter leaves (model/lora.py) keep ``like``'s values (a fresh init: B = 0). Raises
    ``CheckpointError`` naming a missing/unexpected key or a wrong shape."""
    src = open_source(path)
    _check_keys(src.shapes, official_shapes(cfg), ", ".join(src.files))
    table = {p: (key, kind) for key, p, kind in entries(cfg)}
    hd = head_dim(cfg)
    stacks = scanned_stacks(cfg)
    flat_like = {_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(like)}
    flat_shard = {_path(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(shardings)}
    out: dict[tuple[str, ...], Any] = {}
    vae_paths = [p for p in flat_like if p[0] == "vae"]
    for p, x in flat_like.items():
        if p[0] == "vae":
            continue
        if is_lora_path("/".join(p)) and isinstance(x, jax.Array):  # LoRA adapters: not in a release; kept fresh
            out[p] = x
            continue
        stacked = p[0] in stacks and p[1] == "layers"
        if stacked:
            per_layer = [table[(p[0], f"layers_{i}") + p[2:]] for i in range(stacks[p[0]])]
            keys, kind = [key for key, _ in per_layer], per_layer[0][1]
        elif p in table:
            key, kind = table[p]
            keys = [key]
        else:
            raise CheckpointError(f"{'/'.join(p)}: a model param with no tensor in the release layout")
        out[p] = _place(src, list(keys), kind, tuple(x.shape), np.dtype(x.dtype), flat_shard[p], hd, stacked)
    if vae_paths:
        ae = os.path.join(path, AE_FILE)
        try:
            vae = load_vae_params(ae, cfg, dtype=np.float32)
        except SafetensorError as e:
            raise CheckpointError(f"{ae}: unreadable or truncated ({e})") from None
        for kp, a in jax.tree_util.tree_leaves_with_path(vae):
            p = ("vae",) + _path(kp)
            if p not in flat_like:
                raise CheckpointError(f"{'/'.join(p)}: in {ae} but not in the model")
            out[p] = jax.device_put(np.asarray(a, np.dtype(flat_like[p].dtype)), flat_shard[p])
    missing = [p for p in flat_like if p not in out]
    if missing:
        raise CheckpointError(f"{'/'.join(missing[0])}: a model param missing from {path}")
    return _unflatten(like, out)


def _unflatten(like: Any, flat: Mapping[tuple[str, ...], Any]) -> Any:
    leaves = [flat[_path(kp)] for kp, _ in jax.tree_util.tree_leaves_with_path(like)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)
