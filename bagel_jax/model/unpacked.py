"""Unpacked oracle: BAGEL's forward on ONE sample in natural order, written from the reference formulas.

Independent of the packed machinery on purpose: plain numpy (float64), tensors read from the *official*
state dict (torch layout, §9.3 key names; ``convert.bagel_ckpt.params_to_state_dict``), a dense
[L, L] mask built like the reference's ``prepare_attention_mask_per_sample`` (§3.2), every token routed
to its expert by a per-token select (both experts are evaluated on every token, the right one is kept),
SigLIP per image alone. Only the frozen VAE encoder is a callable (``vae_encode``), run on each image
alone at its own size. Used by tests to check ``Bagel`` on packed rows (and the sampler's contexts).

The sample comes as a ``bagel_jax.data.sample.Document`` (its natural-order token layout); images are
taken from it at their own sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from bagel_jax.attention.mask import CAUSAL, NOISE
from bagel_jax.batch import KIND_CLEAN_VAE, KIND_NOISED_VAE, KIND_TEXT, KIND_VIT

GEN = "_moe_gen"


def dense_mask(split_lens: Sequence[int], modes: Sequence[str]) -> np.ndarray:
    """bool[L, L] (row = query) exactly as ``prepare_attention_mask_per_sample`` (True = may attend)."""
    total = int(sum(split_lens))
    allowed = np.zeros((total, total), bool)
    start = 0
    for n, mode in zip(split_lens, modes):
        end = start + n
        allowed[start:end, :start] = True
        if mode == CAUSAL:
            allowed[start:end, start:end] = np.tril(np.ones((n, n), bool))
        else:
            allowed[start:end, start:end] = True
        start = end
    start = 0
    for n, mode in zip(split_lens, modes):
        end = start + n
        if mode == NOISE:
            allowed[:, start:end] = False
            allowed[start:end, start:end] = True
        start = end
    return allowed


def _linear(sd, key, x, bias=True):
    y = x @ sd[f"{key}.weight"].T
    return y + sd[f"{key}.bias"] if bias else y


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x, mask):
    x = np.where(mask, x, -np.inf)
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _sincos_2d(dim: int, n: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos table written from the reference (meshgrid(w, h): first half encodes the column)."""
    grid_h = np.arange(n, dtype=np.float64)
    grid_w = np.arange(n, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, n, n)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def timestep_features(t, dim: int = 256) -> np.ndarray:
    """``TimestepEmbedder.timestep_embedding``: cat(cos(t·f), sin(t·f)), f_k = exp(−ln(1e4)·k/(dim/2))."""
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    args = np.asarray(t, np.float64)[..., None] * freqs
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def siglip(sd, cfg, patches: np.ndarray, pos_ids: np.ndarray) -> np.ndarray:
    """SigLIP NaViT on one image: patches [n, p·p·3] in [-1, 1], ids [n] → [n, Dv] (after post_layernorm)."""
    v, pre = cfg.vit, "vit_model.vision_model."
    x = _linear(sd, f"{pre}embeddings.patch_embedding", patches)
    x = x + sd[f"{pre}embeddings.position_embedding.weight"][pos_ids]
    heads, hd = v.num_heads, v.hidden_size // v.num_heads
    n = x.shape[0]
    for i in range(v.num_layers):
        k = f"{pre}encoder.layers.{i}."
        h = _layer_norm(x, sd[f"{k}layer_norm1.weight"], sd[f"{k}layer_norm1.bias"], v.layer_norm_eps)
        q, kk, vv = (_linear(sd, f"{k}self_attn.{p}_proj", h).reshape(n, heads, hd) for p in ("q", "k", "v"))
        a = _softmax(np.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd), np.ones((n, n), bool))
        o = np.einsum("hqk,khd->qhd", a, vv).reshape(n, heads * hd)
        x = x + _linear(sd, f"{k}self_attn.out_proj", o)
        h = _layer_norm(x, sd[f"{k}layer_norm2.weight"], sd[f"{k}layer_norm2.bias"], v.layer_norm_eps)
        x = x + _linear(sd, f"{k}mlp.fc2", _gelu_tanh(_linear(sd, f"{k}mlp.fc1", h)))
    return _layer_norm(x, sd[f"{pre}post_layernorm.weight"], sd[f"{pre}post_layernorm.bias"], v.layer_norm_eps)


def patchify_latent_torch(z_chw: np.ndarray, p: int) -> np.ndarray:
    """§1.4 step 4 verbatim: latent [C, h·p, w·p] → reshape(C,h,p,w,p) → 'chpwq->hwpqc' → [h·w, p·p·C]."""
    c, hp, wp = z_chw.shape
    h, w = hp // p, wp // p
    z = z_chw.reshape(c, h, p, w, p)
    return np.einsum("chpwq->hwpqc", z).reshape(h * w, p * p * c)


