"""FLUX autoencoder (reference: modeling/autoencoder.py, BFL's FLUX.1 ``AutoEncoder``), NHWC.

Encoder: conv_in → levels of ResnetBlocks with a ``Downsample`` (pad bottom/right by 1, conv3x3
stride 2) after every level but the last → mid (Resnet, single-head AttnBlock, Resnet) → GroupNorm →
swish → conv_out (2·z channels: mean, logvar). Decoder mirrors it with nearest-×2 ``Upsample``.
No quant convs. Parameter names follow BFL's ``ae.safetensors`` (``down_{i}/block_{j}/norm1``,
``mid_attn_1/q``, ``up_{i}`` with i the resolution level, 0 = full resolution).

**Padded batches.** Several images of different sizes go through one static-shape call: image n
sits top-left in the canvas, valid over ``hw[n]`` pixels. Every GroupNorm takes its statistics over
the valid region only, every 3×3 conv sees zeros beyond it (the input is re-zeroed first, as in a
per-image call's zero padding; this also reproduces the stride-2 Downsample's bottom/right pad), and
the mid-block attention masks padded keys. So each image's valid output equals encoding (decoding)
it alone at its own size (DESIGN §4). Outside the valid region the output is finite and meaningless.

Latent helpers: ``normalize_latent`` / ``denormalize_latent`` (FLUX scale/shift),
``sample_posterior`` (mean + σ·ε, as the reference always samples), ``patchify_latent`` /
``unpatchify_latent`` (2×2 latent patches → tokens, feature index ``(pi*p + qi)*C + c``).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.model.layers import dense

GROUPS = 32
NORM_EPS = 1e-6
SPATIAL = ("activation_images", "activation_height", "activation_width", "activation_channels")
_MASKED_LOGIT = -1e30  # finite, so a fully padded image (hw = 0) still gives finite outputs


# --- masks ---------------------------------------------------------------------------------------


def valid_mask(hw: jnp.ndarray | None, height: int, width: int) -> jnp.ndarray | None:
    """float32[N, height, width, 1]: 1 inside each image's valid (h, w) top-left region, else 0."""
    if hw is None:
        return None
    hw = jnp.asarray(hw, jnp.int32)
    rows = jnp.arange(height, dtype=jnp.int32)[None, :, None] < hw[:, 0, None, None]
    cols = jnp.arange(width, dtype=jnp.int32)[None, None, :] < hw[:, 1, None, None]
    return (rows & cols)[..., None].astype(jnp.float32)


def _zero_outside(x, mask):
    return x if mask is None else jnp.where(mask > 0, x, jnp.zeros((), x.dtype))


def _check_hw(hw, height: int, width: int, multiple: int, what: str):
    """Checks concrete valid sizes: within the canvas and multiples of ``multiple``."""
    if hw is None:
        return
    try:
        hw = np.asarray(hw)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced (inside jit): the caller guarantees the sizes
    if hw.ndim != 2 or hw.shape[1] != 2:
        raise ValueError(f"FluxVAE.{what}: hw must be int[N, 2] (valid height, width), got shape {hw.shape}")
    for n, (h, w) in enumerate(hw.tolist()):
        if not (0 <= h <= height and 0 <= w <= width):
            raise ValueError(f"FluxVAE.{what}: image {n} valid size {(h, w)} exceeds the canvas {(height, width)}")
        if h % multiple or w % multiple:
            raise ValueError(f"FluxVAE.{what}: image {n} valid size {(h, w)} is not a multiple of {multiple}")


# --- layers --------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding="SAME") -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    )


def _pointwise(features: int, name: str, dtype) -> nn.Dense:
    """A 1×1 conv as a Dense over channels (kernel [in, out])."""
    return dense(features, ("conv_in", "conv_out"), name, dtype, jnp.float32)


