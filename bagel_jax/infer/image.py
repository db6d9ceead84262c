"""Image generation: Euler integration of the flow with text/image CFG, without a KV cache
(reference ``Bagel.generate_image`` / ``_forward_flow``, bagel.md §8.3).

::

    ts = linspace(1, 0, num_timesteps);  ts = s·ts / (1 + (s − 1)·ts)          (s = timestep_shift)
    for i < num_timesteps − 1:  t = ts[i], dt = ts[i] − ts[i+1]
        v   = f(x, t; gen context)
        if cfg_interval[0] < t ≤ cfg_interval[1]: scales (s_t, s_i) = (cfg_text_scale, cfg_img_scale) else (1, 1)
        v_t = f(x, t; cfg_text context) if s_t > 1;  v_i = f(x, t; cfg_img context) if s_i > 1
        v   = cfg_combine(v, v_t, v_i, s_t, s_i, renorm)
        x   = x − v·dt                                   (velocity points from data to noise)

``f`` runs the whole context + the query image every call (no cache). The three contexts are three
rows of one ``PackedBatch``, evaluated together by one jitted forward; the query image's latent
tokens and time enter through ``Bagel(xt=...)``. Context images are VAE-encoded once (one posterior
draw, shared by the gen and cfg_text contexts, as the reference's cache copy shares it). The initial noise and
the posterior draw come from ``rng`` as ``infer/noise.py`` defines them (the cached path draws the same), or are
given explicitly.

This is the cache-free oracle; ``infer/cached_image.py`` is the fast path tested against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu
from bagel_jax.infer.context import Rows, layout_for, pack_rows, query_image, vae_canvas
from bagel_jax.infer.noise import flow_noise, place_posterior, posterior_canvas
from bagel_jax.model.bagel import Bagel, shift_timestep
from bagel_jax.model.vae import FluxVAE, denormalize_latent, unpatchify_latent

RENORM_TYPES = ("global", "channel", "text_channel")


def sampling_timesteps(num_timesteps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_i, dt_i) for the num_timesteps − 1 Euler steps, float32 like the reference's torch tensors."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    ts = np.linspace(1.0, 0.0, num_timesteps).astype(np.float32)
    ts = shift_timestep(ts, np.float32(shift)).astype(np.float32)
    return ts[:-1], (ts[:-1] - ts[1:]).astype(np.float32)


def cfg_combine(
    v,
    v_text=None,
    v_img=None,
    *,
    cfg_text_scale: float = 1.0,
    cfg_img_scale: float = 1.0,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
):
    """The reference's CFG combination of velocities [T, C] (one image; 'global' norms over all of it).

    No text CFG (``cfg_text_scale <= 1``) → ``v`` unchanged, even if ``cfg_img_scale > 1``.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    if cfg_text_scale <= 1.0:
        return v
    return guide(
        v, v_text, v_img if cfg_img_scale > 1.0 else None, cfg_text_scale, cfg_img_scale, renorm_type, renorm_min
    )


def guide(v, v_text, v_img, text_scale, img_scale, renorm_type: str, renorm_min):
    """``cfg_combine`` with text CFG on, image CFG on iff ``v_img`` is given; the scales may be traced.

    v, v_text, v_img: [T, C] velocities of the gen, cfg_text and cfg_img contexts (one image).
    """
    xp = jnp if isinstance(v, jax.Array) else np
    vt_ = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        norm_v = xp.linalg.norm(v, axis=-1, keepdims=True)
        norm_vt = xp.linalg.norm(vt_, axis=-1, keepdims=True)
        vt = vt_ * xp.clip(norm_v / (norm_vt + 1e-8), renorm_min, 1.0)
        return v_img + img_scale * (vt - v_img) if v_img is not None else vt
    v_ = v_img + img_scale * (vt_ - v_img) if v_img is not None else vt_
    if renorm_type == "global":
        norm_v, norm_v_ = xp.linalg.norm(v), xp.linalg.norm(v_)
    else:
        norm_v, norm_v_ = xp.linalg.norm(v, axis=-1, keepdims=True), xp.linalg.norm(v_, axis=-1, keepdims=True)
    return v_ * xp.clip(norm_v / (norm_v_ + 1e-8), renorm_min, 1.0)


