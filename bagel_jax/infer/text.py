"""Text generation without a KV cache (reference ``Bagel.generate_text``, bagel.md §8.2).

Starts from ``<|im_start|>`` at the context's next RoPE id and appends one token per step, greedy
(argmax) or sampled from ``softmax(logits / temperature)``; stops when the next token is
``<|im_end|>`` (or another stop token; not returned) or after ``max_length`` fed tokens (``<|im_start|>``
included), as the reference. Every step re-runs the whole row (context + tokens so far) at fixed static shapes, so it
compiles once. Randomness: ``rng`` splits into (posterior key of context VAE images, ``infer/noise.py``; sampling
key, token k drawn with ``fold_in(sampling key, k)``), as on the cached path.

This is the cache-free oracle; ``infer/cached_text.py`` is the fast path tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu
from bagel_jax.infer.context import layout_for, pack_rows, query_text, vae_canvas
from bagel_jax.infer.noise import place_posterior, posterior_canvas
from bagel_jax.model.bagel import Bagel


class TextGenerator:
    """Holds the jitted step for one model; ``generate`` can be called many times (one compile per shape)."""

    def __init__(self, model: Bagel, params, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        cfg = model.cfg

        def step(params, batch, x0, slot):
            # the row has no noised image: the key draws flow noise that nothing uses
            out = model.apply({"params": params}, batch, jax.random.key(0), x0=x0, with_ce=False)
            h = jnp.take_along_axis(out["und_hidden"], slot[:, None, None], axis=1)  # [B, 1, D]
            return model.apply({"params": params}, h, method=Bagel.text_logits)[:, 0].astype(jnp.float32)

        def encode(params, batch, posterior):
            return model.apply({"params": params}, batch, posterior_noise=posterior, method=Bagel.encode_latents)

        self._step = jax.jit(step)
        self._encode = xla_cpu.jit(encode)
        self._visual_gen = cfg.visual_gen

    def generate(
        self, segments: Sequence, *, max_length: int = 512, do_sample: bool = False, temperature: float = 1.0, rng=None
    ) -> list[int]:
        """Token ids generated after the context ``segments`` (without ``<|im_start|>`` / ``<|im_end|>``)."""
        return self.trace(segments, max_length=max_length, do_sample=do_sample, temperature=temperature, rng=rng)[0]

    def trace(
        self, segments: Sequence, *, max_length: int = 512, do_sample: bool = False, temperature: float = 1.0, rng=None
    ) -> tuple[list[int], list[np.ndarray]]:
        """(generated ids, the logits float32[V] of every step)."""
        kw = dict(max_length=max_length, do_sample=do_sample, temperature=temperature, rng=rng)
        ids, _, logits = self.generate_until(segments, (self.tokenizer.eos_id,), **kw)
        return ids, logits

    def generate_until(
        self,
        segments: Sequence,
        stop_ids: Sequence[int],
        *,
        max_length: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        rng=None,
        posterior_noise: Sequence | None = None,
    ) -> tuple[list[int], int | None, list[np.ndarray]]:
        """Decodes until a token of ``stop_ids`` (not returned) or the length limit: (generated ids, the stop token
        or None at the length limit, the logits float32[V] of every step). ``posterior_noise``: optional [h/8, w/8,
        C] draws of the context's VAE images (default: drawn from ``rng``)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if do_sample and rng is None:
            raise ValueError("do_sample=True needs an rng")
        model_cfg = self.model.cfg
        layout = layout_for(model_cfg, self.tokenizer, vae_canvas([segments], layout_stride(model_cfg)))
        # static budgets: the longest row this call can build (query = <|im_start|> + max_length-1 tokens + <|im_end|>)
        longest = pack_rows([list(segments) + [query_text([0] * (max_length - 1))]], layout)
        b = longest.budgets
        rng_post, rng_sample = jax.random.split(jax.random.key(0) if rng is None else rng)
        x0 = None
        if self._visual_gen and b.gen_len > 0:
            if posterior_noise is None:
                post = posterior_canvas(rng_post, b.max_vae_images, b.vae_hw, model_cfg)[None]
            else:
                post = place_posterior(posterior_noise, b.max_vae_images, b.vae_hw, model_cfg.vae.z_channels)[None]
            x0 = self._encode(self.params, _device(longest.batch), post)
        generated: list[int] = []
        all_logits: list[np.ndarray] = []
        stops = {int(t) for t in stop_ids}
        while True:
            rows = pack_rows(
                [list(segments) + [query_text(generated)]],
                layout,
                und_len=b.und_len,
                gen_len=b.gen_len,
                max_vit_patches=b.max_vit_patches,
                max_vae_images=b.max_vae_images,
            )
            doc = rows.docs[0]
            slot = rows.und_slot(0, doc.num_tokens - 2)  # the last fed token (<|im_start|> or t_k)
            logits = self._step(self.params, _device(rows.batch), x0, jnp.asarray([slot], jnp.int32))[0]
            all_logits.append(np.asarray(logits))
            if do_sample:
                key = jax.random.fold_in(rng_sample, len(generated))
                nxt = int(jax.random.categorical(key, logits / temperature))
            else:
                nxt = int(jnp.argmax(logits))
            # reference: stop at <|im_end|>; after max_length fed tokens the last prediction is dropped
            if nxt in stops:
                return generated, nxt, all_logits
            if 1 + len(generated) >= max_length:
                return generated, None, all_logits
            generated.append(nxt)


def layout_stride(model_cfg) -> int:
    return 8 * model_cfg.latent_patch_size


def _device(batch):
    return jax.tree.map(jnp.asarray, batch)
