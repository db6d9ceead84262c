"""How a batch of packed VAE image slots is encoded: on the masked canvas, or by size, and with the reference's padding.

Every image slot of a row sits top-left in a static canvas [H, W], valid over its ``hw`` (0 × 0 = empty slot).

- ``"masked"`` (the oracle): one ``FluxVAE.encode`` over every slot's full canvas, padding masked out (model/vae.py);
  cost ∝ slots × canvas, empty slots included.
- ``"by_size"``: the non-empty images are sorted by size bucket and encoded ``chunk`` at a time, each chunk at the
  smallest static bucket [bh, bw] that holds all of its images (``levels`` sizes per side: the canvas side × k/levels,
  rounded up to the VAE's downsampling; each bucket is one more compile of the encoder), masked within the bucket;
  chunks of empty slots are skipped (``lax.switch``). Cost ∝ Σ bucket areas of the real images. Equal to
  ``"masked"`` on every image's valid region (f32 noise); outside it the values differ (both meaningless, finite).
- ``"auto"``: ``by_size`` on CPU (single-chip work where skipping pays), ``masked`` elsewhere and with ``encode_scan``.

With ``encode_scan`` (and ``masked``), ``encode_scan_mode`` picks how the slots are walked: ``"global"`` = a scan over
the slots, k per step, a step skipped only where its slots are empty in every row (``Bagel._encode_slot_by_slot``,
the oracle); ``"per_chip"`` = ``encode_by_size`` on each chip's own images in a ``shard_map``, a chunk = its share of
one step (model/vae_per_chip.py): each chip skips its own empty slots and sizes its own buckets.

``reference_padding`` (the official trainer, ``padded_images``): a row's images are encoded each zero-padded to the
row's largest height and width, so a small image's latent depends on the padding (the mid-block attention and the
GroupNorm statistics see the zeros). Emulated exactly by zeroing each image outside its own size and encoding it as
valid over the row's maximum (``reference_padded``); any encode mode then applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bagel_jax.model.vae import valid_mask

ENCODE_MODES = ("auto", "masked", "by_size")
SCAN_MODES = ("per_chip", "global")


def resolve_encode(vae_cfg) -> str:
    """``model.vae.encode`` with ``auto`` resolved for this process's backend: ``"masked"`` or ``"by_size"``."""
    mode = vae_cfg.get("encode", "masked")
    if mode not in ENCODE_MODES:
        raise ValueError(f"model.vae.encode: unknown mode {mode!r} (one of {', '.join(ENCODE_MODES)})")
    if mode == "auto":
        return "by_size" if jax.default_backend() == "cpu" and not vae_cfg.get("encode_scan", False) else "masked"
    return mode


def resolve_scan_mode(vae_cfg) -> str:
    """``model.vae.encode_scan_mode``: ``"per_chip"`` (each chip skips and sizes its own images,
    model/vae_per_chip.py) or ``"global"`` (the slot scan, skipping a step only when every row's slot is empty)."""
    mode = vae_cfg.get("encode_scan_mode", "global")
    if mode not in SCAN_MODES:
        raise ValueError(f"model.vae.encode_scan_mode: unknown mode {mode!r} (one of {', '.join(SCAN_MODES)})")
    return mode


def zero_beyond(images, hw):
    """images [..., H, W, C] with 0 outside each image's own top-left ``hw`` [..., 2] (the reference's zero padding;
    uint8 padding is −1 after ``pixels_to_unit``)."""
    lead, (hh, ww, _) = images.shape[:-3], images.shape[-3:]
    own = valid_mask(jnp.asarray(hw, jnp.int32).reshape(-1, 2), hh, ww).reshape(*lead, hh, ww, 1)
    return jnp.where(own > 0, images, jnp.zeros((), images.dtype))


def reference_hw(hw):
    """hw int[B, N, 2] → the size each slot is encoded at under the reference's padding: the row's largest
    (height, width) over its non-empty slots, 0 for empty slots."""
    hw = jnp.asarray(hw, jnp.int32)
    real = (hw[..., 0] > 0) & (hw[..., 1] > 0)  # [B, N]
    row_max = jnp.max(jnp.where(real[..., None], hw, 0), axis=1, keepdims=True)  # [B, 1, 2]
    return jnp.where(real[..., None], row_max, 0)


