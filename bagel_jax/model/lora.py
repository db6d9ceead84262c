"""LoRA: low-rank adapters on the MoT decoder's linear layers (config ``model.lora``; docs/DESIGN_NOTES.md note 27).

An adapted layer with kernel W [*in, *out] computes ``x·W + (alpha/rank)·(x·A)·B`` with, next to its kernel,
``lora_a`` A [*in, r] (logical axes of W's input dims + ``lora_rank``; kaiming-uniform like PEFT) and
``lora_b`` B [r, *out] (``lora_rank`` + W's output axes; zeros, so an adapter at init leaves the output exactly
the base's). ``lora_rank`` is replicated (parallel/rules.py), so A and B shard like W's own dims. Targets:
``q``/``k``/``v`` (kernels [D, H, hd]), ``o`` ([H, hd, D]), ``mlp`` (gate/up [D, F], down [F, D]), per expert
(``und``: suffix "", ``gen``: ``_moe_gen``). With adapters in the tree only ``lora_a``/``lora_b`` train
(train/optim.py); ``merged`` folds them into W, for the export (``merge_kernel``, on the host) and for a load into
a model without them (convert/lora_merge.py, on the devices).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any
LORA_PARAM = re.compile(r"(^|/)lora_[ab]$")
GEN_SUFFIX = "_moe_gen"
# release module name -> (LoRA kind, number of input dims of its kernel)
MODULE_KIND = {
    "q_proj": ("q", 1),
    "k_proj": ("k", 1),
    "v_proj": ("v", 1),
    "o_proj": ("o", 2),
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}


def enabled(cfg) -> bool:
    """Whether the model config ``cfg`` (the ``model`` section) adds adapters."""
    lora = cfg.get("lora") if hasattr(cfg, "get") else None
    return bool(lora) and int(lora.rank) > 0


def lora_for(cfg, suffix: str, kind: str) -> tuple[int, float] | None:
    """(rank, alpha) when the layer of ``kind`` of the expert with param ``suffix`` is adapted, else None."""
    if not enabled(cfg):
        return None
    expert = "gen" if suffix == GEN_SUFFIX else "und"
    if expert not in cfg.lora.experts or kind not in cfg.lora.targets:
        return None
    return int(cfg.lora.rank), float(cfg.lora.alpha)


def adapter(
    module: nn.Module,
    x,
    in_axes: tuple[str, ...],
    out_shape: tuple[int, ...],
    out_axes: tuple[str, ...],
    rank: int,
    alpha: float,
    dtype: Dtype,
    param_dtype: Dtype,
):
    """(alpha/rank)·(x·A)·B: x [..., *in] → [..., *out], creating ``lora_a``/``lora_b`` in ``module`` (compact)."""
    n_in = len(in_axes)
    in_shape = tuple(x.shape[x.ndim - n_in :])
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param(
        "lora_a", nn.with_logical_partitioning(a_init, (*in_axes, "lora_rank")), (*in_shape, rank), param_dtype
    )
    b = module.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", *out_axes)),
        (rank, *out_shape),
        param_dtype,
    )
    in_sub = "abcdefg"[:n_in]
    h = jnp.einsum(f"...{in_sub},{in_sub}r->...r", x.astype(dtype), a.astype(dtype))
    out_sub = "stuvw"[: len(out_shape)]
    y = jnp.einsum(f"...r,r{out_sub}->...{out_sub}", h, b.astype(dtype))
    return (alpha / rank) * y


class LoraLinear(nn.Module):
    """Bias-free x [..., in] → [..., features] with kernel [in, features] (axes ``axes``) plus a LoRA adapter;
    the adapted stand-in for the ``nn.Dense`` of the MLP (same param name ``kernel``, same init)."""

    features: int
    axes: tuple[str, str]
    rank: int
    alpha: float
    kernel_init: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = jnp.einsum("...d,df->...f", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + adapter(
            self, x, self.axes[:1], (self.features,), self.axes[1:], self.rank, self.alpha, self.dtype, self.param_dtype
        )


def is_lora_path(path: str) -> bool:
    """Whether a '/'-joined param path is an adapter leaf."""
    return bool(LORA_PARAM.search(path))


def delta(a, b, n_in: int, scale: float, xp=np):
    """scale·A·B in the kernel's layout: A [*lead, *in, r], B [*lead, r, *out] → [*lead, *in, *out] in f32
    (``lead`` = a scan-stacked layers axis or nothing). ``xp``: numpy (host) or jax.numpy (traced, on the arrays'
    shards; call it under ``jax.default_matmul_precision("highest")`` so the TPU matmul is full f32)."""
    a, b = xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)
    lead = a.shape[: a.ndim - 1 - n_in]
    in_shape, out_shape = a.shape[len(lead) : -1], b.shape[len(lead) + 1 :]
    r = a.shape[-1]
    m = xp.matmul(a.reshape(*lead, -1, r), b.reshape(*lead, r, -1))
    return scale * m.reshape(*lead, *in_shape, *out_shape)


def merged(kernel, a, b, n_in: int, scale: float, xp=np):
    """W + scale·A·B in W's dtype (added in f32): the one merge of the export and of a load into a model without
    adapters (``xp`` as in ``delta``)."""
    return (kernel.astype(xp.float32) + delta(a, b, n_in, scale, xp)).astype(kernel.dtype)


def input_dims(module_name: str) -> int:
    """How many leading (after any layers axis) dims of the kernel of ``module_name`` (e.g. ``o_proj_moe_gen``)
    are its inputs."""
    return MODULE_KIND[module_name.removesuffix(GEN_SUFFIX)][1]


def scale_of(cfg) -> float:
    """alpha / rank of the model config ``cfg``'s adapters."""
    return float(cfg.lora.alpha) / int(cfg.lora.rank)