class MaskedGroupNorm(nn.Module):
    """GroupNorm(32, eps 1e-6) over (H, W, C/32) with statistics from masked positions only.

    x [N, H, W, C], mask float[N, H, W, 1] or None (all valid). Statistics in float32, two-pass
    variance; returns x's dtype. Each statistic is summed over positions first ([N, H·W, C] → [N, C],
    a reduction over one middle axis) and then over a group's C/32 channels: XLA:CPU ran the one
    reduction over (H, W, C/32) of [N, H, W, 32, C/32] 3-7× slower (docs/DESIGN_NOTES.md 59).
    """

    groups: int = GROUPS
    eps: float = NORM_EPS

    @nn.compact
    def __call__(self, x, mask=None):
        n, h, w, c = x.shape
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels not divisible into {self.groups} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,))
        per_group = c // self.groups
        xf = x.astype(jnp.float32).reshape(n, h * w, c)
        # select, not multiply: XLA CPU fuses `where` into the reductions (the product ran ~10x slower)
        valid = None if mask is None else (mask > 0).reshape(n, h * w, 1)
        positions = h * w if valid is None else valid.sum(axis=(1, 2), dtype=jnp.float32)[:, None]  # [N, 1]
        count = jnp.maximum(jnp.asarray(positions, jnp.float32) * per_group, 1.0)

        def group_mean(values):  # [N, H·W, C] -> [N, 1, C]: each channel gets its group's masked mean
            summed = (values if valid is None else jnp.where(valid, values, 0.0)).sum(axis=1)  # [N, C]
            per_group_mean = summed.reshape(n, self.groups, per_group).sum(axis=-1) / count  # [N, G]
            return jnp.repeat(per_group_mean, per_group, axis=1)[:, None, :]

        centred = xf - group_mean(xf)
        y = (centred * jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.eps)).reshape(n, h, w, c)
        return (y * scale + bias).astype(x.dtype)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), 1×1 ``nin_shortcut`` when channels change."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.swish(MaskedGroupNorm(name="norm1")(x, mask))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(_zero_outside(h, mask))
        h = nn.swish(MaskedGroupNorm(name="norm2")(h, mask))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(_zero_outside(h, mask))
        if x.shape[-1] != self.out_channels:
            x = _pointwise(self.out_channels, "nin_shortcut", self.dtype)(x)
        return nn.with_logical_constraint(x + h, SPATIAL)


def masked_spatial_attention(q, k, v, key_valid=None, block: int = 1024):
    """Single-head softmax attention over positions. q, k, v [N, L, C]; key_valid bool[N, L] or None.

    Queries are processed ``block`` at a time so the logits never exceed [N, block, L]. float32 math.
    """
    n, length, c = q.shape
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    scale = c**-0.5

    def attend(qb):  # [N, Lb, C]
        logits = jnp.einsum("nqc,nkc->nqk", qb.astype(jnp.float32) * scale, k32)
        if key_valid is not None:
            logits = jnp.where(key_valid[:, None, :], logits, _MASKED_LOGIT)
        return jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1), v32)

    if length <= block:
        return attend(q)
    pad = (-length) % block
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    qb = einops.rearrange(qb, "n (b l) c -> b n l c", l=block)
    out = jax.lax.map(attend, qb)
    return einops.rearrange(out, "b n l c -> n (b l) c")[:, :length]


class AttnBlock(nn.Module):
    """x + proj_out(attention(q(h), k(h), v(h))), h = norm(x); one head of width C over all H·W positions."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        n, hgt, wid, c = x.shape
        h = MaskedGroupNorm(name="norm")(x, mask).reshape(n, hgt * wid, c)
        q, k, v = (_pointwise(c, name, self.dtype)(h) for name in ("q", "k", "v"))
        key_valid = None if mask is None else mask.reshape(n, hgt * wid) > 0
        out = masked_spatial_attention(q, k, v, key_valid).astype(self.dtype)
        out = _pointwise(c, "proj_out", self.dtype)(out).reshape(n, hgt, wid, c)
        return nn.with_logical_constraint(x + out, SPATIAL)


class Downsample(nn.Module):
    """Zero-pad bottom and right by 1, conv3x3 stride 2 (no other padding): [N, H, W, C] → [N, H/2, W/2, C]."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        x = jnp.pad(_zero_outside(x, mask), ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest ×2 then conv3x3: [N, H, W, C] → [N, 2H, 2W, C]."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(_zero_outside(x, mask))


def _mid(x, mask, channels, dtype):
    x = ResnetBlock(channels, dtype, name="mid_block_1")(x, mask)
    x = AttnBlock(dtype, name="mid_attn_1")(x, mask)
    return ResnetBlock(channels, dtype, name="mid_block_2")(x, mask)


def _level_hw(hw, factor_num: int, factor_den: int):
    return None if hw is None else jnp.asarray(hw, jnp.int32) * factor_num // factor_den


class Encoder(nn.Module):
    """images [N, H, W, in_channels], hw int[N, 2] or None → moments [N, H/2^(L-1), W/2^(L-1), 2z]."""

    cfg: Any

    @nn.compact
    def __call__(self, x, hw=None):
        c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        levels = len(c.ch_mult)
        mask = valid_mask(hw, *x.shape[1:3])
        x = _conv(c.ch, 3, "conv_in", dtype)(_zero_outside(x.astype(dtype), mask))
        for i, mult in enumerate(c.ch_mult):
            for j in range(c.num_res_blocks):
                x = ResnetBlock(c.ch * mult, dtype, name=f"down_{i}_block_{j}")(x, mask)
            if i != levels - 1:
                x = Downsample(dtype, name=f"down_{i}_downsample")(x, mask)
                mask = valid_mask(_level_hw(hw, 1, 2 ** (i + 1)), *x.shape[1:3])
        x = _mid(x, mask, c.ch * c.ch_mult[-1], dtype)
        x = nn.swish(MaskedGroupNorm(name="norm_out")(x, mask))
        return _conv(2 * c.z_channels, 3, "conv_out", dtype)(_zero_outside(x, mask))