def guidance_branches(cfg_text_scale: float, cfg_img_scale: float) -> int:
    """How many contexts the sampler evaluates: gen, + cfg_text if text CFG is on, + cfg_img if image CFG is too
    (the reference skips a branch whose scale is 1; image CFG without text CFG changes nothing)."""
    if cfg_text_scale <= 1.0:
        return 1
    return 3 if cfg_img_scale > 1.0 else 2


@dataclasses.dataclass
class SampleResult:
    latents: np.ndarray  # float32 [T, p²C] final x (t = 0), row-major tokens of the (h, w) latent grid
    grid_hw: tuple[int, int]  # (H/16, W/16)
    trajectory: list  # x after each step (float32 [T, p²C])
    context_latents: np.ndarray | None  # x0 used for context images, [N, T_canvas, p²C] (row 0's images)
    rows: Rows


class ImageSampler:
    """Jitted pieces for one model; ``sample`` can be called many times (one compile per row shape)."""

    def __init__(self, model: Bagel, params, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer

        def velocity(params, batch, x0, xt, t):
            out = model.apply({"params": params}, batch, x0=x0, xt=(xt, t), with_ce=False)
            return out["velocity_pred"]

        def encode(params, batch, posterior):
            return model.apply({"params": params}, batch, posterior_noise=posterior, method=Bagel.encode_latents)

        self._velocity = jax.jit(velocity)
        self._encode = xla_cpu.jit(encode)

    def rows(self, contexts: Sequence[Sequence], image_hw: tuple[int, int]) -> Rows:
        """One row per context, each followed by the query image of size ``image_hw``."""
        segs = [list(c) + [query_image(image_hw)] for c in contexts]
        cfg = self.model.cfg
        layout = layout_for(cfg, self.tokenizer, vae_canvas(segs, 8 * cfg.latent_patch_size))
        return pack_rows(segs, layout)

    def sample(
        self,
        gen: Sequence,
        cfg_text: Sequence,
        cfg_img: Sequence,
        image_hw: tuple[int, int],
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        rng=None,
        init_noise: np.ndarray | None = None,
        posterior_noise=None,
    ) -> SampleResult:
        """Generates the latents of one image after the context ``gen``.

        ``init_noise`` float[(H/16)(W/16), p²C] and ``posterior_noise`` (one [h/8, w/8, C] draw per context image
        of ``gen``) default to draws from ``rng`` (``infer/noise.py``).
        """
        if cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {cfg_renorm_type!r}")
        use_cfg = cfg_text_scale > 1.0 or cfg_img_scale > 1.0
        rng = jax.random.key(0) if rng is None else rng
        rng_post, rng_noise = jax.random.split(rng)
        ev = self._evaluator([gen, cfg_text, cfg_img] if use_cfg else [gen], image_hw, rng_post, posterior_noise)
        n_tok, feat = ev.slots.shape[1], self.model.cfg.latent_patch_size**2 * self.model.cfg.vae.z_channels
        x = (
            np.asarray(flow_noise(rng_noise, n_tok, self.model.cfg))
            if init_noise is None
            else np.asarray(init_noise, np.float32).reshape(n_tok, feat)
        )
        ts, dts = sampling_timesteps(num_timesteps, timestep_shift)
        trajectory = []
        for t, dt in zip(ts, dts):
            v_all = ev(x, t)
            inside = cfg_interval[0] < t <= cfg_interval[1]
            s_text, s_img = (cfg_text_scale, cfg_img_scale) if inside else (1.0, 1.0)
            v = cfg_combine(
                v_all[0],
                v_all[1] if use_cfg else None,
                v_all[2] if use_cfg else None,
                cfg_text_scale=s_text,
                cfg_img_scale=s_img,
                renorm_type=cfg_renorm_type,
                renorm_min=cfg_renorm_min,
            )
            x = (x - v * dt).astype(np.float32)
            trajectory.append(x)
        return SampleResult(x, ev.grid, trajectory, np.asarray(ev.x0[0]), ev.rows)

    def velocities(
        self, contexts: Sequence[Sequence], image_hw: tuple[int, int], x, t: float, rng=None, posterior_noise=None
    ) -> np.ndarray:
        """One flow evaluation per context: float32[len(contexts), T, p²C] = f(x, t; context) for x float[T, p²C]
        (contexts: gen first; the others share its image draws)."""
        rng_post, _ = jax.random.split(jax.random.key(0) if rng is None else rng)
        return self._evaluator(contexts, image_hw, rng_post, posterior_noise)(np.asarray(x, np.float32), t)

    def _evaluator(self, contexts, image_hw, rng_post, posterior_noise) -> _Evaluator:
        cfg = self.model.cfg
        stride = 8 * cfg.latent_patch_size
        hgt, wid = image_hw
        if hgt % stride or wid % stride:
            raise ValueError(f"image size {image_hw} must be a multiple of {stride}")
        rows = self.rows(contexts, image_hw)
        grid = (hgt // stride, wid // stride)
        batch = jax.tree.map(jnp.asarray, rows.batch)
        b = batch.kind.shape[0]
        n_img, canvas = rows.budgets.max_vae_images, rows.budgets.vae_hw
        post = (
            posterior_canvas(rng_post, n_img, canvas, cfg)
            if posterior_noise is None
            else place_posterior(posterior_noise, n_img, canvas, cfg.vae.z_channels)
        )
        x0 = self._encode(self.params, jax.tree.map(lambda a: a[:1], batch), jnp.asarray(post)[None])  # gen row
        x0 = jnp.broadcast_to(x0, (b,) + x0.shape[1:])  # cfg_text's images are gen's first images; cfg_img has none
        slots = np.stack([rows.noised_slots(r) for r in range(b)])  # [B, T]
        if slots.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"query image has {slots.shape[1]} latent tokens, expected {grid[0] * grid[1]}")
        return _Evaluator(self, rows, batch, x0, slots, grid)


@dataclasses.dataclass
class _Evaluator:
    """f(x, t) on every row of ``batch`` (contexts + query image), recomputing the whole row: [B, T, p²C]."""

    sampler: ImageSampler
    rows: Rows
    batch: object
    x0: object
    slots: np.ndarray
    grid: tuple[int, int]

    def __call__(self, x, t) -> np.ndarray:
        b, g = self.batch.kind.shape[0], self.rows.budgets.gen_len
        xt = np.zeros((b, g, x.shape[-1]), np.float32)
        xt[np.arange(b)[:, None], self.slots] = x[None]
        tt = np.full((b, g), t, np.float32)
        s = self.sampler
        v_all = np.asarray(s._velocity(s.params, self.batch, self.x0, jnp.asarray(xt), jnp.asarray(tt)))
        return v_all[np.arange(b)[:, None], self.slots]  # [B, T, C]


_DECODERS: dict = {}


def _decoder(vae_cfg, patch: int, placement_key: tuple = ()):
    """The jitted VAE decode for one VAE config (and placement), shared by every caller (compiled once per batch
    shape)."""
    key = (vae_cfg.to_json_best_effort(sort_keys=True), patch, placement_key)
    if key not in _DECODERS:
        vae = FluxVAE(vae_cfg)

        def run(params, tokens, grid_hw):
            z = unpatchify_latent(tokens, grid_hw[0], grid_hw[1], patch)
            return vae.apply({"params": params}, denormalize_latent(z, vae_cfg), method="decode")

        _DECODERS[key] = xla_cpu.jit(run, static_argnames="grid_hw")
    return _DECODERS[key]


def decode_latents_batch(
    vae_cfg, vae_params, latents, grid_hw: tuple[int, int], patch: int = 2, placement=None
) -> np.ndarray:
    """Latent tokens [B, h·w, p²C] → RGB uint8 [B, 16h, 16w, 3] (reference ``decode_image``: VAE decode of the
    de-normalised latent, ``(img·0.5 + 0.5).clamp(0, 1)·255`` truncated to uint8). ``placement``: run on its mesh
    (``infer/placement.py``; ``vae_params`` placed there), every process alike."""
    run = _decoder(vae_cfg, patch, () if placement is None else placement.key)
    hw = tuple(int(v) for v in grid_hw)
    if placement is None:
        img = np.asarray(run(vae_params, jnp.asarray(latents, jnp.float32), hw), np.float32)
    else:
        with placement.context():
            out = run(*placement.put((vae_params, np.asarray(latents, np.float32))), hw)
            img = placement.fetch(out).astype(np.float32)
    return (np.clip(img * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_latents(vae_cfg, vae_params, latents: np.ndarray, grid_hw: tuple[int, int], patch: int = 2) -> np.ndarray:
    """One image: latent tokens [h·w, p²C] → RGB uint8 [16h, 16w, 3] (``decode_latents_batch``)."""
    return decode_latents_batch(vae_cfg, vae_params, np.asarray(latents)[None], grid_hw, patch)[0]