def rope(x, pos, theta):
    """x [L, H, hd], pos [L] → standard Qwen2 RoPE (halves, rotate_half)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    freqs = pos.astype(np.float64)[:, None] * inv
    emb = np.concatenate([freqs, freqs], -1)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def language_model(sd, cfg, x, pos, is_gen, allowed) -> np.ndarray:
    """MoT decoder with per-token expert select. x [L, D], pos [L], is_gen bool[L], allowed bool[L, L] → [L, D]."""
    lm = "language_model.model."
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    hq, hkv, eps = cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps
    mot = cfg.layer_module == "mot"
    sel = is_gen[:, None]
    n = x.shape[0]

    def both(fn, name, **kw):
        """fn applied with the und weights and with the gen weights, selected per token."""
        und = fn(name, **kw)
        return np.where(sel if und.ndim == 2 else sel[..., None], fn(name + GEN, **kw), und) if mot else und

    for i in range(cfg.num_layers):
        k = f"{lm}layers.{i}."
        h = both(lambda nm: _rms(x, sd[f"{k}{nm}.weight"], eps), "input_layernorm")
        q = both(lambda nm: _linear(sd, f"{k}self_attn.{nm}", h, cfg.qkv_bias), "q_proj").reshape(n, hq, hd)
        kk = both(lambda nm: _linear(sd, f"{k}self_attn.{nm}", h, cfg.qkv_bias), "k_proj").reshape(n, hkv, hd)
        vv = both(lambda nm: _linear(sd, f"{k}self_attn.{nm}", h, cfg.qkv_bias), "v_proj").reshape(n, hkv, hd)
        if cfg.qk_norm:
            q = both(lambda nm: _rms(q, sd[f"{k}self_attn.{nm}.weight"], eps), "q_norm")
            kk = both(lambda nm: _rms(kk, sd[f"{k}self_attn.{nm}.weight"], eps), "k_norm")
        q, kk = rope(q, pos, cfg.rope_theta), rope(kk, pos, cfg.rope_theta)
        rep = hq // hkv
        kk, vv = np.repeat(kk, rep, axis=1), np.repeat(vv, rep, axis=1)
        a = _softmax(np.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd), allowed[None])
        o = np.einsum("hqk,khd->qhd", a, vv).reshape(n, hq * hd)
        x = x + both(lambda nm: _linear(sd, f"{k}self_attn.{nm}", o, False), "o_proj")
        h = both(lambda nm: _rms(x, sd[f"{k}{nm}.weight"], eps), "post_attention_layernorm")

        def mlp(nm):
            g = _linear(sd, f"{k}{nm}.gate_proj", h, False)
            u = _linear(sd, f"{k}{nm}.up_proj", h, False)
            return _linear(sd, f"{k}{nm}.down_proj", _silu(g) * u, False)

        x = x + both(mlp, "mlp")
    return both(lambda nm: _rms(x, sd[f"{lm}{nm}.weight"], eps), "norm")


def unpacked_forward(
    sd: Mapping[str, np.ndarray],
    cfg,
    doc,
    *,
    vae_encode: Callable | None = None,
    posterior_noise: Sequence[np.ndarray] = (),
    flow_noise: Sequence[np.ndarray] = (),
    x0: Sequence[np.ndarray] | None = None,
    xt: Sequence[tuple[np.ndarray, float]] | None = None,
):
    """One sample, natural order.

    Args:
      sd: official state dict (numpy; cast to float64 here).
      cfg: the ``model`` config.
      doc: ``bagel_jax.data.sample.Document`` (natural-order layout of the sample).
      vae_encode: ``pixels float32[1, h, w, 3] in [-1, 1] → (mean, logvar) [1, h/8, w/8, C]`` (raw), run per image.
      posterior_noise: per VAE image ε_z [h/8, w/8, C]; flow_noise: per VAE image ε [(h/16)(w/16), p²C] (row-major).
      x0: per VAE image clean normalised latent tokens [(h/16)(w/16), p²C] (instead of vae_encode + posterior).
      xt: per VAE image (x_t tokens, t) or None: overrides the noising of *noised* images (sampler state).

    Returns:
      dict: ``logits`` [Lu, V] and ``ce`` [Lu] at the und tokens in natural order (``labels`` [Lu],
      ``ce_weight`` [Lu]), and at the gen tokens in natural order ``velocity`` [Lg, p²C], ``target`` [Lg, p²C],
      ``noised`` bool[Lg], ``t`` [Lg]; ``hidden`` [L, D].
    """
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    length = doc.num_tokens
    kinds, pos = doc.kinds(), doc.positions()
    d = cfg.hidden_size
    x = np.zeros((length, d))
    text = np.zeros(length, np.int64)
    text[doc.und_nat] = doc.und_text
    is_text = kinds == KIND_TEXT
    x[is_text] = sd["language_model.model.embed_tokens.weight"][text[is_text]]

    if doc.num_vit_images:
        if not cfg.visual_und:
            raise ValueError("unpacked_forward: the sample has ViT images but visual_und is False")
        table = _sincos_2d(d, cfg.vit_max_num_patch_per_side)
        patches = doc.vit_patches.astype(np.float64) / 255.0 * 2.0 - 1.0
        for k in range(doc.num_vit_images):
            sel = doc.vit_img == k
            feats = siglip(sd, cfg, patches[sel], doc.vit_pos[sel])
            h = _linear(sd, "connector.fc2", _gelu_tanh(_linear(sd, "connector.fc1", feats)))
            x[doc.und_nat[doc.vit_und[sel]]] = h + table[doc.vit_pos[sel]]

    out = {}
    n_gen = len(doc.gen_nat)
    if n_gen:
        p = cfg.latent_patch_size
        latent_table = _sincos_2d(d, cfg.max_latent_size)
        x0_all, eps_all, xt_all, t_all, noised_all = [], [], [], [], []
        for k, px in enumerate(doc.vae_pixels):
            hh, ww = px.shape[:2]
            n_tok = (hh // (8 * p)) * (ww // (8 * p))
            if x0 is not None:
                tokens = np.asarray(x0[k], np.float64)
            else:
                img = (px.astype(np.float32) / np.float32(255.0)) * np.float32(2.0) - np.float32(1.0)
                mean, logvar = (np.asarray(a, np.float64)[0] for a in vae_encode(img[None]))
                z = mean + np.exp(0.5 * logvar) * np.asarray(posterior_noise[k], np.float64)
                z = cfg.vae.scale_factor * (z - cfg.vae.shift_factor)
                tokens = patchify_latent_torch(z.transpose(2, 0, 1), p)
            noised = bool(np.isfinite(doc.vae_timestep[k]))
            t = 1.0 / (1.0 + np.exp(-float(doc.vae_timestep[k]))) if noised else 0.0
            s = cfg.timestep_shift
            t = s * t / (1 + (s - 1) * t)
            eps = np.asarray(flow_noise[k], np.float64) if len(flow_noise) else np.zeros_like(tokens)
            x_t = (1 - t) * tokens + t * eps
            if xt is not None and xt[k] is not None and noised:
                x_t, t = np.asarray(xt[k][0], np.float64), float(xt[k][1])
            x0_all.append(tokens), eps_all.append(eps), xt_all.append(x_t)
            t_all.append(np.full(n_tok, t)), noised_all.append(np.full(n_tok, noised))
        x_t_all = np.concatenate(xt_all)
        x0_cat, eps_cat = np.concatenate(x0_all), np.concatenate(eps_all)
        t_cat = np.concatenate(t_all)
        if len(x0_cat) != n_gen:
            raise ValueError(f"unpacked_forward: {n_gen} gen tokens but the images give {len(x0_cat)}")
        temb = _linear(sd, "time_embedder.mlp.2", _silu(_linear(sd, "time_embedder.mlp.0", timestep_features(t_cat))))
        h = _linear(sd, "vae2llm", x_t_all) + temb + latent_table[doc.gen_latent_pos]
        x[doc.gen_nat] = h
        out.update(target=eps_cat - x0_cat, noised=np.concatenate(noised_all), t=t_cat)

    is_gen = (kinds == KIND_CLEAN_VAE) | (kinds == KIND_NOISED_VAE)
    if not np.all(is_gen | is_text | (kinds == KIND_VIT)):
        raise ValueError(f"unpacked_forward: sample {doc.key} has tokens of unknown kind")
    allowed = dense_mask(doc.split_lens, doc.split_modes)
    hidden = language_model(sd, cfg, x, pos, is_gen, allowed)
    und_h = hidden[doc.und_nat]
    tied = cfg.tie_word_embeddings
    head = sd["language_model.model.embed_tokens.weight" if tied else "language_model.lm_head.weight"]
    logits = und_h @ head.T
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    out.update(
        hidden=hidden,
        logits=logits,
        ce=lse - logits[np.arange(len(logits)), doc.und_label],
        labels=doc.und_label,
        ce_weight=doc.und_ce,
    )
    if n_gen:
        out["velocity"] = _linear(sd, "llm2vae", hidden[doc.gen_nat])
    return out
