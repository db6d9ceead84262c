"""BAGEL assembly (reference ``modeling/bagel/bagel.py`` ``Bagel.forward``, bagel.md §1.2–§1.4).

One ``PackedBatch`` row in, per-slot CE and per-slot velocities out::

    und slots [0, U):  text → embed_tokens(text_ids);  ViT patch → connector(SigLIP(patches)) + vit_pos_embed(vit_pos)
    gen slots [U, L):  x0 = patchify(normalize(sample_posterior(VAE.encode(image))))[vae_src]      (frozen VAE)
                       t  = shift(sigmoid(vae_timestep[image])) at noised slots, 0 at clean ones
                       x_t = (1 − t)·x0 + t·ε,   h = vae2llm(x_t) + time_embedder(t) + latent_pos_embed(vae_pos)
    (und_h, gen_h) = language_model(und_x, gen_x, position, mask)           (MoT: und / gen experts)
    ce[k]          = CE(lm_head(und_h[slot_k]), labels[slot_k])             (label slots k < K, chunked, f32)
    velocity_pred  = llm2vae(gen_h),  velocity_target = ε − x0,  mse_mask = noised slots

Param tree (names chosen so the official state dict maps by a table, ``convert/bagel_ckpt.py``)::

    language_model/...        LanguageModel (mot.py)            language_model.*
    time_embedder/mlp_{0,2}   TimestepEmbedder                  time_embedder.mlp.{0,2}.*      (visual_gen)
    vae2llm, llm2vae          Dense 64→D / D→64 (llm2vae zero)  vae2llm.*, llm2vae.*           (visual_gen)
    latent_pos_embed/pos_embed  fixed sin-cos [M², D]           latent_pos_embed.pos_embed     (visual_gen)
    vae/{encoder,decoder}     FluxVAE, frozen                   ae.safetensors (separate file)  (visual_gen)
    vit_model/...             SiglipNaViT                       vit_model.vision_model.*       (visual_und)
    connector/fc{1,2}         Connector                         connector.fc{1,2}.*            (visual_und)
    vit_pos_embed/pos_embed   fixed sin-cos [S², D]             vit_pos_embed.pos_embed        (visual_und)

**The VAE lives inside the param tree under ``vae``** (one tree to init, shard, checkpoint and load)
but is frozen by construction: its outputs pass through ``stop_gradient``, so its gradient is exactly
zero and no backward pass runs through it; ``train/optim.py`` additionally gives ``vae/`` no optimizer
state (``ALWAYS_FROZEN``). It is not part of ``ema.safetensors``; the converter reads/writes it from/to
``ae.safetensors``.

Randomness: ``rng`` is split into (posterior, flow): the VAE posterior draw ε_z ~ N(0, 1) of shape
[B, N, H/8, W/8, C] and the flow noise ε ~ N(0, 1) of shape [B, N, T, p²C] (per image and latent
token, so a sample's noise does not depend on where it is packed). Both can be given explicitly
(``noise=``) to reproduce a computation exactly.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bagel_jax.attention.mask import MaskMeta
from bagel_jax.batch import KIND_NOISED_VAE, KIND_TEXT, PackedBatch
from bagel_jax.model.embeddings import Connector, PositionEmbedding, TimestepEmbedder
from bagel_jax.model.layers import bias_init, kernel_init
from bagel_jax.model.mot import HIDDEN_AXES, LanguageModel
from bagel_jax.model.siglip import SiglipNaViT
from bagel_jax.model.vae import FluxVAE, normalize_latent, patchify_latent
from bagel_jax.model.vae_batch import (
    encode_by_size,
    reference_hw,
    reference_padded,
    resolve_encode,
    resolve_scan_mode,
    zero_beyond,
)
from bagel_jax.model.vae_per_chip import dividing_axes, encode_per_chip
from bagel_jax.model.vit_prefix import on_used_prefix, resolve_vit_patches
from bagel_jax.parallel.rules import MESH_AXES, as_mesh_axes


def shift_timestep(t, shift: float):
    """The reference's timestep shift ``s·t / (1 + (s − 1)·t)`` (identity for s = 1)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_time(logit, shift: float):
    """Training flow time from the batch's raw logit: ``shift(sigmoid(z))``; z = −inf (clean) → 0."""
    return shift_timestep(jax.nn.sigmoid(logit.astype(jnp.float32)), shift)


