"""``encode_scan_mode="per_chip"``: each chip encodes its own images by size, under ``jax.shard_map``.

Under SPMD a ``cond`` predicate is global: the slot-scan's skip (``Bagel._encode_slot_by_slot``) only pays where a
step's slots are empty in every row of the batch, and a small image costs a full-canvas encode. Here the image axis
[M] (rows major, split over the mesh ``axes``) is manual: each chip runs ``encode_by_size`` on its own M/P images,
``chunk`` at a time, so a chip skips its own chunks of empty slots and (``levels`` > 1) encodes a chunk of small
images at the smallest bucket that holds them, whatever the other chips hold. The frozen VAE params enter
replicated. Logical sharding constraints inside the VAE are switched off (empty rules): inside the manual region
every array is one chip's.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from bagel_jax.model.vae_batch import encode_by_size


def dividing_axes(axes: tuple[str, ...], count: int, mesh=None) -> tuple[str, ...]:
    """The longest prefix of ``axes`` whose mesh sizes multiply to a divisor of ``count`` (the context mesh's)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    sizes = {} if mesh is None or mesh.empty else dict(mesh.shape)
    kept = tuple(axes)
    while kept and count % math.prod(sizes.get(a, 1) for a in kept):
        kept = kept[:-1]
    return kept


def encode_per_chip(
    encode,
    params,
    images,
    own_hw,
    enc_hw,
    *,
    prepare=None,
    axes: tuple[str, ...],
    downsample: int,
    z_channels: int,
    levels: int = 1,
    chunk: int = 1,
):
    """(mean, logvar) float32[M, H/f, W/f, z] of images [M, H, W, C], each chip encoding its own share.

    Args:
      encode: ``encode(params, x [c, h, w, C], hw int[c, 2]) -> (mean, logvar)`` (``FluxVAE.encode``); ``x`` as
        stored (or as ``prepare`` returns it): pixels go to [-1, 1] per chunk, in ``encode``.
      params: the encoder's params (replicated into every chip).
      images: [M, H, W, C] as stored (uint8 or float), M split over ``axes`` (their sizes' product divides M).
      own_hw, enc_hw: int[M, 2]: each image's own size (for ``prepare``) and the size it is encoded at (0 = empty).
      prepare: ``prepare(x, own_hw) -> x`` on a chip's whole share before the chunks (the reference's zero
        padding, which needs each image's own size); None = the images as stored.
      axes: the mesh axes the image axis is split over (``Bagel``'s ``_image_axes``, ``dividing_axes``).
      chunk: images per encode call per chip (the slot scan's images per step per chip: its memory bound).
      levels: bucket sizes per canvas side (``encode_by_size``; 1 = the canvas, only empty chunks skipped).

    Returns:
      each real image's moments on its valid region as the masked encode gives them; zeros at empty slots and
      beyond a chunk's bucket. Without a mesh (or on one chip) the same computation runs as one plain call.
    """

    def local(p, x, own, enc):
        with nn.logical_axis_rules(()):  # one chip's arrays: no constraint to the (global) mesh in here
            return encode_by_size(
                partial(encode, p),
                x if prepare is None else prepare(x, own),
                enc,
                downsample=downsample,
                z_channels=z_channels,
                levels=levels,
                chunk=chunk,
            )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes or not axes:
        return local(params, images, own_hw, enc_hw)
    spec = P(axes if len(axes) > 1 else axes[0])
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), spec, spec, spec),
        out_specs=(spec, spec),
        check_vma=False,
    )(params, images, own_hw, enc_hw)
