"""Seeded noise of an image request, drawn so that it does not depend on batching, padding or canvas size.

A request's key is split into (posterior key, flow key), as ``jax.random.split(rng)``:

* flow noise (the initial x of the Euler sampler) = the first T rows of ``normal(flow_key, [M², p²C])``
  (M = ``model.max_latent_size``: the largest latent grid), T = the image's latent tokens in row-major order;
* posterior draw of context image k (the edit source's VAE sample) = the top-left [h/8, w/8] corner of
  ``normal(fold_in(posterior_key, k), [M·p, M·p, C])`` (p = ``latent_patch_size``).

So the same key gives the same image alone or in a batch, on the cache-free and the cached path alike. Both
draws can instead be passed explicitly (``init_noise`` / ``posterior_noise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def noise_tables(model_cfg) -> tuple[int, int, int]:
    """(M² latent tokens, latent side M·p of the VAE posterior, p²C token features) for ``model_cfg``."""
    m, p, c = model_cfg.max_latent_size, model_cfg.latent_patch_size, model_cfg.vae.z_channels
    return m * m, m * p, p * p * c


def flow_noise(key, num_tokens: int, model_cfg):
    """float32 [T, p²C]: the initial latent tokens of one image of ``num_tokens`` tokens."""
    table, _, feat = noise_tables(model_cfg)
    return jax.random.normal(key, (table, feat), jnp.float32)[:num_tokens]


def posterior_canvas(key, num_images: int, canvas_hw: tuple[int, int], model_cfg):
    """float32 [N, H/8, W/8, C]: the posterior draws of a request's N context images on a VAE canvas (H, W)."""
    _, side, _ = noise_tables(model_cfg)
    h8, w8 = canvas_hw[0] // 8, canvas_hw[1] // 8
    c = model_cfg.vae.z_channels

    def one(k):
        return jax.random.normal(jax.random.fold_in(key, k), (side, side, c), jnp.float32)[:h8, :w8]

    return jax.vmap(one)(jnp.arange(num_images))


def place_posterior(draws: Sequence[np.ndarray], num_images: int, canvas_hw: tuple[int, int], z_channels: int):
    """Explicit per-image posterior draws (each [h/8, w/8, C], context image order) on the canvas [N, H/8, W/8, C]."""
    out = np.zeros((num_images, canvas_hw[0] // 8, canvas_hw[1] // 8, z_channels), np.float32)
    if len(draws) > num_images:
        raise ValueError(f"posterior_noise: {len(draws)} draws for {num_images} context images")
    for k, d in enumerate(draws):
        d = np.asarray(d, np.float32)
        if d.ndim != 3 or d.shape[0] > out.shape[1] or d.shape[1] > out.shape[2] or d.shape[2] != z_channels:
            raise ValueError(
                f"posterior_noise[{k}]: expected [h/8, w/8, {z_channels}] within the canvas "
                f"{out.shape[1:]}, got {d.shape}"
            )
        out[k, : d.shape[0], : d.shape[1]] = d
    return out


def key_data(rngs) -> np.ndarray:
    """uint32 key data [n, ...] of a list of keys (typed or raw) or ints (seeds → ``jax.random.key(seed)``)."""
    out = []
    for r in rngs:
        if isinstance(r, (int, np.integer)):
            r = jax.random.key(int(r))
        if jnp.issubdtype(jnp.asarray(r).dtype, jax.dtypes.prng_key):
            r = jax.random.key_data(r)
        out.append(np.asarray(r, np.uint32))
    return np.stack(out)