def _scatter_rows(dest, slots, values):
    """dest [B, U, D], slots int[B, P] (U = drop), values [B, P, D] → dest with values written at slots."""
    return jax.vmap(lambda d, s, v: d.at[s].set(v.astype(d.dtype), mode="drop"))(dest, slots, values)


def _gather_rows(src, index):
    """src [B, M, F], index int[B, G] → [B, G, F]."""
    return jnp.take_along_axis(src, index[..., None], axis=1)


def chunked_cross_entropy(h, kernel, labels, chunk: int = 4096, dtype=jnp.float32):
    """Per-slot CE of ``h @ kernel`` without materialising all logits.

    Args:
      h: [B, S, D] final-normed hidden states (every und slot, or the gathered label slots); kernel: [D, V] LM head;
        labels: int[B, S].
      chunk: slots per chunk (the logits of one chunk, [B, chunk, V] f32, are the peak memory;
        each chunk is rematerialised in the backward pass).
      dtype: the matmul's input dtype. The head is cast to it and gathered (FSDP) once, outside the chunk loop, so
        the loop reads one [D, V] copy in ``dtype`` instead of gathering and casting the f32 head per chunk.

    Returns:
      float32[B, S]: logsumexp(logits) − logits[label] (computed everywhere; mask with the weights).
    """
    b, u, d = h.shape
    chunk = max(1, min(chunk, u))
    pad = (-u) % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    n = (u + pad) // chunk
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    ls = labels.reshape(b, n, chunk).swapaxes(0, 1)
    # gathered over fsdp once (vocab stays split over tensor), in the compute dtype
    kernel = nn.with_logical_constraint(kernel.astype(dtype), ("activation_embed", "activation_vocab"))

    @jax.checkpoint
    def one(args):
        hc, lc = args
        # rows stay on their chips (unconstrained, XLA gathered all rows' hidden states to each chip)
        hc = nn.with_logical_constraint(hc, ("activation_batch", "activation_length", "activation_embed"))
        logits = jnp.einsum("bcd,dv->bcv", hc.astype(dtype), kernel, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, lc[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return lse - picked

    ce = jax.lax.map(one, (hs, ls)) if n > 1 else one((hs[0], ls[0]))[None]
    return ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :u]


def label_slots(ce_weight, budget: int):
    """The first ``budget`` label slots of each row: (slot int32[B, K], valid bool[B, K]), K = ``budget``.

    ``ce_weight`` float[B, U] (> 0 marks a label slot). Slots come in increasing order; unused entries point at slot 0
    with ``valid`` False. A row with more than K labels keeps its first K (the packer never builds one:
    ``data.max_labels_per_row`` is one of its budgets).
    """
    has = ce_weight > 0
    slot = jax.vmap(lambda m: jnp.nonzero(m, size=budget, fill_value=0)[0])(has).astype(jnp.int32)
    valid = jnp.arange(budget)[None, :] < jnp.sum(has, axis=1, keepdims=True)
    return slot, valid


class Bagel(nn.Module):
    """The BAGEL model on packed rows. ``cfg`` is the config's ``model`` section.

    ``ce_chunk``: slots per chunk of the chunked LM-head cross entropy.
    ``label_budget``: K > 0 runs the LM head at the first K label slots of each row only (``data.max_labels_per_row``;
    ``ce`` is then [B, K] with its ``ce_weight`` [B, K]); 0 runs it at every und slot (the dense path).
    """

    cfg: ml_collections.ConfigDict
    ce_chunk: int = 4096
    label_budget: int = 0

    def setup(self):
        cfg = self.cfg
        d = cfg.hidden_size
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.language_model = LanguageModel(cfg)
        if cfg.visual_gen:
            patch_dim = cfg.latent_patch_size**2 * cfg.vae.z_channels
            self.time_embedder = TimestepEmbedder(d, dtype=dtype, param_dtype=pdtype)
            self.vae2llm = nn.Dense(
                d,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=kernel_init("patch", "embed"),
                bias_init=bias_init("embed"),
            )
            zeros = nn.initializers.zeros_init()  # the reference zero-initialises llm2vae (weight and bias)
            self.llm2vae = nn.Dense(
                patch_dim,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nn.with_logical_partitioning(zeros, ("embed", "patch")),
                bias_init=nn.with_logical_partitioning(zeros, ("patch",)),
            )
            self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, d, dtype=dtype)
            self.vae = FluxVAE(cfg.vae)
        if cfg.visual_und:
            self.vit_model = SiglipNaViT(cfg)
            self.connector = Connector(d, cfg.connector_act, dtype=dtype, param_dtype=pdtype)
            self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, d, dtype=dtype)

    # --- pieces -----------------------------------------------------------------------------------

    def embed_und(self, batch: PackedBatch):
        """Und-slot inputs [B, U, D]: token embeddings at text slots, ViT tokens at ``vit_slot``, 0 elsewhere."""
        cfg = self.cfg
        u = batch.und_len
        kind_und = batch.kind[:, :u]
        x = self.language_model.embed(batch.text_ids)
        x = jnp.where((kind_und == KIND_TEXT)[..., None], x, jnp.zeros_like(x))
        if cfg.visual_und:
            vit_in = (pixels_to_unit(batch.vit_patches), batch.vit_pos, batch.vit_image)
            if resolve_vit_patches(cfg.get("vit_patches", "auto")) == "used" and not self.is_initializing():
                vit_model = self.vit_model.clone(parent=None)
                vit = on_used_prefix(
                    lambda p, *a: vit_model.apply({"params": p}, *a), self.vit_model.variables["params"], *vit_in
                )
            else:
                vit = self.vit_model(*vit_in)
            vit = self.connector(vit) + self.vit_pos_embed(batch.vit_pos)
            x = _scatter_rows(x, batch.vit_slot, vit)
        return nn.with_logical_constraint(x, HIDDEN_AXES)

    def _encode_slot_by_slot(self, images, hw, reference_padding: bool, k: int = 1):
        """``model.vae.encode_scan``: a ``scan`` over the N image slots, ``k`` at a time, each step encoding those
        slots of every row (sharded over the batch), so a chip holds the encoder activations of k images per local
        row instead of N. ``k`` > 1 lets the step's B·k images split over a tensor (or sequence) pair, where B
        alone would not (``scan_slots_per_step``). A step whose slots are empty in every row skips the encoder
        (``nn.cond``: zeros). Same (mean, logvar) [B·N, h, w, C] as the one-call encode on every real image."""
        b, n = images.shape[:2]
        enc_hw = reference_hw(hw) if reference_padding else hw

        def steps_major(t):  # [B, N, ...] → [N/k, B·k, ...]: each row's k slots of a step side by side
            t = t.reshape(b, n // k, k, *t.shape[2:])
            return jnp.swapaxes(t, 0, 1).reshape(n // k, b * k, *t.shape[3:])

        def skip(vae, x, x_hw):  # every image of the step is an empty slot: zeros, the encoder is not run
            f, z = vae.downsample, vae.cfg.z_channels
            zeros = jnp.zeros((x.shape[0], x.shape[1] // f, x.shape[2] // f, z), jnp.float32)
            return zeros, zeros

        def one_step(vae, carry, xs):
            x, own_hw, x_hw = xs
            x = pixels_to_unit(x)
            if reference_padding:
                x = zero_beyond(x, own_hw)
            x = nn.with_logical_constraint(x, VAE_IMAGE_AXES)
            if vae.is_initializing():
                moments = vae.encode(x, x_hw)
            else:
                moments = nn.cond(jnp.any((x_hw[:, 0] > 0) & (x_hw[:, 1] > 0)), FluxVAE.encode, skip, vae, x, x_hw)
            return carry, tuple(nn.with_logical_constraint(t, VAE_IMAGE_AXES) for t in moments)

        scan = nn.scan(one_step, variable_broadcast="params", split_rngs={"params": False}, length=n // k)
        _, moments = scan(self.vae, None, tuple(steps_major(t) for t in (images, hw, enc_hw)))  # [N/k, B·k, ...]
        return tuple(
            jnp.swapaxes(t.reshape(n // k, b, k, *t.shape[2:]), 0, 1).reshape(b * n, *t.shape[2:]) for t in moments
        )

    def _encode_per_chip(self, images, hw, reference_padding: bool, k: int = 1):
        """``encode_scan_mode="per_chip"``: each chip encodes its own rows' slots (``jax.shard_map`` over the image
        axes, model/vae_per_chip.py), sorted by size bucket, its share of one scan step's B·k images at a time: a
        chunk of empty slots skips the encoder on that chip alone, and (``encode_levels`` > 1) a chunk of small
        images is encoded at the smallest bucket holding them. Same (mean, logvar) [B·N, h, w, C] as
        ``_encode_slot_by_slot`` on every real image's valid region; zeros at empty slots."""
        cfg = self.cfg
        b, n = images.shape[:2]
        enc_hw = reference_hw(hw) if reference_padding else hw
        axes = dividing_axes(_image_axes(b * k), b * k)
        mesh = jax.sharding.get_abstract_mesh()
        chips = 1 if mesh is None or mesh.empty else math.prod(dict(mesh.shape)[a] for a in axes)
        vae, params = self.vae.clone(parent=None), self.vae.variables["params"]

        def zeroed(x, own_hw):  # the reference's padding needs each image's own size: on the chip's whole share
            return zero_beyond(pixels_to_unit(x), own_hw)

        flat = lambda t: t.reshape(b * n, *t.shape[2:])  # noqa: E731  rows major: a chip's slots stay on it
        return encode_per_chip(
            lambda p, x, x_hw: vae.apply({"params": p}, pixels_to_unit(x), x_hw, method=FluxVAE.encode),
            params,
            flat(images),
            flat(jnp.asarray(hw, jnp.int32)),
            flat(enc_hw),
            prepare=zeroed if reference_padding else None,
            axes=axes,
            downsample=self.vae.downsample,
            z_channels=cfg.vae.z_channels,
            levels=cfg.vae.get("encode_levels", 1),
            chunk=max(1, b * k // chips),
        )

    def encode_moments(self, images, hw):
        """The VAE posterior of every slot: (mean, logvar) float32[B·N, H/f, W/f, z] of images [B, N, H, W, C]
        (uint8, or float in [-1, 1]) valid over ``hw`` int[B, N, 2], sharded like the rows. Exact on each real
        image's valid region; elsewhere finite and path-dependent (``model.vae.encode``, ``encode_scan``,
        ``encode_scan_mode``: model/vae_batch.py, model/vae_per_chip.py)."""
        cfg = self.cfg
        b, n, hh, ww, c = images.shape
        mode = resolve_encode(cfg.vae)
        slot_by_slot = cfg.vae.encode_scan and mode == "masked"
        per_chip = slot_by_slot and resolve_scan_mode(cfg.vae) == "per_chip" and not self.is_initializing()
        k = scan_slots_per_step(b, n) if slot_by_slot else n
        with _vae_images_on_batch_axes(b * k):  # the images of one encode call
            ref_pad = bool(cfg.vae.get("reference_padding", False))
            if per_chip:
                mean, logvar = self._encode_per_chip(images, hw, ref_pad, k)
            elif slot_by_slot:
                mean, logvar = self._encode_slot_by_slot(images, hw, ref_pad, k)
            else:
                images = pixels_to_unit(images)
                if ref_pad:
                    images, hw = reference_padded(images, hw)
                images = images.reshape(b * n, hh, ww, c)
                # each chip encodes its share of the images (unconstrained, XLA replicated the encoder over the batch)
                images = nn.with_logical_constraint(images, VAE_IMAGE_AXES)
                if mode == "by_size" and not self.is_initializing():
                    vae, variables = self.vae.clone(parent=None), {"params": self.vae.variables["params"]}
                    mean, logvar = encode_by_size(
                        lambda x, x_hw: vae.apply(variables, x, x_hw, method=FluxVAE.encode),
                        images,
                        hw.reshape(b * n, 2),
                        downsample=self.vae.downsample,
                        z_channels=cfg.vae.z_channels,
                        levels=cfg.vae.get("encode_levels", 1),
                        chunk=cfg.vae.get("encode_chunk", 4),
                    )
                else:
                    mean, logvar = self.vae.encode(images, hw.reshape(b * n, 2))
        return nn.with_logical_constraint(mean, VAE_IMAGE_AXES), nn.with_logical_constraint(logvar, VAE_IMAGE_AXES)

    def encode_latents(self, batch: PackedBatch, rng=None, posterior_noise=None):
        """Clean normalised latent tokens of the row's images: float32[B, N, T, p²C] (frozen VAE).

        ``posterior_noise`` float[B, N, H/8, W/8, C] replaces the posterior draw from ``rng``. How the slots are
        encoded (masked canvas or by size; the reference's padding or each image alone): ``encode_moments``.
        """
        cfg = self.cfg
        b, n = batch.vae_images.shape[:2]
        mean, logvar = self.encode_moments(batch.vae_images, batch.vae_hw)
        mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
        if posterior_noise is None:
            if rng is None:
                raise ValueError("Bagel: an rng (or noise=dict(posterior=...)) is needed to sample the VAE posterior")
            eps = jax.random.normal(rng, mean.shape, jnp.float32)
        else:
            eps = jnp.asarray(posterior_noise, jnp.float32).reshape(mean.shape)
        z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
        tokens = patchify_latent(normalize_latent(z, cfg.vae), cfg.latent_patch_size)
        return tokens.reshape(b, n, tokens.shape[1], tokens.shape[2])

    def embed_gen(self, x_t, t, vae_pos):
        """Gen-slot inputs [B, G, D] = vae2llm(x_t) + time_embedder(t) + latent_pos_embed(vae_pos)."""
        h = self.vae2llm(x_t) + self.time_embedder(t) + self.latent_pos_embed(vae_pos)
        return nn.with_logical_constraint(h, HIDDEN_AXES)

    def lm_head_kernel(self):
        """The LM head as a [D, V] array (the embedding matrix transposed when tied)."""
        lm = self.language_model
        if self.cfg.tie_word_embeddings:
            return nn.unbox(lm.embed_tokens.variables["params"]["embedding"]).T
        return nn.unbox(lm.lm_head.variables["params"]["kernel"])

    def text_logits(self, und_h):
        """[B, T, D] final-normed und hidden states → [B, T, V] logits."""
        return self.language_model.logits(und_h)

    def velocity(self, gen_h):
        """[B, G, D] final-normed gen hidden states → predicted velocity float32[B, G, p²C]."""
        return self.llm2vae(gen_h).astype(jnp.float32)

    # --- forward ----------------------------------------------------------------------------------

    def __call__(
        self,
        batch: PackedBatch,
        rng=None,
        *,
        noise: dict | None = None,
        x0=None,
        xt=None,
        deterministic: bool = True,
        return_logits: bool = False,
        with_ce: bool = True,
    ) -> dict[str, Any]:
        """Forward of packed rows.

        Args:
          batch: ``PackedBatch`` (leading row dim B).
          rng: PRNG key for the posterior draw and the flow noise (not needed if both are given).
          noise: optional ``{'posterior': [B, N, H/8, W/8, C], 'flow': [B, N, T, p²C]}`` overriding the draws.
          x0: optional float[B, N, T, p²C] clean latent tokens (skips the VAE; e.g. encoded once for sampling).
          xt: optional (x_t float[B, G, p²C], t float[B, G]) used at the noised slots instead of noising
            x0 (the sampler's current state and flow time).
          deterministic: unused (no dropout).
          return_logits: also return ``text_logits`` [B, U, V] (small models / tests only).
          with_ce: compute ``ce`` (inference turns it off: it costs U·V·D per row).

        Returns:
          dict with ``und_hidden`` [B, U, D], ``ce`` float32[B, U] (if ``with_ce``: CE of the label at every
          und slot; mask with ``batch.ce_weight > 0``; with ``label_budget`` K: ``ce`` [B, K] at the row's label
          slots and their weights ``ce_weight`` [B, K], 0 at unused entries), and when ``visual_gen`` and G > 0:
          ``velocity_pred``, ``velocity_target`` float32[B, G, p²C], ``mse_mask`` bool[B, G] (noised slots),
          ``timestep`` float32[B, G] (flow time per slot), ``gen_hidden`` [B, G, D].
        """
        cfg = self.cfg
        u, g = batch.und_len, batch.gen_len
        noise = noise or {}
        und_x = self.embed_und(batch)
        out: dict[str, Any] = {}
        if cfg.visual_gen and g > 0:
            kind_gen = batch.kind[:, u:]
            noised = kind_gen == KIND_NOISED_VAE
            rng_post, rng_flow = jax.random.split(rng) if rng is not None else (None, None)
            if x0 is None:
                x0 = self.encode_latents(batch, rng_post, noise.get("posterior"))
            b, n, t_img, f = x0.shape
            flat_src = jnp.clip(batch.vae_src, 0, n * t_img - 1)
            x0_slot = _gather_rows(x0.reshape(b, n * t_img, f), flat_src)
            if "flow" in noise:
                eps = jnp.asarray(noise["flow"], jnp.float32).reshape(b, n * t_img, f)
            elif xt is None:
                if rng_flow is None:
                    raise ValueError("Bagel: an rng (or noise=dict(flow=...)) is needed for the flow noise")
                eps = jax.random.normal(rng_flow, (b, n * t_img, f), jnp.float32)
            else:
                eps = jnp.zeros((b, n * t_img, f), jnp.float32)
            eps_slot = _gather_rows(eps, flat_src)
            t_per_image = flow_time(batch.vae_timestep, cfg.timestep_shift)  # [B, N]
            t = jnp.where(noised, jnp.take_along_axis(t_per_image, flat_src // t_img, axis=1), 0.0)
            x_t = (1.0 - t[..., None]) * x0_slot + t[..., None] * eps_slot
            if xt is not None:
                xt_val, xt_time = xt
                x_t = jnp.where(noised[..., None], jnp.asarray(xt_val, jnp.float32), x_t)
                t = jnp.where(noised, jnp.asarray(xt_time, jnp.float32), t)
            gen_x = self.embed_gen(x_t, t, batch.vae_pos)
            out.update(velocity_target=eps_slot - x0_slot, mse_mask=noised, timestep=t)
        else:
            gen_x = jnp.zeros((und_x.shape[0], g, cfg.hidden_size), und_x.dtype)

        und_h, gen_h = self.language_model(
            und_x, gen_x, batch.position, MaskMeta.of(batch), deterministic=deterministic
        )
        if self.is_initializing():  # create the LM head and the whole VAE (decoder too) in the param tree
            self.language_model.logits(und_h[:, :1])
            if cfg.visual_gen:
                self.vae.decode(jnp.zeros((1, 1, 1, cfg.vae.z_channels), jnp.float32))
        out["und_hidden"] = und_h
        if with_ce:
            h, labels = und_h, batch.labels
            if self.label_budget:
                slot, valid = label_slots(batch.ce_weight, self.label_budget)
                h = nn.with_logical_constraint(_gather_rows(und_h, slot), HIDDEN_AXES)
                labels = jnp.take_along_axis(batch.labels, slot, axis=1)
                weight = jnp.take_along_axis(batch.ce_weight, slot, axis=1)
                out["ce_weight"] = jnp.where(valid, weight, 0.0)
            out["ce"] = chunked_cross_entropy(h, self.lm_head_kernel(), labels, self.ce_chunk, jnp.dtype(cfg.dtype))
        if return_logits:
            out["text_logits"] = self.text_logits(und_h)
        if cfg.visual_gen and g > 0:
            out["gen_hidden"] = gen_h
            out["velocity_pred"] = self.velocity(gen_h)
        return out


VAE_IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")


def _image_axes(count: int) -> tuple[str, ...]:
    """The mesh axes ``count`` images of one encode call split over: the rows' axes (``activation_batch``: data,
    fsdp), then each of the axes the rows are replicated on (tensor, sequence) whose size still divides ``count``."""
    axes = dict(nn.get_logical_axis_rules()).get("activation_batch")
    axes = as_mesh_axes(axes)
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh is None or mesh.empty else dict(mesh.shape)
    for spare in MESH_AXES:
        wider = (*axes, spare)
        if spare not in axes and sizes.get(spare, 1) > 1 and count % math.prod(sizes.get(a, 1) for a in wider) == 0:
            axes = wider
    return axes


def scan_slots_per_step(rows: int, slots: int) -> int:
    """Slots per step of ``encode_scan``: the fewest k dividing ``slots`` whose rows·k images split over every
    mesh axis ``_image_axes`` can use (the 45K v6e plan: 32 rows on fsdp 32 × tensor 2 → k = 2), else 1."""
    best = len(_image_axes(rows * slots))
    return next((k for k in range(1, slots + 1) if slots % k == 0 and len(_image_axes(rows * k)) == best), 1)


def _vae_images_on_batch_axes(count: int):
    """The logical rules in force with the VAE's image axis (``activation_images``, and ``activation_batch`` of the
    encoder's inputs and outputs) split over ``_image_axes(count)``, ``count`` = the images of one encode call:
    each chip encodes only its share of the images.

    Without it every residual add of the encoder all-gathered the image batch (a 16 GiB [64·1024, 1024, 128] buffer
    per chip for 64 rows of 1024² images); with the rows' axes only, both chips of a tensor (or sequence) pair
    encoded the same images, the frozen encoder's FLOPs twice (docs/DESIGN_NOTES.md 50). The rows are major in the
    image axis, so the further split is a local slice of each chip's rows; the latents are gathered back to the
    rows' sharding after the encode."""
    axes = _image_axes(count)
    rules = tuple(nn.get_logical_axis_rules())
    return nn.logical_axis_rules(
        tuple((k, axes if k in ("activation_images", "activation_batch") else v) for k, v in rules)
    )


def pixels_to_unit(x):
    """Pixels as float32 in [-1, 1]: uint8 [0, 255] (``data.pixel_dtype="uint8"``) is scaled on device,
    float input is taken as already normalised. Padding needs no zeroing: the VAE masks it by ``vae_hw`` and
    padding ViT patches are dropped by the scatter."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x


def dummy_batch(
    model_cfg,
    batch_size: int = 1,
    *,
    seq_len: int = 16,
    und_len: int = 12,
    vit_patches: int = 4,
    vae_images: int = 1,
    vae_hw: tuple[int, int] = (16, 16),
) -> PackedBatch:
    """An all-padding ``PackedBatch`` (small by default: parameter shapes do not depend on the budgets)."""
    import numpy as np

    from bagel_jax.batch import empty_row

    row = empty_row(seq_len, und_len, vit_patches, model_cfg.vit.patch_size**2 * 3, vae_images, tuple(vae_hw))
    return PackedBatch(**{k: jnp.asarray(np.broadcast_to(v, (batch_size,) + v.shape)) for k, v in row.items()})


def make_init_fn(config):
    """``(model, init_fn)`` for a full config; ``init_fn(rng) -> params`` (boxed with logical axis names),
    the ``params`` collection of ``Bagel(config.model)`` incl. the frozen VAE under ``vae``."""
    model = Bagel(config.model, ce_chunk=config.model.ce_chunk, label_budget=config.data.max_labels_per_row)
    batch = dummy_batch(config.model)

    def init_fn(rng):
        k_params, k_noise = jax.random.split(rng)
        return model.init({"params": k_params}, batch, k_noise)["params"]

    return model, init_fn


def init_bagel(config, rng):
    """``(model, {'params': ...})`` (boxed) for a full config."""
    model, init_fn = make_init_fn(config)
    return model, {"params": init_fn(rng)}
