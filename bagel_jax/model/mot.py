"""The Qwen2 Mixture-of-Transformers (MoT) decoder of BAGEL (reference §2; DESIGN §3–§4).

Every layer holds two experts, ``und`` (text + ViT tokens) and ``gen`` (VAE latent tokens), each with
its own q/k/v/o projections, QK RMSNorms, input/post-attention RMSNorms and SwiGLU MLP; the softmax
attention itself runs once over the whole row under the split-wise mask. Routing is static: rows are
modality-sorted, slots ``[0, U)`` are und tokens and ``[U, U+G)`` gen tokens, so each expert reads a
contiguous slice (no gather). ``layer_module="dense"`` gives one expert for all tokens (plain Qwen2 /
Qwen3 layer). Layer math (pre-norm residual, no dropout)::

    h = input_layernorm_e(x);   q, k, v = q_proj_e(h), k_proj_e(h), v_proj_e(h)      # per expert e
    q, k = q_norm_e(q), k_norm_e(k)   (cfg.qk_norm; RMSNorm over head_dim)          # per expert
    q, k = rope(q, k, position)                                                      # whole row
    a = attention(q, k, v, meta)                                                     # whole row
    x = x + o_proj_e(a);   x = x + mlp_e(post_attention_layernorm_e(x))             # per expert
    out = norm_e(x)                                                                  # final, per expert

Param tree (``_moe_gen`` = gen expert, absent for ``dense``; names mirror the official state dict
``language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`` etc.)::

    embed_tokens/embedding                  [V, D]              (vocab, embed)
    layers_{i}/input_layernorm[_moe_gen]/scale            [D]   (norm)
    layers_{i}/post_attention_layernorm[_moe_gen]/scale   [D]
    layers_{i}/self_attn/{q,k,v}_proj[_moe_gen]/kernel    [D, H|Hkv, hd]  (embed, heads|kv_heads, head_dim)
    layers_{i}/self_attn/{q,k,v}_proj[_moe_gen]/bias      [H|Hkv, hd]     (cfg.qkv_bias)
    layers_{i}/self_attn/o_proj[_moe_gen]/kernel          [H, hd, D]      (heads, head_dim, embed)
    layers_{i}/self_attn/{q,k}_norm[_moe_gen]/scale       [hd]            (head_dim; cfg.qk_norm)
    layers_{i}/mlp[_moe_gen]/{gate,up}_proj/kernel        [D, F]          (embed, mlp)
    layers_{i}/mlp[_moe_gen]/down_proj/kernel             [F, D]          (mlp, embed)
    norm[_moe_gen]/scale                    [D]
    lm_head/kernel                          [D, V]              (embed, vocab; absent if tied)

With ``cfg.scan_layers`` the ``layers_{i}`` subtrees become one ``layers`` subtree whose leaves have a
leading [num_layers] axis (logical name ``layers``); ``bagel_jax.convert.hf.stack_layers`` /
``unstack_layers`` convert between the two. ``cfg.remat`` wraps each layer in ``jax.checkpoint``:
``full`` saves nothing, ``dots`` saves matmul outputs without batch dims (projections, MLP) and
recomputes attention, ``save_*`` / ``offload_*`` keep the tagged ``query``/``key``/``value``/``attention_out``
/``layer_input`` (on device / in pinned host memory; ``config.REMAT_POLICIES``).

Inference with a KV cache (``bagel_jax.infer.cache``): ``LanguageModel.extend`` runs new tokens against the
cached K/V of earlier tokens (``past_kv`` = (k, v) [layers, B, C, Hkv, hd], post QK-norm and RoPE, with their mask
metadata ``past_meta`` [B, C]) and returns the new tokens' own K/V [layers, B, T, Hkv, hd] for the caller to store.
The new tokens attend to ``concat(past, own)`` under the same split-wise rule, so a context prefilled once and
extended step by step gives the same hidden states as the whole row at once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.attention import MaskMeta, attention, resolve_impl
from bagel_jax.config import head_dim
from bagel_jax.model.layers import (
    HeadsProjection,
    MergeHeadsProjection,
    RMSNorm,
    SwiGLU,
    apply_rope,
    flat_mlp,
    kernel_init,
    rope_cos_sin,
)
from bagel_jax.model.lora import lora_for
from bagel_jax.model.remat import remat
from bagel_jax.model.seq_shards import join, join_row, length_shards, split

GEN_SUFFIX = "_moe_gen"
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
# the residual stream between decoder layers (the scan carry, what remat saves per layer): its width split over a
# tensor pair, whole inside a layer (docs/DESIGN_NOTES.md 53)
CARRY_AXES = ("activation_batch", "activation_length", "activation_carry_embed")


def _suffixes(cfg) -> tuple[str, ...]:
    if cfg.layer_module == "mot":
        return ("", GEN_SUFFIX)
    if cfg.layer_module == "dense":
        return ("",)
    raise ValueError(f"model.layer_module must be 'mot' or 'dense', got {cfg.layer_module!r}")


class SelfAttention(nn.Module):
    """Per-expert projections around one shared attention.

    ``segments``: list of (param suffix, x [B, T_e, D]) whose concatenation along T is the whole row
    (in slot order); cos/sin [B, L, hd]; meta MaskMeta [B, L]. Returns (per-segment outputs [B, T_e, D], kv):
    ``kv`` is None, or with ``past`` = (k, v [B, C, Hkv, hd], MaskMeta [B, C]) the row's own (k, v) [B, L, Hkv, hd]
    (the row attends to the past tokens and itself).
    """

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, segments, cos, sin, meta: MaskMeta, past=None):
        cfg = self.cfg
        hd = head_dim(cfg)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def proj(heads, head_axis, kind, suffix):
            return HeadsProjection(
                heads,
                hd,
                head_axis,
                cfg.qkv_bias,
                dtype,
                pdtype,
                lora_for(cfg, suffix, kind),
                name=f"{kind}_proj{suffix}",
            )

        qs, ks, vs = [], [], []
        for suffix, x in segments:
            q = proj(cfg.num_heads, "heads", "q", suffix)(x)
            k = proj(cfg.num_kv_heads, "kv_heads", "k", suffix)(x)
            v = proj(cfg.num_kv_heads, "kv_heads", "v", suffix)(x)
            if cfg.qk_norm:
                q = RMSNorm(cfg.rms_norm_eps, pdtype, "head_dim", name="q_norm" + suffix)(q)
                k = RMSNorm(cfg.rms_norm_eps, pdtype, "head_dim", name="k_norm" + suffix)(k)
            qs.append(q), ks.append(k), vs.append(v)
        # und + gen joined in the shard-local order of the sequence shards (seq_shards.py: no resharding)
        n = length_shards(*(x.shape[1] for _, x in segments)) if past is None else 1
        cat = lambda xs: xs[0] if len(xs) == 1 else join(*xs, n)  # noqa: E731
        q, k, v = apply_rope(cat(qs), cos, sin), apply_rope(cat(ks), cos, sin), cat(vs)
        q = nn.with_logical_constraint(
            q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
        )
        kv_axes = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
        k, v = nn.with_logical_constraint(k, kv_axes), nn.with_logical_constraint(v, kv_axes)
        q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")  # model.remat
        impl = resolve_impl(cfg.attention_impl)
        kwargs = dict(block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv) if impl == "tpu" else {}
        if past is None:
            a, kv = attention(q, k, v, meta, impl=impl, **kwargs), None
        else:
            past_k, past_v, past_meta = past
            kv_meta = jax.tree.map(lambda p, m: jnp.concatenate([p, m], axis=-1), past_meta, meta)
            a = attention(
                q,
                jnp.concatenate([past_k.astype(k.dtype), k], axis=1),
                jnp.concatenate([past_v.astype(v.dtype), v], axis=1),
                meta,
                kv_meta,
                impl=impl,
                **kwargs,
            )
            kv = (k, v)
        a = checkpoint_name(a, "attention_out")

        outs = []
        a_parts = [a] if len(segments) == 1 else split(a, segments[0][1].shape[1], n)
        for (suffix, x), a_e in zip(segments, a_parts):
            outs.append(
                MergeHeadsProjection(x.shape[-1], dtype, pdtype, lora_for(cfg, suffix, "o"), name="o_proj" + suffix)(
                    a_e
                )
            )
        return outs, kv


class DecoderLayer(nn.Module):
    """One MoT (or dense) layer. carry = (und_x [B, U, D], gen_x [B, G, D]) → (carry, kv) (scan form); ``kv`` is
    None, or with ``past_kv`` = this layer's cached (k, v) and ``past_meta`` the tokens' own (k, v) (SelfAttention)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, carry, cos, sin, meta: MaskMeta, past_kv=None, past_meta=None):
        cfg = self.cfg
        und_x, gen_x = (nn.with_logical_constraint(x, CARRY_AXES) for x in carry)
        und_x, gen_x = checkpoint_name(und_x, "layer_input"), checkpoint_name(gen_x, "layer_input")  # model.remat
        und_x, gen_x = (nn.with_logical_constraint(x, HIDDEN_AXES) for x in (und_x, gen_x))
        u = und_x.shape[1]
        pdtype = jnp.dtype(cfg.param_dtype)
        n = length_shards(u, gen_x.shape[1]) if past_kv is None else 1
        if cfg.layer_module == "dense":
            segments = [("", join(und_x, gen_x, n))]
        else:
            segments = [("", und_x)]
            if gen_x.shape[1] > 0 or self.is_initializing():  # G = 0: gen expert not run
                segments.append((GEN_SUFFIX, gen_x))

        normed = [(s, RMSNorm(cfg.rms_norm_eps, pdtype, name="input_layernorm" + s)(x)) for s, x in segments]
        past = None if past_kv is None else (*past_kv, past_meta)
        attn_out, kv = SelfAttention(cfg, name="self_attn")(normed, cos, sin, meta, past)
        new = []
        for (s, x), o in zip(segments, attn_out):
            x = x + o
            h = RMSNorm(cfg.rms_norm_eps, pdtype, name="post_attention_layernorm" + s)(x)
            mlp = SwiGLU(
                cfg.intermediate_size,
                jnp.dtype(cfg.dtype),
                pdtype,
                lora_for(cfg, s, "mlp"),
                flat=flat_mlp(cfg.get("mlp_tokens", "auto")),
                name="mlp" + s,
            )
            x = x + mlp(h)
            new.append(nn.with_logical_constraint(nn.with_logical_constraint(x, HIDDEN_AXES), CARRY_AXES))
        if cfg.layer_module == "dense":
            return split(new[0], u, n), kv
        return (new[0], new[1] if len(new) > 1 else nn.with_logical_constraint(gen_x, CARRY_AXES)), kv


