"""LoRA adapters a checkpoint holds where the model to load has none: read beside their kernels and merged into them,
W + (alpha/rank)·A·B (``model.lora.merged``, the export's merge), on the kernel's shards (docs/DESIGN_NOTES.md).

``stored_adapters`` gives the abstract arrays to read (A and B sharded like the kernel's own dims, as the rules shard
adapters); ``merge_adapters`` folds the restored ones into their kernels and drops them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from bagel_jax.model.lora import ADAPTER_KEYS, input_dims, merged


def stored_adapters(stored: Mapping, abstract: Mapping, name: str = "") -> dict:
    """The part (``ShapeDtypeStruct``s: stored shape and dtype, a sharding like the kernel's) of the adapter leaves
    the checkpoint metadata tree ``stored`` holds at modules where ``abstract`` has a kernel and no adapter."""
    out: dict = {}
    for key, sub in abstract.items():
        if isinstance(sub, Mapping) and isinstance(stored.get(key), Mapping):
            part = stored_adapters(stored[key], sub, key)
            if part:
                out[key] = part
    if "kernel" in abstract and "lora_a" in stored and "lora_a" not in abstract:
        kernel, a, b = abstract["kernel"], stored["lora_a"], stored["lora_b"]
        lead_in = len(a.shape) - 1  # the layers axis (if stacked) and the kernel's input dims
        lead = lead_in - input_dims(name)
        a_dims, b_dims = (*range(lead_in), None), (*range(lead), None, *range(lead_in, kernel.ndim))
        out["lora_a"] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_like(kernel, a_dims))
        out["lora_b"] = jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=_like(kernel, b_dims))
    return out


def _like(kernel: Any, dims: tuple[int | None, ...]):
    """A sharding that splits each dim like the kernel's dim ``dims[i]`` does (None: replicated, the LoRA rank)."""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(None if d is None else spec[d] for d in dims)))


def adapter_rank(adapters: Mapping) -> int:
    """The rank r of the adapters of a ``stored_adapters`` part (A [..., r])."""
    for key, sub in adapters.items():
        if key == "lora_a":
            return int(sub.shape[-1])
        if isinstance(sub, Mapping) and (r := adapter_rank(sub)):
            return r
    return 0


def merge_adapters(params: Mapping, adapters: Mapping, scale: float) -> tuple[dict, int]:
    """(``params`` with each adapter of the part ``adapters`` merged into its kernel and dropped, how many merged:
    per layer, also of a scan stack).
    ``params`` holds those adapters (restored with them); ``scale`` = the saved run's alpha / rank."""
    count = 0

    def walk(node: Mapping, part: Mapping, name: str) -> dict:
        nonlocal count
        node = dict(node)
        for key, sub in part.items():
            if key not in ADAPTER_KEYS:
                node[key] = walk(node[key], sub, key)
        if "lora_a" not in part:
            return node
        a, b = node.pop("lora_a"), node.pop("lora_b")
        kernel = node["kernel"]
        n_in = input_dims(name)
        node["kernel"] = _merge_fn(n_in, scale, getattr(kernel, "sharding", None))(kernel, a, b)
        count += math.prod(a.shape[: a.ndim - 1 - n_in])  # one per layer of a scan stack
        return node

    out = walk(params, adapters, "")
    return out, count


@functools.lru_cache(maxsize=64)
def _merge_fn(n_in: int, scale: float, sharding):
    """W, A, B → W + scale·A·B (``merged``) compiled once per kind, on W's sharding; f32 matmuls at full precision."""

    def fn(kernel, a, b):
        with jax.default_matmul_precision("highest"):
            return merged(kernel, a, b, n_in, scale, jnp)

    return jax.jit(fn, out_shardings=sharding) if isinstance(sharding, NamedSharding) else jax.jit(fn)