class Decoder(nn.Module):
    """latents [N, h, w, z], hw (latent valid sizes) int[N, 2] or None → [N, h·2^(L-1), w·2^(L-1), out_ch]."""

    cfg: Any

    @nn.compact
    def __call__(self, z, hw=None):
        c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        levels = len(c.ch_mult)
        mask = valid_mask(hw, *z.shape[1:3])
        channels = c.ch * c.ch_mult[-1]
        x = _conv(channels, 3, "conv_in", dtype)(_zero_outside(z.astype(dtype), mask))
        x = _mid(x, mask, channels, dtype)
        for i in reversed(range(levels)):
            for j in range(c.num_res_blocks + 1):
                x = ResnetBlock(c.ch * c.ch_mult[i], dtype, name=f"up_{i}_block_{j}")(x, mask)
            if i != 0:
                up = 2 ** (levels - i)
                mask = valid_mask(_level_hw(hw, up, 1), x.shape[1] * 2, x.shape[2] * 2)
                x = Upsample(dtype, name=f"up_{i}_upsample")(x, mask)
        x = nn.swish(MaskedGroupNorm(name="norm_out")(x, mask))
        return _conv(c.out_ch, 3, "conv_out", dtype)(_zero_outside(x, mask))


class FluxVAE(nn.Module):
    """The FLUX autoencoder; ``cfg`` is the ``model.vae`` config section.

    ``encode(images [N, H, W, 3] in [-1, 1], hw int32[N, 2] valid sizes or None) -> (mean, logvar)``
    each float32[N, H/8, W/8, z], raw (not normalised). ``decode(z_raw [N, h, w, z], hw=None) ->
    float32[N, 8h, 8w, 3]``; ``hw`` there are latent valid sizes. ``__call__`` = decode(encode mean)
    (used to initialise both halves). Frozen use: wrap in ``jax.lax.stop_gradient`` at the caller.
    """

    cfg: Any

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def encode(self, images, hw=None):
        if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"FluxVAE.encode: images must be [N, H, W, {self.cfg.in_channels}], got {images.shape}")
        f = self.downsample
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"FluxVAE.encode: canvas {images.shape[1:3]} is not a multiple of {f}")
        _check_hw(hw, images.shape[1], images.shape[2], f, "encode")
        moments = self.encoder(images, hw).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, logvar

    def decode(self, z, hw=None):
        if z.ndim != 4 or z.shape[-1] != self.cfg.z_channels:
            raise ValueError(f"FluxVAE.decode: latents must be [N, h, w, {self.cfg.z_channels}], got {z.shape}")
        _check_hw(hw, z.shape[1], z.shape[2], 1, "decode")
        return self.decoder(z, hw).astype(jnp.float32)

    def __call__(self, images, hw=None):
        mean, _ = self.encode(images, hw)
        return self.decode(mean, None if hw is None else jnp.asarray(hw) // self.downsample)


# --- latent helpers ------------------------------------------------------------------------------


def normalize_latent(z, cfg):
    """Raw VAE latent → the normalised latent the LLM sees: ``scale_factor * (z - shift_factor)``."""
    return cfg.scale_factor * (z - cfg.shift_factor)


def denormalize_latent(z, cfg):
    """Inverse of ``normalize_latent``: ``z / scale_factor + shift_factor``."""
    return z / cfg.scale_factor + cfg.shift_factor


def sample_posterior(mean, logvar, rng):
    """A draw from the diagonal Gaussian posterior: ``mean + exp(0.5·logvar)·ε``, ε ~ N(0, 1)."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


def patchify_latent(z, p: int = 2):
    """[N, h, w, C] → tokens [N, (h/p)·(w/p), p·p·C]; token (r, c) row-major, feature (pi·p + qi)·C + ch."""
    if z.ndim != 4 or z.shape[1] % p or z.shape[2] % p:
        raise ValueError(f"patchify_latent: latent must be [N, h, w, C] with h, w multiples of {p}, got {z.shape}")
    return einops.rearrange(z, "n (h pi) (w qi) c -> n (h w) (pi qi c)", pi=p, qi=p)


def unpatchify_latent(tokens, h: int, w: int, p: int = 2):
    """Inverse of ``patchify_latent``: tokens [N, h·w, p·p·C] on an h×w token grid → [N, h·p, w·p, C]."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % (p * p):
        raise ValueError(f"unpatchify_latent: tokens must be [N, {h}*{w}, {p}*{p}*C], got {tokens.shape}")
    return einops.rearrange(tokens, "n (h w) (pi qi c) -> n (h pi) (w qi) c", h=h, w=w, pi=p, qi=p)
