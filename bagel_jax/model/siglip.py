"""SigLIP vision transformer in NaViT form (reference: modeling/bagel/siglip_navit.py).

Input is a row of packed patches from several images of different sizes; each patch carries a
flattened 2-D position id (``row * S + col``, S = ``vit_max_num_patch_per_side``) and a 1-based image
id. Attention stays within each image (all-``full`` splits through ``bagel_jax.attention``, so the TPU
kernel serves it). Layer selection as the reference: ``cfg.vit.num_layers`` layers are run (the
release's 27-layer SigLIP minus its last), then ``post_layernorm``. No pooling head.

With ``cfg.vit.scan_layers`` the layers run under ``nn.scan`` (one compiled layer): the ``layers_{i}`` subtrees become
one ``layers`` subtree with a leading [num_layers] axis (logical name ``layers``); the converters stack and unstack
(``bagel_jax.convert.layer_stack``), so checkpoints and exports keep the per-layer keys.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.attention import attention
from bagel_jax.attention.mask import KV_HI_INF, MaskMeta
from bagel_jax.model.embeddings import activation
from bagel_jax.model.layers import dense, flat_mlp, without_unit_lead
from bagel_jax.model.remat import remat

TOKENS = ("activation_batch", "activation_patches", "activation_embed")


def _layer_norm(eps: float, name: str, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    )


def image_mask_meta(image_ids: jnp.ndarray) -> MaskMeta:
    """Mask metadata for attention within each image: doc = image id (0 = padding), all ``full``."""
    image_ids = jnp.asarray(image_ids, jnp.int32)
    index = jnp.broadcast_to(jnp.arange(image_ids.shape[-1], dtype=jnp.int32), image_ids.shape)
    inf = jnp.full_like(image_ids, KV_HI_INF)
    return MaskMeta(doc=image_ids, index=index, q_hi=inf, kv_hi=inf)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections. x [B, P, Dv] → [B, P, Dv]."""

    hidden: int
    num_heads: int
    attention_impl: str = "reference"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, meta: MaskMeta):
        b, p, _ = x.shape
        head_dim = self.hidden // self.num_heads

        def proj(name):
            y = dense(self.hidden, ("vit_embed", "heads"), name, self.dtype, self.param_dtype)(x)
            y = y.reshape(b, p, self.num_heads, head_dim)
            return nn.with_logical_constraint(
                y, ("activation_batch", "activation_patches", "activation_heads", "activation_head_dim")
            )

        # names for the save_* / offload_* remat policies (config.REMAT_POLICIES)
        q, k, v = (checkpoint_name(proj(f"{n}_proj"), tag) for n, tag in (("q", "query"), ("k", "key"), ("v", "value")))
        out = checkpoint_name(attention(q, k, v, meta, meta, impl=self.attention_impl), "attention_out")
        out = out.reshape(b, p, self.hidden)
        return dense(self.hidden, ("heads", "vit_embed"), "out_proj", self.dtype, self.param_dtype)(out)