class LanguageModel(nn.Module):
    """Qwen2 MoT language model (embeddings, decoder, final norms, LM head). ``cfg`` = config ``model`` section."""

    cfg: ml_collections.ConfigDict

    def setup(self):
        cfg = self.cfg
        _suffixes(cfg)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=pdtype,
            embedding_init=kernel_init("vocab", "embed"),
        )
        layer_cls = remat(DecoderLayer, cfg.remat, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, pdtype)
        if cfg.layer_module == "mot":
            self.norm_moe_gen = RMSNorm(cfg.rms_norm_eps, pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=kernel_init("embed", "vocab"),
            )

    def embed(self, ids):
        """int32[B, T] → [B, T, D] in cfg.dtype."""
        # Each chip's ids are its own slots. The table is left as stored (width over fsdp): gathering it over fsdp
        # removes the tiny model's all-gather of looked-up rows, but at 7B on v6e:8x8 (fsdp 64) it costs 3.05 instead
        # of 0.56 GiB of temporaries (the gathered table and its full f32 gradient), where XLA's own lookup moves no
        # whole rows (docs/EXPERIMENTS.md, sequence parallelism).
        ids = nn.with_logical_constraint(ids, HIDDEN_AXES[:2])
        return nn.with_logical_constraint(self.embed_tokens(ids), HIDDEN_AXES)

    def __call__(self, und_x, gen_x, position, meta: MaskMeta, deterministic: bool = True):
        """Runs the decoder on a modality-sorted row.

        Args:
          und_x: [B, U, D] und-slot inputs; gen_x: [B, G, D] gen-slot inputs (G may be 0).
          position: int32[B, U+G] RoPE ids; meta: MaskMeta [B, U+G] (slot order).
          deterministic: unused (the model has no dropout); kept for a uniform module interface.

        Returns:
          (und_h [B, U, D], gen_h [B, G, D]) after the final norm of each expert.
        """
        und_h, gen_h, _ = self._run(und_x, gen_x, position, meta)
        return und_h, gen_h

    def extend(self, und_x, gen_x, position, meta: MaskMeta, past_kv, past_meta: MaskMeta):
        """The decoder on new tokens that also attend to cached ones (KV-cache inference).

        Args:
          und_x, gen_x, position, meta: the new tokens, as in ``__call__`` ([B, U, D], [B, G, D], [B, U+G]).
          past_kv: (k, v) each [num_layers, B, C, Hkv, hd]: cached keys (after QK-norm and RoPE) and values of
            earlier tokens (C may be 0); past_meta: their MaskMeta [B, C] (doc 0 = an empty cache slot).

        Returns:
          (und_h [B, U, D], gen_h [B, G, D], (k, v) each [num_layers, B, U+G, Hkv, hd]: the new tokens' keys and
          values, to append to the cache).
        """
        return self._run(und_x, gen_x, position, meta, past_kv, past_meta)

    def _run(self, und_x, gen_x, position, meta: MaskMeta, past_kv=None, past_meta=None):
        cfg = self.cfg
        b, u, d = und_x.shape
        if gen_x.shape[0] != b or gen_x.shape[2] != d:
            raise ValueError(f"gen_x shape {gen_x.shape} does not match und_x {und_x.shape}")
        if position.shape != (b, u + gen_x.shape[1]) or meta.doc.shape != position.shape:
            raise ValueError(
                f"position {position.shape} / meta {meta.doc.shape} must be [B, U+G] = {(b, u + gen_x.shape[1])}"
            )
        dtype = jnp.dtype(cfg.dtype)
        # the layers join und + gen in the shard-local order of the sequence shards: positions and mask alike
        n = length_shards(u, gen_x.shape[1]) if past_kv is None else 1
        position, meta = join_row(position, u, n), jax.tree.map(lambda m: join_row(m, u, n), meta)
        cos, sin = rope_cos_sin(position, head_dim(cfg), cfg.rope_theta, dtype)
        carry = (
            nn.with_logical_constraint(und_x.astype(dtype), HIDDEN_AXES),
            nn.with_logical_constraint(gen_x.astype(dtype), HIDDEN_AXES),
        )
        kv = None
        if cfg.scan_layers:
            carry, kv = self.layers(carry, cos, sin, meta, past_kv, past_meta)
        else:
            kvs = []
            for i, layer in enumerate(self.layers):
                layer_past = None if past_kv is None else (past_kv[0][i], past_kv[1][i])
                carry, layer_kv = layer(carry, cos, sin, meta, layer_past, past_meta)
                kvs.append(layer_kv)
            if past_kv is not None:
                kv = tuple(jnp.stack(x) for x in zip(*kvs))
        und_h, gen_h = carry
        if cfg.layer_module == "dense":
            return self.norm(und_h), self.norm(gen_h), kv
        return self.norm(und_h), self.norm_moe_gen(gen_h), kv

    def logits(self, h):
        """[B, T, D] → [B, T, V] (lm_head, or the embedding matrix when tie_word_embeddings)."""
        out = self.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))


def init_params(cfg, rng, und_len: int = 8, gen_len: int = 4, batch: int = 1):
    """Initialises LanguageModel params (boxed with logical names; jitted) on tiny dummy inputs.

    For sharded params at scale use ``jax.jit(..., out_shardings=...)`` around the same ``model.init``.
    """
    model = LanguageModel(cfg)
    length = und_len + gen_len
    meta = MaskMeta(*(jnp.zeros((batch, length), jnp.int32) for _ in range(4)))

    def run(m, ids):
        und = m.embed(ids)
        gen = jnp.zeros((batch, gen_len, cfg.hidden_size), und.dtype)
        und_h, _ = m(und, gen, jnp.zeros((batch, length), jnp.int32), meta)
        return m.logits(und_h)

    return jax.jit(lambda key: model.init(key, jnp.zeros((batch, und_len), jnp.int32), method=run))(rng)
