"""Abstract inputs of one KV-cached image-generation call, for AOT compiling it (``python -m bagel_jax.aot --infer``).

The call (``cached_image._build_velocity``) prefills ``branches × requests`` context rows of ``context_tokens`` text
tokens each into the KV cache, then runs one Euler step's flow evaluation of a ``image_hw`` query image per row
against it (the CFG branches gen / cfg_text / cfg_img as rows). Shapes only (``jax.ShapeDtypeStruct``), replicated
on the mesh; the params' shardings come from the training rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax.attention.mask import MaskMeta
from bagel_jax.batch import FIELDS, PackedBatch
from bagel_jax.data.pack import Budgets, field_shapes
from bagel_jax.infer.cache import ImageQuery

VIT_PATCHES = 16  # the smallest ViT patch budget (a text-only context has no ViT tokens)


def image_step_inputs(
    model_cfg, mesh, *, context_tokens: int, image_hw: tuple[int, int], requests: int, branches: int = 3
) -> tuple:
    """``(batch, query, keys, x, t)`` shapes for ``cached_image._build_velocity``'s program (after ``params``).

    batch: PackedBatch [branches·requests, context_tokens] (und slots only); query: ImageQuery of
    h·w = (H/16)(W/16) latents; keys: uint32 [requests, 2]; x: float32 [requests, h·w, p²C]; t: float32 [].
    """
    rep = NamedSharding(mesh, P())
    s = lambda shape, dtype: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=rep)  # noqa: E731
    rows = branches * requests
    stride = 8 * model_cfg.latent_patch_size
    budgets = Budgets(
        seq_len=context_tokens,
        und_len=context_tokens,
        max_vit_patches=VIT_PATCHES,
        max_vae_images=1,
        vae_hw=(stride, stride),
        vit_patch_dim=model_cfg.vit.patch_size**2 * 3,
        latent_stride=stride,
    )
    shapes = field_shapes(budgets, rows)
    batch = PackedBatch(**{f: s(*shapes[f]) for f in FIELDS})
    t_len = (image_hw[0] // stride) * (image_hw[1] // stride)
    query = ImageQuery(
        ids=s((rows, 2), np.int32),
        position=s((rows, t_len + 2), np.int32),
        meta=MaskMeta(*(s((rows, t_len + 2), np.int32) for _ in range(4))),
        latent_pos=s((rows, t_len), np.int32),
    )
    feat = model_cfg.latent_patch_size**2 * model_cfg.vae.z_channels
    return batch, query, s((requests, 2), np.uint32), s((requests, t_len, feat), np.float32), s((), np.float32)
