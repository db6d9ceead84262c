"""Text generation with a KV cache: many contexts decoded in one compiled call (the fast path of ``infer/text.py``).

One jitted program prefills the context rows (``cache.prefill``), appends ``M`` empty slots to the cache, then
decodes in a ``lax.while_loop``: step k feeds one token per row (``<|im_start|>`` first, then the last prediction)
at RoPE id ``next_position + k`` and natural index ``num_tokens + k``, writes its K/V into slot ``C + k``, and
picks the next token (greedy argmax, or ``categorical(fold_in(sampling key, k), logits / temperature)``). A row
stops at ``<|im_end|>`` (or any of the given stop tokens; not returned) or after ``max_length`` fed tokens, as the
reference; the loop ends when every row has stopped. No host round trip per token.

``M`` (the cache's generation slots) is ``round_bucket(max_length)``; ``max_length`` and ``temperature`` are
traced, so one program serves a bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu
from bagel_jax.attention.mask import MaskMeta
from bagel_jax.infer.buckets import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT_TOKENS, batch_bucket, round_bucket
from bagel_jax.infer.cache import prefill, text_step
from bagel_jax.infer.noise import key_data, place_posterior, posterior_canvas
from bagel_jax.infer.programs import ProgramRunner
from bagel_jax.infer.requests import context_rows, text_query_meta
from bagel_jax.model.bagel import Bagel


def _build_decoder(model: Bagel):
    cfg = model.cfg

    def run(
        params,
        batch,
        num_tokens,
        next_position,
        keys,
        posterior,
        max_length,
        temperature,
        *,
        slots: int,
        do_sample: bool,
        with_logits: bool,
        bos: int,
        stop_ids: tuple[int, ...],
    ):
        variables = {"params": params}
        b = batch.kind.shape[0]
        split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))  # [B, 2]: (posterior, sampling)
        x0 = None
        if cfg.visual_gen and batch.gen_len > 0:
            n_img, canvas = batch.vae_images.shape[1], batch.vae_images.shape[2:4]
            if posterior is None:
                posterior = jax.vmap(lambda k: posterior_canvas(k, n_img, canvas, cfg))(split[:, 0])
            x0 = model.apply(variables, batch, posterior_noise=posterior, method=Bagel.encode_latents)
        cache = model.apply(variables, batch, x0, method=prefill).with_empty_slots(slots)
        start = batch.kind.shape[1]
        vocab = cfg.vocab_size

        def cond(state):
            step, _, _, _, _, done, _, _ = state
            return (step < max_length) & ~jnp.all(done)

        def body(state):
            step, cache, token, ids, lengths, done, logits_seen, stopped_by = state
            meta = MaskMeta(**text_query_meta(num_tokens, step))
            logits, k, v = model.apply(variables, cache, token, next_position + step, meta, method=text_step)
            if do_sample:
                nxt = jax.vmap(lambda key, lg: jax.random.categorical(jax.random.fold_in(key, step), lg / temperature))(
                    split[:, 1], logits
                ).astype(jnp.int32)
            else:
                nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            hit = jnp.isin(nxt, jnp.asarray(stop_ids, jnp.int32))
            stop = hit | (step + 1 >= max_length)
            keep = ~done & ~stop
            stopped_by = jnp.where(~done & stop, jnp.where(hit, nxt, -1), stopped_by)
            ids = jax.lax.dynamic_update_slice(ids, jnp.where(keep, nxt, 0)[:, None], (0, step))
            lengths = jnp.where(keep, step + 1, lengths)
            if with_logits:
                logits_seen = jax.lax.dynamic_update_slice(logits_seen, logits[:, None], (0, step, 0))
            cache = cache.write(start + step, k, v, meta)
            return step + 1, cache, nxt, ids, lengths, done | stop, logits_seen, stopped_by

        state = (
            jnp.int32(0),
            cache,
            jnp.full((b,), bos, jnp.int32),
            jnp.zeros((b, slots), jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), bool),
            jnp.zeros((b, slots, vocab) if with_logits else (0,), jnp.float32),
            jnp.full((b,), -1, jnp.int32),
        )
        _, _, _, ids, lengths, _, logits_seen, stopped_by = jax.lax.while_loop(cond, body, state)
        return ids, lengths, (logits_seen if with_logits else None), stopped_by

    return xla_cpu.jit(run, static_argnames=("slots", "do_sample", "with_logits", "bos", "stop_ids"))


class CachedTextGenerator(ProgramRunner):
    """Batched, KV-cached decoding for one model; programs are shared across instances (``programs.py``)."""

    PROGRAM, build = "cached_text_decoder", staticmethod(_build_decoder)

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

    def generate(
        self,
        contexts: Sequence[Sequence],
        *,
        max_length: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        rngs: Sequence | None = None,
        with_logits: bool = False,
    ):
        """Per context (a list of segments), the generated ids (without ``<|im_start|>`` / ``<|im_end|>``).

        ``rngs``: per context a key or int seed (posterior draws of context VAE images, sampling); default seed 0.
        With ``with_logits`` returns (ids, per context float32[steps, V] logits of every step).
        """
        ids, _, logits = self.generate_until(
            contexts,
            (self.tokenizer.eos_id,),
            max_length=max_length,
            do_sample=do_sample,
            temperature=temperature,
            rngs=rngs,
            with_logits=with_logits,
        )
        return (ids, logits) if with_logits else ids

    def generate_until(
        self,
        contexts: Sequence[Sequence],
        stop_ids: Sequence[int],
        *,
        max_length: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        rngs: Sequence | None = None,
        with_logits: bool = False,
        posterior_noise: Sequence | None = None,
    ):
        """``generate`` stopping at any token of ``stop_ids``: (ids, per context the stop token that ended it or None
        at the length limit, per context its logits or None). ``posterior_noise``: optional, per context a list of
        [h/8, w/8, C] posterior draws of its VAE images (default: drawn from its key)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if do_sample and rngs is None:
            raise ValueError("do_sample=True needs rngs")
        n = len(contexts)
        rngs = [0] * n if rngs is None else list(rngs)
        if len(rngs) != n:
            raise ValueError(f"rngs: expected {n} (one per context), got {len(rngs)}")
        nb = batch_bucket(n, self.max_batch)
        pad = list(range(n)) + [0] * (nb - n)
        rows = context_rows(
            [contexts[i] for i in pad],
            self.model.cfg,
            self.tokenizer,
            extra_tokens=max_length,
            max_context_tokens=self.max_context_tokens,
            what=f"max_length={max_length} generated",
        )
        tok = self.tokenizer
        post = None
        if posterior_noise is not None:
            if len(posterior_noise) != n:
                raise ValueError(f"posterior_noise: expected {n} lists (one per context), got {len(posterior_noise)}")
            z = self.model.cfg.vae.z_channels
            post = np.stack([place_posterior(posterior_noise[i], rows.num_vae_images, rows.canvas_hw, z) for i in pad])
        ids, lengths, logits, stopped_by = self._run(
            self.params,
            rows.batch,
            rows.num_tokens,
            rows.next_position,
            key_data([rngs[i] for i in pad]),
            post,
            np.int32(max_length),
            np.float32(temperature),
            slots=round_bucket(max_length),
            do_sample=do_sample,
            with_logits=with_logits,
            bos=tok.bos_id,
            stop_ids=tuple(sorted({int(t) for t in stop_ids})),
        )
        ids, lengths, stopped_by = np.asarray(ids), np.asarray(lengths), np.asarray(stopped_by)
        out = [ids[i, : lengths[i]].tolist() for i in range(n)]
        stops = [None if stopped_by[i] < 0 else int(stopped_by[i]) for i in range(n)]
        if not with_logits:
            return out, stops, None
        logits = np.asarray(logits)
        steps = [min(max_length, lengths[i] + 1) for i in range(n)]
        return out, stops, [logits[i, : steps[i]] for i in range(n)]
