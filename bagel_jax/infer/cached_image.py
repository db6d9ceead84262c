"""Image generation with a KV cache: many requests in one compiled call (the fast path of ``infer/image.py``).

For n requests and ``branches`` contexts each (gen, + cfg_text if text CFG is on, + cfg_img if image CFG is too:
a branch whose scale is 1 is never evaluated), one jitted program

1. VAE-encodes the gen contexts' images (posterior draws from each request's key, ``infer/noise.py``; the cfg_text
   context shares them, as the reference's cache copy does),
2. prefills the ``branches · n`` context rows once (``cache.prefill``; rows branch-major: gen rows first),
3. runs the Euler steps in a ``lax.scan``: each step evaluates only the query image's tokens against the cache —
   all rows when ``cfg_interval[0] < t <= cfg_interval[1]`` (then ``image.guide`` per request), the gen rows
   alone otherwise (``lax.cond``) — and returns the final latents [n, T, p²C].

Shapes are bucketed (``buckets.py``): requests to a power of two (padding repeats the first request), context
budgets to ``round_bucket``; scales, the interval, timesteps and renorm_min are traced, so one program serves a
bucket. Requests of one call share the output size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu
from bagel_jax.attention.mask import MaskMeta
from bagel_jax.infer.buckets import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT_TOKENS, batch_bucket
from bagel_jax.infer.cache import ImageQuery, image_velocity, prefill
from bagel_jax.infer.image import RENORM_TYPES, guidance_branches, guide, sampling_timesteps
from bagel_jax.infer.noise import flow_noise, key_data, place_posterior, posterior_canvas
from bagel_jax.infer.programs import ProgramRunner, shared_program
from bagel_jax.infer.requests import check_image_hw, context_rows, image_query
from bagel_jax.model.bagel import Bagel


def _prefill_contexts(model: Bagel, variables, batch, posterior_keys, posterior, n: int):
    """Encodes the gen rows' images (posterior draws from ``posterior_keys`` unless ``posterior`` is given) and
    prefills every row; rows are branch-major, the first ``n`` are the gen contexts."""
    cfg = model.cfg
    x0 = None
    if cfg.visual_gen and batch.gen_len > 0:
        n_img, canvas = batch.vae_images.shape[1], batch.vae_images.shape[2:4]
        if posterior is None:
            posterior = jax.vmap(lambda k: posterior_canvas(k, n_img, canvas, cfg))(posterior_keys)
        gen_rows = jax.tree.map(lambda a: a[:n], batch)
        x0 = model.apply(variables, gen_rows, posterior_noise=posterior, method=Bagel.encode_latents)
        x0 = jnp.tile(x0, (batch.kind.shape[0] // n, 1, 1, 1))  # cfg_text's images are the gen context's first ones
    return model.apply(variables, batch, x0, method=prefill)


def _build_sampler(model: Bagel):
    cfg = model.cfg

    def run(
        params,
        batch,
        query: ImageQuery,
        keys,
        init_noise,
        posterior,
        ts,
        dts,
        inside,
        scales,
        renorm_min,
        renorm_type: str,
        with_trajectory: bool,
    ):
        variables = {"params": params}
        n = keys.shape[0]
        branches = batch.kind.shape[0] // n
        t_len = query.latent_pos.shape[1]
        split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))  # [n, 2]: (posterior, flow)
        x = init_noise if init_noise is not None else jax.vmap(lambda k: flow_noise(k, t_len, cfg))(split[:, 1])
        cache = _prefill_contexts(model, variables, batch, split[:, 0], posterior, n)
        gen_cache, gen_query = cache.rows(0, n), query.rows(0, n)

        def velocity(c, q, x, t):
            return model.apply(variables, c, q, x, t, method=image_velocity)

        def step(x, xs):
            t, dt, inside_t = xs

            def plain(x):
                return velocity(gen_cache, gen_query, x, t)

            def guided(x):
                v_all = velocity(cache, query, jnp.tile(x, (branches, 1, 1)), t).reshape(branches, *x.shape)
                v_img = v_all[2] if branches == 3 else None
                return jax.vmap(lambda v, vt, vi: guide(v, vt, vi, scales[0], scales[1], renorm_type, renorm_min))(
                    v_all[0], v_all[1], v_img
                )

            v = plain(x) if branches == 1 else jax.lax.cond(inside_t, guided, plain, x)
            x = x - v * dt
            return x, (x if with_trajectory else None)

        x, trajectory = jax.lax.scan(step, x, (ts, dts, inside))
        return x, trajectory

    return xla_cpu.jit(run, static_argnames=("renorm_type", "with_trajectory"))


def _build_velocity(model: Bagel):
    def run(params, batch, query: ImageQuery, keys, x, t):
        n = keys.shape[0]
        split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))
        cache = _prefill_contexts(model, {"params": params}, batch, split[:, 0], None, n)
        x_rows = jnp.tile(x, (batch.kind.shape[0] // n, 1, 1))
        return model.apply({"params": params}, cache, query, x_rows, t, method=image_velocity)

    return xla_cpu.jit(run)


@dataclasses.dataclass
class CachedSampleResult:
    latents: np.ndarray  # float32 [n, T, p²C] final x of each request
    grid_hw: tuple[int, int]  # (H/16, W/16)
    trajectory: np.ndarray | None  # float32 [steps, n, T, p²C] x after each step (with_trajectory)


class CachedImageSampler(ProgramRunner):
    """Batched, KV-cached Euler sampling for one model; programs are shared across instances (``programs.py``)."""

    PROGRAM, build = "cached_image_sampler", staticmethod(_build_sampler)

    def __init__(
        self,
        model: Bagel,
        params,
        tokenizer,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        placement=None,
    ):
        super().__init__(
            model, params, tokenizer, max_batch=max_batch, max_context_tokens=max_context_tokens, placement=placement
        )
        self._velocity = None

    def sample(
        self,
        contexts: Sequence,
        image_hw: tuple[int, int],
        rngs: Sequence,
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        init_noise=None,
        posterior_noise=None,
        with_trajectory: bool = False,
    ) -> CachedSampleResult:
        """Latents of one image per request.

        Args:
          contexts: per request, its ``context.Contexts`` (``gen``, ``cfg_text``, ``cfg_img`` segment lists).
          image_hw: (H, W) pixels of every generated image (multiples of 16).
          rngs: per request, a key or an int seed (``infer/noise.py`` draws its noise from it).
          init_noise: optional float[n, T, p²C] initial latents; posterior_noise: optional, per request a list of
            [h/8, w/8, C] draws for its gen context's images.
        """
        if cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {cfg_renorm_type!r}")
        n = len(contexts)
        rows, query, keys, pad, grid = self._prepare(
            contexts, image_hw, rngs, guidance_branches(cfg_text_scale, cfg_img_scale)
        )
        cfg = self.model.cfg
        t_len, feat = grid[0] * grid[1], cfg.latent_patch_size**2 * cfg.vae.z_channels
        ts, dts = sampling_timesteps(num_timesteps, timestep_shift)
        inside = (cfg_interval[0] < ts) & (ts <= cfg_interval[1])  # as the reference compares (float32 t)
        x_init = None
        if init_noise is not None:
            x_init = np.asarray(init_noise, np.float32).reshape(n, t_len, feat)[pad]
        post = None
        if posterior_noise is not None:
            if len(posterior_noise) != n:
                raise ValueError(f"posterior_noise: expected {n} lists (one per request), got {len(posterior_noise)}")
            post = np.stack(
                [
                    place_posterior(posterior_noise[i], rows.num_vae_images, rows.canvas_hw, cfg.vae.z_channels)
                    for i in pad
                ]
            )
        x, trajectory = self._run(
            self.params,
            rows.batch,
            query,
            keys,
            x_init,
            post,
            ts,
            dts,
            inside,
            np.array([cfg_text_scale, cfg_img_scale], np.float32),
            np.float32(cfg_renorm_min),
            renorm_type=cfg_renorm_type,
            with_trajectory=with_trajectory,
        )
        x = np.asarray(x)[:n]
        trajectory = None if trajectory is None else np.asarray(trajectory)[:, :n]
        return CachedSampleResult(x, grid, trajectory)

    def velocities(
        self, contexts: Sequence, image_hw: tuple[int, int], rngs: Sequence, x, t: float, branches: int = 3
    ) -> np.ndarray:
        """One flow evaluation of every context: float32[branches, n, T, p²C] = f(x, t; gen | cfg_text | cfg_img)
        for x float[n, T, p²C] (the sampler's building block; context images drawn from ``rngs``)."""
        n = len(contexts)
        rows, query, keys, pad, grid = self._prepare(contexts, image_hw, rngs, branches)
        if self._velocity is None:
            self._velocity = shared_program(self.model, "cached_image_velocity", _build_velocity, self.placement.key)
        x = np.asarray(x, np.float32).reshape(n, grid[0] * grid[1], -1)[pad]
        v = self.call(self._velocity, self.params, rows.batch, query, keys, x, np.float32(t))
        return v.reshape(branches, len(pad), *v.shape[1:])[:, :n]

    def _prepare(self, contexts, image_hw, rngs, branches: int):
        """(context rows branch-major, query, key data, request index per padded slot, latent grid)."""
        cfg = self.model.cfg
        check_image_hw(image_hw, cfg)
        n = len(contexts)
        if len(rngs) != n:
            raise ValueError(f"rngs: expected {n} (one per request), got {len(rngs)}")
        nb = batch_bucket(n, self.max_batch)
        pad = list(range(n)) + [0] * (nb - n)  # padding repeats the first request
        stride = 8 * cfg.latent_patch_size
        grid = (image_hw[0] // stride, image_hw[1] // stride)
        fields = ("gen", "cfg_text", "cfg_img")[:branches]
        rows = context_rows(
            [getattr(contexts[i], f) for f in fields for i in pad],
            cfg,
            self.tokenizer,
            extra_tokens=grid[0] * grid[1] + 2,
            max_context_tokens=self.max_context_tokens,
            what="the generated image",
        )
        q = image_query(rows, grid, cfg, self.tokenizer)
        query = ImageQuery(ids=q["ids"], position=q["position"], meta=MaskMeta(**q["meta"]), latent_pos=q["latent_pos"])
        return rows, query, key_data([rngs[i] for i in pad]), pad, grid
