"""Text generation without a KV cache (reference ``Bagel.generate_text``, bagel.md §8.2).

Starts from ``<|im_start|>`` at the context's next RoPE id and appends one token per step, greedy
(argmax) or sampled from ``softmax(logits / temperature)``; stops when the next token is
``<|im_end|>`` (not returned) or after ``max_length`` fed tokens (``<|im_start|>`` included), as the
reference. Every step re-runs the whole row (context + tokens so far) at fixed static shapes, so it
compiles once.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bagel_jax.infer.context import layout_for, pack_rows, query_text, vae_canvas
from bagel_jax.model.bagel import Bagel


class TextGenerator:
    """Holds the jitted step for one model; ``generate`` can be called many times (one compile per shape)."""

    def __init__(self, model: Bagel, params, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        cfg = model.cfg

        def step(params, batch, x0, slot):
            out = model.apply({"params": params}, batch, x0=x0, with_ce=False)
            h = jnp.take_along_axis(out["und_hidden"], slot[:, None, None], axis=1)  # [B, 1, D]
            return model.apply({"params": params}, h, method=Bagel.text_logits)[:, 0].astype(jnp.float32)

        def encode(params, batch, rng):
            return model.apply({"params": params}, batch, rng, method=Bagel.encode_latents)

        self._step = jax.jit(step)
        self._encode = jax.jit(encode)
        self._visual_gen = cfg.visual_gen

    def generate(self, segments: Sequence, *, max_length: int = 512, do_sample: bool = False,
                 temperature: float = 1.0, rng=None) -> list[int]:
        """Token ids generated after the context ``segments`` (without ``<|im_start|>`` / ``<|im_end|>``)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if do_sample and rng is None:
            raise ValueError("do_sample=True needs an rng")
        model_cfg = self.model.cfg
        layout = layout_for(model_cfg, self.tokenizer, vae_canvas([segments], layout_stride(model_cfg)))
        # static budgets: the longest row this call can build (query = <|im_start|> + max_length-1 tokens + <|im_end|>)
        longest = pack_rows([list(segments) + [query_text([0] * (max_length - 1))]], layout)
        b = longest.budgets
        x0 = None
        if self._visual_gen and b.gen_len > 0:
            x0 = self._encode(self.params, _device(longest.batch), jax.random.key(0) if rng is None else rng)
        generated: list[int] = []
        eos = self.tokenizer.eos_id
        keys = iter(jax.random.split(rng, max_length)) if do_sample else None
        while True:
            rows = pack_rows([list(segments) + [query_text(generated)]], layout, und_len=b.und_len,
                             gen_len=b.gen_len, max_vit_patches=b.max_vit_patches, max_vae_images=b.max_vae_images)
            doc = rows.docs[0]
            slot = rows.und_slot(0, doc.num_tokens - 2)  # the last fed token (<|im_start|> or t_k)
            logits = self._step(self.params, _device(rows.batch), x0, jnp.asarray([slot], jnp.int32))[0]
            if do_sample:
                nxt = int(jax.random.categorical(next(keys), logits / temperature))
            else:
                nxt = int(jnp.argmax(logits))
            # reference: stop at <|im_end|>; after max_length fed tokens the last prediction is dropped
            if nxt == eos or 1 + len(generated) >= max_length:
                break
            generated.append(nxt)
        return generated


def layout_stride(model_cfg) -> int:
    return 8 * model_cfg.latent_patch_size


def _device(batch):
    return jax.tree.map(jnp.asarray, batch)

