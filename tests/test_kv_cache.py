"""The KV-cached, batched inference path = the cache-free oracle (f32, ≤ 1e-5): velocities of every CFG branch,
latents after every Euler step, text logits, greedy and sampled ids — for text-to-image, editing (image CFG on) and
understanding. Batching, padding and prompt lengths do not change a request's result; limits raise one clear
error naming the limit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.attention.mask import MaskMeta
from bagel_jax.data.images import ResizeRule
from bagel_jax.infer.buckets import (
    BatchTooLargeError,
    CacheOverflowError,
    ImageTooLargeError,
    batch_bucket,
    round_bucket,
)
from bagel_jax.infer.cached_image import CachedImageSampler
from bagel_jax.infer.cached_text import CachedTextGenerator
from bagel_jax.infer.context import Preprocess, interleave_contexts
from bagel_jax.infer.image import ImageSampler
from bagel_jax.infer.text import TextGenerator
from bagel_jax.model.mot import LanguageModel
from bagel_jax.splits import Split, metadata_from_splits

T2I = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
EDIT = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
HW = (32, 48)
TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    config, cfg, params, model = lib.tiny_setup()
    tok = lib.CharTokenizer()
    pre = Preprocess(tok, ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    source = lib.pixels(np.random.default_rng(5), 40, 44)
    contexts = {
        "t2i": interleave_contexts(["a red square"], pre),
        "edit": interleave_contexts([source, "make it blue"], pre),
    }
    return dict(
        cfg=cfg,
        params=params,
        model=model,
        tok=tok,
        pre=pre,
        contexts=contexts,
        oracle=ImageSampler(model, params, tok),
        cached=CachedImageSampler(model, params, tok, max_batch=4),
    )


def test_buckets():
    assert [round_bucket(n) for n in (1, 16, 17, 33, 100, 300, 4100)] == [16, 16, 32, 48, 112, 320, 5120]
    for n in range(1, 5000, 7):
        b = round_bucket(n)
        assert n <= b <= max(16, 1.25 * n + 16)
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64]
    assert batch_bucket(5, 6) == 6


def test_extend_equals_whole_row():
    """A row = its prefix prefilled into a cache, then the rest (text after an image) run against it (scanned layers:
    the cache is scanned over with them; the unscanned model is checked by every test below)."""
    cfg = lib.tiny_config().model
    cfg.scan_layers = True
    from flax.core import meta as flax_meta

    from bagel_jax.model.mot import init_params

    params = flax_meta.unbox(init_params(cfg, jax.random.key(1)))
    lm = LanguageModel(cfg)
    m = metadata_from_splits([Split(1, "causal", 5), Split(1, "full", 4), Split(1, "causal", 3)])
    order = np.r_[0:5, 9:12, 5:9]  # slot order: und (texts), then gen (the image)
    meta = MaskMeta(*(jnp.asarray(m[k][order][None]) for k in ("doc", "index", "q_hi", "kv_hi")))
    pos = jnp.asarray(np.r_[0:5, 6:9, 5, 5, 5, 5][None])
    rng = np.random.default_rng(0)
    und, gen = (jnp.asarray(rng.standard_normal((1, n, cfg.hidden_size)), jnp.float32) for n in (8, 4))
    full_u, full_g = jax.jit(lm.apply)(params, und, gen, pos, meta)
    extend = jax.jit(lambda *a: lm.apply(params, *a, method="extend"))
    take = lambda idx: MaskMeta(*(a[:, idx] for a in (meta.doc, meta.index, meta.q_hi, meta.kv_hi)))  # noqa: E731
    from bagel_jax.infer.cache import empty_cache

    past, past_meta = empty_cache(cfg, 1, jnp.float32)
    prefix = np.r_[0:5, 8:12]
    pu, pg, kv = extend(und[:, :5], gen, pos[:, prefix], take(prefix), past, past_meta)
    np.testing.assert_allclose(pu, full_u[:, :5], atol=TOL)
    np.testing.assert_allclose(pg, full_g, atol=TOL)
    assert kv[0].shape == (cfg.num_layers, 1, 9, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads)
    eu, _, kv2 = extend(und[:, 5:], gen[:, :0], pos[:, 5:8], take(np.r_[5:8]), kv, take(prefix))
    np.testing.assert_allclose(eu, full_u[:, 5:], atol=TOL)
    assert kv2[0].shape[2] == 3


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_velocities_equal_oracle(setup, kind):
    """f(x, t; context) of the gen, cfg_text and cfg_img contexts (t2i: the prompt / nothing / the prompt; edit:
    source image + instruction / source image / instruction): prefill + query = the whole row recomputed."""
    ctx, key = setup["contexts"][kind], jax.random.key(3)
    x = np.random.default_rng(1).standard_normal((HW[0] // 16 * HW[1] // 16, 64)).astype(np.float32)
    want = setup["oracle"].velocities([ctx.gen, ctx.cfg_text, ctx.cfg_img], HW, x, 0.7, rng=key)
    got = setup["cached"].velocities([ctx], HW, [key], x[None], 0.7)[:, 0]
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=TOL)


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_latents_equal_oracle(setup, kind):
    """Every Euler step's latents; t2i's interval (0.4, 1] switches CFG off at the last steps (gen row alone), t2i
    skips the cfg_img row (scale 1), editing runs all three. t2i: the same key → the same initial noise; edit: the
    initial noise and the source image's posterior draw given explicitly."""
    ctx, key = setup["contexts"][kind], jax.random.key(4)
    kw = T2I if kind == "t2i" else EDIT
    if kind == "edit":
        rng = np.random.default_rng(6)
        h, w = ctx.gen[0].vae_pixels.shape[:2]
        kw = dict(
            kw,
            init_noise=rng.standard_normal((HW[0] // 16 * HW[1] // 16, 64)).astype(np.float32),
            posterior_noise=[rng.standard_normal((h // 8, w // 8, 16)).astype(np.float32)],
        )
    want = setup["oracle"].sample(ctx.gen, ctx.cfg_text, ctx.cfg_img, HW, num_timesteps=5, rng=key, **kw)
    if kind == "edit":
        kw = dict(kw, init_noise=kw["init_noise"][None], posterior_noise=[kw["posterior_noise"]])
    got = setup["cached"].sample([ctx], HW, [key], num_timesteps=5, with_trajectory=True, **kw)
    np.testing.assert_allclose(got.trajectory[:, 0], np.stack(want.trajectory), atol=TOL)
    np.testing.assert_allclose(got.latents[0], want.latents, atol=TOL)
    assert got.grid_hw == want.grid_hw == (2, 3)


def test_batch_equals_one_by_one_image(setup):
    """Prompts of different lengths (different context buckets alone) with their own seeds, batched and padded to a
    bucket of 4, give each request's image alone; a seed repeated in the batch gives the same image."""
    pre, cached = setup["pre"], setup["cached"]
    prompts = ["a red square", "two small blue circles on the left side", "a red square"]
    ctxs = [interleave_contexts([p], pre) for p in prompts]
    seeds = [7, 8, 7]
    run = lambda c, s: cached.sample(c, HW, s, num_timesteps=5, with_trajectory=True, **T2I).latents  # noqa: E731
    batched = run(ctxs, seeds)
    for i in (0, 1):
        alone = run([ctxs[i]], [seeds[i]])[0]
        np.testing.assert_allclose(batched[i], alone, atol=TOL)
    np.testing.assert_array_equal(batched[0], batched[2])
    assert np.abs(batched[0] - batched[1]).max() > 1e-2


def test_text_equals_oracle_and_batch_equals_one_by_one(setup):
    """Understanding (image + question) and a plain-text context, decoded together: greedy ids identical to the
    oracle's, logits of every step within 1e-5; sampled ids identical too (same keys); each row as alone."""
    model, params, tok, pre = setup["model"], setup["params"], setup["tok"], setup["pre"]
    ctxs = [
        interleave_contexts([lib.pixels(np.random.default_rng(9), 30, 40), "what is it"], pre, understanding=True).gen,
        interleave_contexts(["a much longer question about the picture"], pre, understanding=True).gen,
    ]
    oracle, cached = TextGenerator(model, params, tok), CachedTextGenerator(model, params, tok, max_batch=4)
    ids, logits = cached.generate(ctxs, max_length=5, with_logits=True)
    for i, c in enumerate(ctxs):
        want_ids, want_logits = oracle.trace(c, max_length=5)
        assert ids[i] == want_ids and len(want_ids) == 4
        np.testing.assert_allclose(logits[i], np.stack(want_logits), atol=TOL)
    sampled = cached.generate(ctxs, max_length=5, do_sample=True, temperature=1.0, rngs=[11, 12])
    for i, c in enumerate(ctxs):
        assert sampled[i] == oracle.generate(
            c, max_length=5, do_sample=True, temperature=1.0, rng=jax.random.key(11 + i)
        )
    assert cached.generate(ctxs[1:], max_length=5) == ids[1:]


@pytest.mark.slow
def test_stops_at_end_token(setup):
    """A row stops at <|im_end|> (not returned) while the others go on: the model is steered by making the end
    token's logit huge after a given context only (its lm_head row)."""
    model, params, tok, pre = setup["model"], setup["params"], setup["tok"], setup["pre"]
    params = jax.tree.map(lambda a: a, params)
    kernel = np.array(params["language_model"]["lm_head"]["kernel"])
    kernel[:, tok.eos_id] *= 0
    kernel[:, tok.eos_id] += 50 * np.sign(kernel[:, 100])  # end token wins whenever token 100 would score high
    params["language_model"]["lm_head"]["kernel"] = jnp.asarray(kernel)
    ctxs = [
        interleave_contexts(["what is it"], pre, understanding=True).gen,
        interleave_contexts(["a much longer question about the picture"], pre, understanding=True).gen,
    ]
    got = CachedTextGenerator(model, params, tok, max_batch=4).generate(ctxs, max_length=5)
    oracle = TextGenerator(model, params, tok)
    want = [oracle.generate(c, max_length=5) for c in ctxs]
    assert got == want and any(len(w) < 4 for w in want)


def test_limits_raise_one_clear_error(setup):
    cached, pre = setup["cached"], setup["pre"]
    ctx = setup["contexts"]["t2i"]
    small = CachedImageSampler(setup["model"], setup["params"], setup["tok"], max_batch=2, max_context_tokens=24)
    with pytest.raises(CacheOverflowError, match="max_context_tokens=24"):
        small.sample([interleave_contexts(["a prompt that is far too long"], pre)], HW, [0], num_timesteps=2, **T2I)
    with pytest.raises(BatchTooLargeError, match="max_batch=2"):
        small.sample([ctx] * 3, HW, [0, 1, 2], num_timesteps=2, **T2I)
    largest = setup["cfg"].max_latent_size * 16
    with pytest.raises(ImageTooLargeError, match=f"max_latent_size={setup['cfg'].max_latent_size}"):
        cached.sample([ctx], (largest + 16, 32), [0], num_timesteps=2, **T2I)
    text = CachedTextGenerator(setup["model"], setup["params"], setup["tok"], max_context_tokens=40)
    with pytest.raises(CacheOverflowError, match="max_context_tokens=40"):
        text.generate([ctx.gen], max_length=32)
    for err in (CacheOverflowError, BatchTooLargeError, ImageTooLargeError):
        assert issubclass(err, ValueError)


@pytest.mark.slow
def test_inferencer_cached_equals_oracle_path(setup):
    """The ``Inferencer`` on either path: same seeds → the same images (t2i batched with a repeated prompt, edit) and
    answers; the evaluators' callables hand all inputs to one batched call."""
    from bagel_jax.eval.inferencer_fns import inferencer_fns
    from bagel_jax.infer.api import Inferencer

    config = lib.tiny_config()
    model, params = setup["model"], setup["params"]
    tok = lib.CharTokenizer()
    tok.vocab_size = 512
    src = lib.pixels(np.random.default_rng(2), 40, 60)
    out = {}
    for cached in (True, False):
        inf = Inferencer(model, params, tok, config.data, cached=cached, max_batch=4)
        images = inf.generate_batch(
            ["a red square", "a blue circle", "a red square"], [1, 2, 1], (32, 32), num_timesteps=3
        )
        edited = inf.edit(src, "make it blue", rng=5, num_timesteps=3)
        out[cached] = images + [edited], inf.answer_batch([src, None], ["what is it", "hello"], max_length=4)
    (img_c, ans_c), (img_o, ans_o) = out[True], out[False]
    assert [i.shape for i in img_c] == [(32, 32, 3)] * 3 + [(32, 64, 3)]
    for a, b in zip(img_c, img_o):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    np.testing.assert_array_equal(img_c[0], img_c[2])
    assert ans_c == ans_o

    fns = inferencer_fns(inf, max_answer_tokens=4)
    assert callable(fns["generate_fn"].batch) and callable(fns["edit_fn"].batch)
    assert fns["answer_fn"].batch([src, None], ["what is it", "hello"]) == ans_o


def test_evaluators_use_batched_callables():
    from bagel_jax.eval import ShapesGenEval, ShapesVQA
    from bagel_jax.eval.batched import call_all

    calls = []

    def answer_fn(image, question):
        calls.append("one")
        return "x"

    answer_fn.batch = lambda images, questions: calls.append(len(images)) or ["x"] * len(images)
    ShapesVQA(num_examples=5).run(answer_fn)
    assert calls == [5]
    gen = ShapesGenEval(num_examples=1, samples_per_prompt=2, categories=("single_object",))
    seen = []

    def generate_fn(prompt, seed):
        seen.append((prompt, seed))
        return np.zeros((48, 48, 3), np.uint8)

    gen.run(generate_fn)  # no batched form: one call per image
    assert seen == [(e.prompt, s) for e, s in gen.samples]
    with pytest.raises(ValueError, match="returned 1 outputs for 2"):
        answer_fn.batch = lambda images, questions: ["x"]
        call_all(answer_fn, [None, None], ["a", "b"])


def test_programs_compile_once_per_bucket(setup):
    """A second sampler on the same model (another Inferencer, the trainer's next eval) and another prompt length in
    the same bucket compile nothing; the VAE decode compiles once per batch shape, not per call."""
    import jax.monitoring as monitoring

    compiles = []

    def listen(name, secs, **kw):
        if name.endswith("backend_compile_duration"):
            compiles.append(name)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        _check_compiles(setup, compiles)
    finally:
        monitoring.unregister_event_duration_listener(listen)


def _check_compiles(setup, compiles):
    from bagel_jax.infer.image import decode_latents_batch

    model, params, tok, pre = setup["model"], setup["params"], setup["tok"], setup["pre"]
    first = CachedImageSampler(model, params, tok, max_batch=4)
    run = lambda s, p, seed: (  # noqa: E731
        s.sample(
            [interleave_contexts([p], pre)],
            HW,
            [seed],
            num_timesteps=5,  # noqa: E731
            with_trajectory=True,
            **T2I,
        ).latents
    )
    a = run(first, "a red square", 1)  # 14 tokens: bucket 16 (compiled by test_latents_equal_oracle, or now)
    compiles.clear()
    b = run(CachedImageSampler(model, params, tok, max_batch=4), "a blue circle", 2)  # 15 tokens, same bucket
    assert compiles == [] and np.abs(a - b).max() > 1e-3
    cfg = setup["cfg"]
    decode_latents_batch(cfg.vae, params["vae"], a, (2, 3))
    compiles.clear()
    decode_latents_batch(cfg.vae, params["vae"], b, (2, 3))
    assert compiles == []