def reference_padded(images, hw):
    """The official trainer's padding for images [B, N, H, W, C] in [-1, 1], hw int[B, N, 2]:
    (``zero_beyond(images, hw)``, ``reference_hw(hw)``); encoding these masked equals the reference's encode."""
    return zero_beyond(images, hw), reference_hw(hw)


def bucket_sides(side: int, levels: int, multiple: int) -> tuple[int, ...]:
    """The static bucket sizes of one canvas side: ⌈side·k/levels⌉ rounded up to ``multiple``, k = 1..levels."""
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    sizes = {min(side, ceil(ceil(side * k, levels), multiple) * multiple) for k in range(1, levels + 1)}
    return tuple(sorted(s for s in sizes if s > 0))


def encode_by_size(encode, images, hw, *, downsample: int, z_channels: int, levels: int = 1, chunk: int = 4):
    """Encodes the real images of ``images`` [M, H, W, C] (valid sizes ``hw`` int[M, 2]) by size bucket.

    Args:
      encode: ``encode(x [c, h, w, C], hw int[c, 2]) -> (mean, logvar)`` each [c, h/f, w/f, z]
        (``FluxVAE.encode`` with its params bound).
      downsample, z_channels: the VAE's f (bucket sides are multiples of it) and latent channels.
      levels: bucket sizes per side (1 = the canvas only: empty slots skipped).
      chunk: images per encode call.

    Returns:
      (mean, logvar) float32[M, H/f, W/f, z]: each image's valid region equals encoding it alone; finite elsewhere
      (zeros beyond its bucket and for empty slots).
    """
    images = jnp.asarray(images)
    m, hh, ww, _ = images.shape
    hs, ws = bucket_sides(hh, levels, downsample), bucket_sides(ww, levels, downsample)
    hw = jnp.asarray(hw, jnp.int32)
    empty = (hw[:, 0] <= 0) | (hw[:, 1] <= 0)
    lh = jnp.searchsorted(jnp.asarray(hs, jnp.int32), hw[:, 0], side="left")  # smallest bucket side ≥ h
    lw = jnp.searchsorted(jnp.asarray(ws, jnp.int32), hw[:, 1], side="left")
    key = jnp.where(empty, len(hs) * len(ws), lh * len(ws) + lw)
    chunks = -(-m // chunk)
    order = jnp.argsort(jnp.concatenate([key, jnp.full(chunks * chunk - m, len(hs) * len(ws) + 1)]), stable=True)
    order = order.reshape(chunks, chunk).astype(jnp.int32)  # entries ≥ M are padding
    hf, wf = hh // downsample, ww // downsample

    def branch(bh, bw):
        def run(x, x_hw):
            mean, logvar = encode(x[:, :bh, :bw], x_hw)
            pad = ((0, 0), (0, hf - mean.shape[1]), (0, wf - mean.shape[2]), (0, 0))
            return jnp.pad(mean.astype(jnp.float32), pad), jnp.pad(logvar.astype(jnp.float32), pad)

        return run

    def skip(x, x_hw):
        zeros = jnp.zeros((x.shape[0], hf, wf, z_channels), jnp.float32)
        return zeros, zeros

    branches = [skip] + [branch(bh, bw) for bh in hs for bw in ws]

    def one_chunk(_, idx):
        safe = jnp.minimum(idx, m - 1)
        real = (idx < m) & ~empty[safe]
        x, x_hw = images[safe], jnp.where(real[:, None], hw[safe], 0)
        ih, iw = jnp.max(jnp.where(real, lh[safe], 0)), jnp.max(jnp.where(real, lw[safe], 0))
        index = jnp.where(jnp.any(real), 1 + ih * len(ws) + iw, 0)
        return None, jax.lax.switch(index, branches, x, x_hw)

    _, (mean, logvar) = jax.lax.scan(one_chunk, None, order)
    inverse = jnp.argsort(order.reshape(-1))[:m]
    return tuple(t.reshape(chunks * chunk, *t.shape[2:])[inverse] for t in (mean, logvar))
