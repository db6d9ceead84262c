"""Inference speed on CPU, today's cache-free path next to the KV-cached batched one, in one run.

Model: configs/tiny_repro.py shapes (4 MoT layers, hidden 128, ViT 3 × 64, the tiny VAE), random params, f32; a
SentencePiece tokenizer trained on the shapes corpus (vocab 512). 50 Euler steps, the Inferencer's defaults
(t2i: cfg_text 4, cfg_img 1, interval (0.4, 1]; edit: cfg_text 4, cfg_img 2, interval (0, 1], text_channel).

Columns:
* ``today``: the cache-free oracle as it ran before the cache (``infer/image.py`` ``ImageSampler`` /
  ``infer/text.py`` ``TextGenerator``, with the config's attention: block-sparse on CPU): one request at a time,
  every Euler step recomputes the whole context for all three CFG rows (the cfg_img row too when its scale is 1,
  and outside ``cfg_interval``), one host round trip per step and per token, and the VAE decode built as a new
  ``jax.jit`` per image (as ``decode_latents`` was). It is slow, so it runs on the first ``--baseline_images`` /
  ``--baseline_edits`` requests only; its rate is per request, so it extrapolates.
* ``cached``: ``Inferencer(cached=True)``: every request of the set in ``max_batch`` (64) pieces, prefill once,
  Euler steps on the query tokens only in a ``lax.scan`` (dense attention against the cache), CFG branches as a
  batch axis (skipping scale-1 branches and steps outside the interval), greedy decoding in a ``lax.while_loop``,
  VAE decode compiled once per bucket. ``cold`` includes compiling; ``warm`` is a second identical call (programs
  compiled).

``compiles``: XLA backend compilations during that measurement (jax's ``backend_compile_duration`` events).
Rows: shapes-GenEval-style prompts × 4 images (seeds per image) at 48 px; shapes-edit-style edits of a 48 px
source; greedy text after a 512-token context (``--new_tokens`` generated tokens; tokens/s). Rates are
requests (images) per second, tokens per second for text.

    python benchmarks/inference.py [--prompts 64] [--images_per_prompt 4] [--steps 50] [--edits 64]

Measured with the defaults (``python benchmarks/inference.py``; 2 CPU cores shared with other jobs, load ≈ 5,
jax 0.10.2; the today column ran on the first 8 images / 4 edits and extrapolates per request; both paths'
images agree within 1/255 and the greedy ids are identical — the script checks both):

| task | today | cached cold | cached warm | ratio cold | ratio warm | compiles today / cold / warm | unit |
|---|---|---|---|---|---|---|---|
| GenEval-style t2i, 64 prompts × 4 images | 0.467 | 17.6 | 35.1 | 37.6× | 75.1× | 36 / 2 / 0 | images/s |
| edit, 64 edits | 0.342 | 7.27 | 26.5 | 21.3× | 77.4× | 27 / 1 / 0 | images/s |
| edit, 1 edit alone (latency) | 0.342 | 0.165 | 13.7 | 0.5× | 40.0× | 27 / 2 / 0 | images/s |
| greedy text, 512-token context, 64 tokens | 14.0 | 33.0 | 840 | 2.4× | 59.9× | 9 / 1 / 0 | tokens/s |

Cold = the first call of a process (compiling the bucket's program, ~2–9 s here); a second call of the same bucket
(another prompt set, another Inferencer on the same model, the trainer's next eval) runs warm. Today's compiles
grow with the number of images (a new VAE decode jit per image: 36 for 8 images); the cached path compiles one
sampler and one decode program per bucket (the edit row's decode reused the t2i row's: same size and batch bucket).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import jax
import jax.monitoring as monitoring
import numpy as np
from flax.core import meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bagel_jax.data.builders import synthetic_shapes  # noqa: E402
from bagel_jax.data.tokenizer import train_sentencepiece  # noqa: E402
from bagel_jax.eval.edit import ShapesEdit  # noqa: E402
from bagel_jax.eval.geneval import ShapesGenEval  # noqa: E402
from bagel_jax.infer.api import EDIT_DEFAULTS, T2I_DEFAULTS, Inferencer  # noqa: E402
from bagel_jax.infer.context import interleave_contexts  # noqa: E402
from bagel_jax.infer.image import ImageSampler  # noqa: E402
from bagel_jax.launch_utils import load_config  # noqa: E402
from bagel_jax.model.bagel import init_bagel  # noqa: E402
from bagel_jax.model.vae import FluxVAE, denormalize_latent, unpatchify_latent  # noqa: E402

COMPILES = collections.Counter()
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: COMPILES.update([1]) if name == "/jax/core/compile/backend_compile_duration" else None
)


def measure(fn):
    """(result, seconds, compilations) of ``fn()``."""
    before = COMPILES[1]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, COMPILES[1] - before


def decode_per_call(vae_cfg, vae_params, latents, grid_hw, patch=2):
    """The VAE decode as it was before the cache: a new ``jax.jit`` on every call."""
    vae = FluxVAE(vae_cfg)

    @jax.jit
    def run(params, tokens):
        z = unpatchify_latent(tokens[None], grid_hw[0], grid_hw[1], patch)
        return vae.apply({"params": params}, denormalize_latent(z, vae_cfg), method="decode")[0]

    img = np.asarray(run(vae_params, jax.numpy.asarray(latents, jax.numpy.float32)), np.float32)
    return (np.clip(img * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def today_images(inf: Inferencer, items_list, seeds, hw, defaults, steps):
    """One image per request on the cache-free path, decoded with a fresh jit each (the code before the cache)."""
    cfg = inf.model.cfg
    sampler = ImageSampler(inf.model, inf.params, inf.tokenizer)
    out = []
    for items, seed in zip(items_list, seeds):
        ctx = interleave_contexts(items, inf.pre)
        res = sampler.sample(
            ctx.gen,
            ctx.cfg_text,
            ctx.cfg_img,
            hw or ctx.image_hw,
            num_timesteps=steps,
            rng=jax.random.key(seed),
            **defaults,
        )
        out.append(decode_per_call(cfg.vae, inf.params["vae"], res.latents, res.grid_hw, cfg.latent_patch_size))
    return out


def check_same(what: str, today, cached) -> None:
    """The two paths draw the same noise from the same seeds: their images agree (uint8, up to rounding)."""
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(today, cached))
    if worst > 1:
        raise AssertionError(f"{what}: cached images differ from today's by up to {worst}/255")


def long_context(tokenizer, n_tokens: int) -> str:
    """A text of about ``n_tokens`` tokens (the shapes corpus, repeated)."""
    words, text = synthetic_shapes.corpus(), ""
    i = 0
    while len(tokenizer.encode(text)) < n_tokens - 2:
        text += " " + words[i % len(words)]
        i += 1
    ids = tokenizer.encode(text)[: n_tokens - 2]  # + <|im_start|> / <|im_end|> = n_tokens
    return tokenizer.decode(ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--edits", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--baseline_images", type=int, default=8)
    p.add_argument("--baseline_edits", type=int, default=4)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    args = p.parse_args(argv)

    config = load_config(os.path.join(ROOT, "configs", "tiny_repro.py"))
    model, variables = init_bagel(config, jax.random.key(0))
    params = jax.device_get(meta.unbox(variables["params"]))
    tok = train_sentencepiece(
        synthetic_shapes.corpus(), os.path.join(tempfile.mkdtemp(), "tok.model"), vocab_size=config.model.vocab_size
    )
    today = Inferencer(model, params, tok, config.data, cached=False)
    cached = Inferencer(model, params, tok, config.data, cached=True, max_batch=64)
    rows = []

    # --- shapes-GenEval-style: prompts × images, each image its own seed ---
    gen = ShapesGenEval(num_examples=-(-args.prompts // 6), samples_per_prompt=args.images_per_prompt, square=True)
    samples = gen.samples[: args.prompts * args.images_per_prompt]
    prompts, seeds = [e.prompt for e, _ in samples], [s for _, s in samples]
    side = cached.vae_rule.max_size
    nb = args.baseline_images
    imgs_today, t_today, c_today = measure(
        lambda: today_images(today, [[q] for q in prompts[:nb]], seeds[:nb], (side, side), T2I_DEFAULTS, args.steps)
    )
    imgs_cold, t_cold, c_cold = measure(lambda: cached.generate_batch(prompts, seeds, num_timesteps=args.steps))
    imgs_warm, t_warm, c_warm = measure(lambda: cached.generate_batch(prompts, seeds, num_timesteps=args.steps))
    assert all(np.array_equal(a, b) for a, b in zip(imgs_cold, imgs_warm))
    check_same("t2i", imgs_today, imgs_cold)
    rows.append(
        (
            f"GenEval-style t2i, {len(prompts) // args.images_per_prompt} prompts × {args.images_per_prompt} "
            f"images (today: first {nb})",
            nb / t_today,
            len(prompts) / t_cold,
            len(prompts) / t_warm,
            c_today,
            c_cold,
            c_warm,
            "images/s",
        )
    )

    # --- shapes-edit-style: a source image and an instruction, 50 steps ---
    edits = ShapesEdit(num_examples=args.edits, square=True)
    sources = [e.render() for e in edits.examples]
    instructions = [e.instruction for e in edits.examples]
    ne = args.baseline_edits
    edits_today, t_today, c_today = measure(
        lambda: today_images(
            today,
            [[s, q] for s, q in zip(sources[:ne], instructions)],
            edits.seeds[:ne],
            None,
            EDIT_DEFAULTS,
            args.steps,
        )
    )
    edits_cold, t_cold, c_cold = measure(
        lambda: cached.edit_batch(sources, instructions, edits.seeds, num_timesteps=args.steps)
    )
    check_same("edit", edits_today, edits_cold)
    _, t_warm, c_warm = measure(lambda: cached.edit_batch(sources, instructions, edits.seeds, num_timesteps=args.steps))
    rows.append(
        (
            f"edit, {args.edits} edits (today: first {ne})",
            ne / t_today,
            args.edits / t_cold,
            args.edits / t_warm,
            c_today,
            c_cold,
            c_warm,
            "images/s",
        )
    )
    _, t_one, c_one = measure(
        lambda: cached.edit_batch(sources[:1], instructions[:1], edits.seeds[:1], num_timesteps=args.steps)
    )
    _, t_one_w, c_one_w = measure(
        lambda: cached.edit_batch(sources[:1], instructions[:1], edits.seeds[:1], num_timesteps=args.steps)
    )
    rows.append(
        ("edit, 1 edit alone (latency)", rows[-1][1], 1 / t_one, 1 / t_one_w, c_today, c_one, c_one_w, "images/s")
    )

    # --- greedy text after a 512-token context ---
    text = long_context(tok, args.context)
    items = [text]
    ctx_len = len(tok.encode(text)) + 2
    (ids_today), t_today, c_today = measure(lambda: today.answer_ids(items, max_length=args.new_tokens + 1))
    ids_cold, t_cold, c_cold = measure(lambda: cached.answer_ids(items, max_length=args.new_tokens + 1))
    ids_warm, t_warm, c_warm = measure(lambda: cached.answer_ids(items, max_length=args.new_tokens + 1))
    assert ids_today == ids_cold == ids_warm, "cached greedy ids differ from the oracle's"
    n_tok = max(1, len(ids_today))
    rows.append(
        (
            f"greedy text, {ctx_len}-token context, {n_tok} tokens",
            n_tok / t_today,
            n_tok / t_cold,
            n_tok / t_warm,
            c_today,
            c_cold,
            c_warm,
            "tokens/s",
        )
    )

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, {args.steps} Euler steps")
    print(
        "| task | today | cached cold | cached warm | ratio cold | ratio warm | compiles today / cold / warm | unit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, a, b, c, ca, cb, cc, unit in rows:
        print(f"| {name} | {a:.3g} | {b:.3g} | {c:.3g} | {b / a:.1f}× | {c / a:.1f}× | {ca} / {cb} / {cc} | {unit} |")


if __name__ == "__main__":
    main()
