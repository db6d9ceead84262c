"""Qwen2 building blocks: RMSNorm, SwiGLU MLP and 1-D RoPE with explicit position ids; ``dense``, the biased
Dense of the ViT, connector and timestep embedder.

Each matches its ``transformers`` Qwen2 counterpart numerically (tests/test_qwen2_parity.py):

* ``RMSNorm``  = ``Qwen2RMSNorm``: statistics in f32, the normalised value cast back to the input
  dtype, *then* multiplied by the scale (the scale is cast to the input dtype, as in BAGEL where
  params are bf16). Output dtype = input dtype.
* ``SwiGLU``   = ``Qwen2MLP``: ``down(silu(gate(x)) * up(x))``, no biases.
* ``rope_cos_sin`` / ``apply_rope`` = ``Qwen2RotaryEmbedding`` (rope_type "default") +
  ``apply_rotary_pos_emb``: ``inv_freq = 1/θ^(2k/hd)`` in f32, ``freqs = position · inv_freq`` in f32,
  ``cos/sin(cat(freqs, freqs))`` cast to the activation dtype, non-interleaved halves (``rotate_half``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bagel_jax.model.lora import LoraLinear, adapter

Dtype = Any

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)  # Qwen2's initializer_range


def kernel_init(*logical_axes: str):
    """N(0, 0.02) kernel initialiser carrying logical axis names."""
    return nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, logical_axes)


def bias_init(*logical_axes: str):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), logical_axes)


def dense(features: int, names: tuple[str, str], name: str, dtype, param_dtype) -> nn.Dense:
    """A biased Dense layer: lecun-normal kernel [in, out] with logical axes ``names``, zero bias [out]."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=bias_init(names[1]),
    )


def without_unit_lead(fn, x):
    """``fn(x)`` (shape-preserving) computed on x [1, ..., 1, *rest] with its leading size-1 axes dropped (at least 2
    axes kept).

    Same values; on XLA:CPU (jax 0.10) a reduction fused with its elementwise producers over an array with a leading
    unit axis (a one-row packed batch [1, T, D]) takes a slow path (YNNPACK's reduce fusion): a norm's backward at
    [1, 4096, 512] 50 ms against 5 ms (docs/EXPERIMENTS.md). A unit axis is never sharded: free under a mesh.
    """
    lead = 0
    while lead < x.ndim - 2 and x.shape[lead] == 1:
        lead += 1
    return fn(x.reshape(x.shape[lead:])).reshape(x.shape) if lead else fn(x)


class RMSNorm(nn.Module):
    """Qwen2RMSNorm over the last axis. x [..., F] → [..., F] in x's dtype; param ``scale`` [F].

    ``axis_name`` is the logical name of the scale's axis (``norm`` for hidden, ``head_dim`` for QK-norm).
    """

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )

        def norm(x):
            x32 = x.astype(jnp.float32)
            normed = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
            return scale.astype(x.dtype) * normed.astype(x.dtype)

        return without_unit_lead(norm, x)


def flat_mlp(mlp_tokens: str) -> bool:
    """Whether MLPs run on the tokens flattened to [B·T, D] (``model.mlp_tokens``): ``flat``, or ``auto`` on CPU.

    Same result either way. XLA:CPU emits the weight gradient of a matmul on a 3-D [B, T, F] activation with a
    strided element-by-element transpose of the [B·T, F] gradient fused into the SiLU backward: the tiny step's
    SwiGLU backward was 3× slower than on [B·T, D] (docs/EXPERIMENTS.md). Elsewhere ``batched`` keeps [B, T, D],
    where the activation's logical sharding (batch, length/sequence) holds.
    """
    if mlp_tokens == "auto":
        return jax.default_backend() == "cpu"
    return mlp_tokens == "flat"


class SwiGLU(nn.Module):
    """Qwen2MLP: x [B, T, D] → [B, T, D]; params ``gate_proj``/``up_proj`` [D, F], ``down_proj`` [F, D].

    ``flat``: run the three matmuls on x reshaped to [B·T, D] (``flat_mlp``); the result is the same.
    """

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: tuple[int, float] | None = None  # (rank, alpha): a LoRA adapter on gate/up/down (model/lora.py)
    flat: bool = False

    @nn.compact
    def __call__(self, x):
        def dense(feats, axes, name):
            if self.lora:
                return LoraLinear(feats, axes, *self.lora, kernel_init(*axes), self.dtype, self.param_dtype, name=name)
            return nn.Dense(
                feats,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=kernel_init(*axes),
                name=name,
            )

        shape = x.shape
        if self.flat:
            x = x.reshape(-1, shape[-1])
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = nn.silu(gate) * up
        if not self.flat:
            h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(shape[-1], ("mlp", "embed"), "down_proj")(h).reshape(shape)


class HeadsProjection(nn.Module):
    """x [B, T, D] → [B, T, H, hd]; param ``kernel`` [D, H, hd] (+ ``bias`` [H, hd]).

    The kernel is created in its 3-D shape (not flattened as flax's DenseGeneral does), so its logical
    axis constraint holds at init under a mesh.
    """

    num_heads: int
    head_dim: int
    head_axis: str = "heads"  # "heads" for q, "kv_heads" for k/v
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: tuple[int, float] | None = None  # (rank, alpha): adds ``lora_a`` [D, r], ``lora_b`` [r, H, hd]

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            kernel_init("embed", self.head_axis, "head_dim"),
            (x.shape[-1], self.num_heads, self.head_dim),
            self.param_dtype,
        )
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", bias_init(self.head_axis, "head_dim"), (self.num_heads, self.head_dim), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        if self.lora:
            y = y + adapter(
                self,
                x,
                ("embed",),
                (self.num_heads, self.head_dim),
                (self.head_axis, "head_dim"),
                *self.lora,
                self.dtype,
                self.param_dtype,
            )
        return y


class MergeHeadsProjection(nn.Module):
    """x [B, T, H, hd] → [B, T, D]; param ``kernel`` [H, hd, D], no bias (Qwen2 o_proj)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: tuple[int, float] | None = None  # (rank, alpha): adds ``lora_a`` [H, hd, r], ``lora_b`` [r, D]

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", kernel_init("heads", "head_dim", "embed"), (*x.shape[-2:], self.features), self.param_dtype
        )
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.lora:
            y = y + adapter(
                self, x, ("heads", "head_dim"), (self.features,), ("embed",), *self.lora, self.dtype, self.param_dtype
            )
        return y


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """f32[hd/2] inverse frequencies ``1 / θ^(2k/hd)`` (computed in f32 like transformers)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_cos_sin(position, head_dim: int, theta: float, dtype: Dtype = jnp.float32):
    """RoPE tables for explicit positions: int[B, L] → (cos, sin) each [B, L, hd] in ``dtype``."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = position.astype(jnp.float32)[..., None] * inv_freq  # [B, L, hd/2] in f32
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    """[..., hd] → cat(-x[hd/2:], x[:hd/2]) (Qwen2's non-interleaved rotation)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, L, H, hd], cos/sin [B, L, hd] → x·cos + rotate_half(x)·sin in x's dtype."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