class SiglipMLP(nn.Module):
    """fc2(act(fc1(x))): x [B, P, Dv] → [B, P, Dv]; ``flat`` runs it on [B·P, Dv] (``layers.flat_mlp``), same result."""

    hidden: int
    intermediate: int
    act: str = "gelu_pytorch_tanh"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    flat: bool = False

    @nn.compact
    def __call__(self, x):
        shape = x.shape
        if self.flat:
            x = x.reshape(-1, shape[-1])
        x = activation(self.act)(dense(self.intermediate, ("vit_embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x))
        if not self.flat:
            x = nn.with_logical_constraint(x, ("activation_batch", "activation_patches", "activation_mlp"))
        return dense(self.hidden, ("mlp", "vit_embed"), "fc2", self.dtype, self.param_dtype)(x).reshape(shape)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1(x)), then x + MLP(LN2(x))."""

    vit: Any  # the model.vit config section
    attention_impl: str = "reference"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    flat_mlp: bool = False  # SiglipMLP.flat

    @nn.compact
    def __call__(self, x, meta: MaskMeta):
        v = self.vit
        h = without_unit_lead(_layer_norm(v.layer_norm_eps, "layer_norm1", self.param_dtype), x).astype(self.dtype)
        x = x + SiglipAttention(
            v.hidden_size, v.num_heads, self.attention_impl, self.dtype, self.param_dtype, name="self_attn"
        )(h, meta)
        h = without_unit_lead(_layer_norm(v.layer_norm_eps, "layer_norm2", self.param_dtype), x).astype(self.dtype)
        mlp = SiglipMLP(
            v.hidden_size, v.intermediate_size, v.hidden_act, self.dtype, self.param_dtype, self.flat_mlp, name="mlp"
        )
        x = x + mlp(h)
        return nn.with_logical_constraint(x, TOKENS)


class ScannedSiglipLayer(SiglipEncoderLayer):
    """``SiglipEncoderLayer`` in ``nn.scan``'s (carry, out) form: x [B, P, Dv] → (x', None)."""

    @nn.compact
    def __call__(self, x, meta: MaskMeta):
        return super().__call__(x, meta), None


class SiglipNaViT(nn.Module):
    """Packed variable-resolution SigLIP encoder.

    ``cfg`` is the ``model`` config section (uses ``cfg.vit.*``, ``cfg.vit_max_num_patch_per_side``,
    ``cfg.attention_impl``, ``cfg.dtype``, ``cfg.param_dtype``, ``cfg.remat``).

    Call: ``(patches [B, P, p·p·3] with features in (ph, pw, c) order, pos_ids int32[B, P] = row*S + col,
    image_ids int32[B, P] 1-based per row, 0 = padding) → [B, P, Dv]`` after ``post_layernorm``.
    Padding patches give finite values that callers ignore.
    """

    cfg: Any

    @nn.compact
    def __call__(self, patches, pos_ids, image_ids):
        cfg, v = self.cfg, self.cfg.vit
        dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.get("param_dtype", "float32"))
        feat = v.patch_size * v.patch_size * 3
        if patches.ndim != 3 or patches.shape[-1] != feat:
            raise ValueError(
                f"SiglipNaViT: patches must be [B, P, {feat}] (patch_size {v.patch_size}, RGB), got {patches.shape}"
            )
        if pos_ids.shape != patches.shape[:2] or image_ids.shape != patches.shape[:2]:
            raise ValueError(
                f"SiglipNaViT: pos_ids {pos_ids.shape} and image_ids {image_ids.shape} must be "
                f"{patches.shape[:2]} (= patches' [B, P])"
            )
        s = cfg.vit_max_num_patch_per_side
        if v.num_positions < s * s:
            raise ValueError(f"SiglipNaViT: vit.num_positions {v.num_positions} < vit_max_num_patch_per_side² {s * s}")

        x = dense(v.hidden_size, ("patch", "vit_embed"), "patch_embedding", dtype, param_dtype)(patches.astype(dtype))
        table = self.param(
            "position_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=v.hidden_size**-0.5), ("pos_table", "vit_embed")
            ),
            (v.num_positions, v.hidden_size),
            param_dtype,
        )
        x = x + jnp.take(table, pos_ids, axis=0, mode="clip").astype(dtype)
        x = nn.with_logical_constraint(x, TOKENS)

        meta = image_mask_meta(image_ids)
        flat = flat_mlp(cfg.get("mlp_tokens", "auto"))
        if v.get("scan_layers", False):
            layer_cls = remat(ScannedSiglipLayer, cfg.get("remat", "none"), prevent_cse=False)
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=v.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(v, cfg.attention_impl, dtype, param_dtype, flat, name="layers")(x, meta)
        else:
            layer_cls = remat(SiglipEncoderLayer, cfg.get("remat", "none"))
            for i in range(v.num_layers):
                x = layer_cls(v, cfg.attention_impl, dtype, param_dtype, flat, name=f"layers_{i}")(x, meta)
        x = without_unit_lead(_layer_norm(v.layer_norm_eps, "post_layernorm", param_dtype), x).astype(dtype)
        return nn.with_logical_constraint(x, TOKENS)