def merge_kernel(
    module_name: str, module_node: dict, kernel, cfg, layer: int | None = None, to_host=np.asarray
) -> np.ndarray:
    """The kernel of ``module_node`` (a param dict holding ``kernel`` and maybe ``lora_a``/``lora_b``) with its
    adapter merged: W + (alpha/rank)·A·B (f32 numpy). ``kernel`` is the host copy of W (one layer of a scan stack
    when ``layer`` is given, in which case A and B are indexed the same way); ``to_host`` gathers A and B."""
    kernel = np.asarray(kernel)
    if "lora_a" not in module_node:
        return kernel
    a, b = module_node["lora_a"], module_node["lora_b"]
    if layer is not None:
        a, b = a[layer], b[layer]
    return merged(kernel, to_host(a), to_host(b), input_dims(module_name), scale_of(cfg))


def adapted_modules(paths) -> set[str]:
    """The '/'-joined module paths that hold an adapter, of an iterable of '/'-joined param paths."""
    return {p.rsplit("/", 1)[0] for p in paths if p.endswith("/lora_a")}


def layout(modules) -> dict[str, tuple[str, ...]]:
    """``{"experts": ..., "targets": ...}`` (sorted, the ``model.lora`` names) of a set of adapted module paths."""
    owners = [m.split("/")[-2:] for m in modules]  # (self_attn, q_proj_moe_gen) or (mlp_moe_gen, gate_proj)
    experts = {"gen" if any(n.endswith(GEN_SUFFIX) for n in o) else "und" for o in owners}
    targets = {MODULE_KIND[o[-1].removesuffix(GEN_SUFFIX)][0] for o in owners}
    return {"experts": tuple(sorted(experts)), "targets": tuple(sorted(targets))}


ADAPTER_KEYS = ("lora_a", "lora_b")


def without_adapters(tree):
    """A nested param dict (or its abstract / sharding twin) less every ``lora_a``/``lora_b`` leaf: the base model."""
    if isinstance(tree, Mapping):
        return {k: without_adapters(v) for k, v in tree.items() if k not in ADAPTER_KEYS}
    return tree


def with_adapters(base, adapted):
    """``base`` (a ``without_adapters`` tree of values) with the adapter leaves of ``adapted`` put back in place."""
    if isinstance(adapted, Mapping):
        return {k: v if k in ADAPTER_KEYS else with_adapters(base[k], v) for k, v in adapted.items()}
    return base
