"""The Euler flow sampler with CFG = a step-by-step computation written here from the reference (§8.1, §8.3),
with every velocity taken from the unpacked oracle on each context alone."""

from __future__ import annotations

import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.sample import Text
from bagel_jax.infer.context import Preprocess, interleave_contexts
from bagel_jax.infer.image import ImageSampler, cfg_combine, sampling_timesteps
from bagel_jax.model.unpacked import unpacked_forward


def _ref_combine(v, vt, vi, st, si, renorm, rmin):
    """bagel.md §8.3 / ``_forward_flow``, transcribed."""
    if not st > 1.0:
        return v
    if renorm == "text_channel":
        vt_ = vt + st * (v - vt)
        scale = np.clip(
            np.linalg.norm(v, axis=-1, keepdims=True) / (np.linalg.norm(vt_, axis=-1, keepdims=True) + 1e-8), rmin, 1.0
        )
        vt_ = vt_ * scale
        return vi + si * (vt_ - vi) if si > 1.0 else vt_
    vt_ = vt + st * (v - vt)
    v_ = vi + si * (vt_ - vi) if si > 1.0 else vt_
    if renorm == "global":
        scale = np.clip(np.linalg.norm(v) / (np.linalg.norm(v_) + 1e-8), rmin, 1.0)
    else:
        scale = np.clip(
            np.linalg.norm(v, axis=-1, keepdims=True) / (np.linalg.norm(v_, axis=-1, keepdims=True) + 1e-8), rmin, 1.0
        )
    return v_ * scale


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("st,si", [(3.0, 1.5), (1.0, 2.0), (2.0, 1.0)])
def test_cfg_combine_formula(renorm, st, si):
    rng = np.random.default_rng(0)
    v, vt, vi = (rng.standard_normal((6, 64)).astype(np.float32) for _ in range(3))
    for rmin in (0.0, 0.5, 1.0):
        got = cfg_combine(v, vt, vi, cfg_text_scale=st, cfg_img_scale=si, renorm_type=renorm, renorm_min=rmin)
        np.testing.assert_allclose(got, _ref_combine(v, vt, vi, st, si, renorm, rmin), rtol=1e-5, atol=1e-6)


def test_timesteps():
    ts, dts = sampling_timesteps(4, 3.0)
    lin = np.linspace(1, 0, 4)
    want = 3 * lin / (1 + 2 * lin)
    np.testing.assert_allclose(ts, want[:-1], rtol=1e-6)
    np.testing.assert_allclose(dts, want[:-1] - want[1:], rtol=1e-6)
    assert len(ts) == 3  # num_timesteps − 1 model evaluations


@pytest.fixture(scope="module")
def sampler_setup():
    config, cfg, params, model = lib.tiny_setup()
    tok = lib.CharTokenizer()
    pre = Preprocess(tok, ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    rng = np.random.default_rng(5)
    image = lib.pixels(rng, 40, 44)
    ctx = interleave_contexts(["a red square", image, "make it blue"], pre)
    return cfg, params, model, tok, ctx, ImageSampler(model, params, tok)


def test_three_contexts(sampler_setup):
    """§8.1: cfg_text = everything but the last text; cfg_img = the texts only; an image = clean VAE + ViT."""
    cfg, params, model, tok, ctx, sampler = sampler_setup
    kinds = lambda segs: [("T", tuple(s.ids)) if isinstance(s, Text) else ("I", s.vae, s.vit) for s in segs]  # noqa
    t1, t2 = tuple(tok.encode("a red square")), tuple(tok.encode("make it blue"))
    assert kinds(ctx.gen) == [("T", t1), ("I", "clean", True), ("T", t2)]
    assert kinds(ctx.cfg_text) == [("T", t1), ("I", "clean", True)]
    assert kinds(ctx.cfg_img) == [("T", t1), ("T", t2)]
    assert ctx.image_hw == ctx.gen[1].vae_pixels.shape[:2] == (32, 48)  # 40x44 → banker's rounding
    assert ctx.gen[1].vit_pixels.shape[:2] == (28, 42)  # ViT sees the VAE-resized image


# The tiny random model's contexts move the velocity by only ~1 %, so the CFG'd velocity is longer than v
# (and the renorm clamp acts) only at a large text scale.
@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_sampler_matches_reference_loop(sampler_setup, renorm):
    cfg, params, model, tok, ctx, sampler = sampler_setup
    hw, steps, shift, st, si, rmin, interval = (32, 48), 6, 3.0, 400.0, 2.0, 0.0, (0.5, 1.0)
    n_tok = (hw[0] // 16) * (hw[1] // 16)
    noise = np.random.default_rng(7).standard_normal((n_tok, 64)).astype(np.float32)
    res = sampler.sample(
        ctx.gen,
        ctx.cfg_text,
        ctx.cfg_img,
        hw,
        num_timesteps=steps,
        timestep_shift=shift,
        cfg_text_scale=st,
        cfg_img_scale=si,
        cfg_interval=interval,
        cfg_renorm_type=renorm,
        cfg_renorm_min=rmin,
        init_noise=noise,
    )

    # --- the reference loop, every f(x, t; context) from the oracle on that context alone ---
    sd = lib.official_sd(params, cfg)
    docs = res.rows.docs  # [gen, cfg_text, cfg_img] each + query image (natural-order layouts)
    canvas_w = res.rows.budgets.vae_hw[1] // 16

    def x0_tokens(doc):
        out = []
        for k, px in enumerate(doc.vae_pixels):
            hl, wl = px.shape[0] // 16, px.shape[1] // 16
            rr, cc = np.divmod(np.arange(hl * wl), wl)
            out.append(res.context_latents[k][rr * canvas_w + cc])
        return out

    def f(doc, x, t):
        xt = [None] * (len(doc.vae_pixels) - 1) + [(x, t)]  # the query is the last image
        return unpacked_forward(sd, cfg, doc, x0=x0_tokens(doc), xt=xt)["velocity"][-n_tok:]

    lin = np.linspace(1, 0, steps)
    ts = shift * lin / (1 + (shift - 1) * lin)
    x = noise.astype(np.float64)
    used_cfg, used_renorm = [], []
    for i in range(steps - 1):
        t, dt = ts[i], ts[i] - ts[i + 1]
        v = f(docs[0], x, t)
        if interval[0] < t <= interval[1]:
            vt, vi = f(docs[1], x, t), f(docs[2], x, t)
            v_new = _ref_combine(v, vt, vi, st, si, renorm, rmin)
            used_renorm.append(not np.allclose(v_new, _ref_combine(v, vt, vi, st, si, renorm, 1.0)))
            v = v_new
            used_cfg.append(True)
        else:
            used_cfg.append(False)
        x = x - v * dt
        np.testing.assert_allclose(res.trajectory[i], x, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
    assert used_cfg == [True, True, True, True, False]  # the interval switches CFG off at t = 3/7
    assert any(used_renorm)  # the renorm clamp was active
    assert np.abs(x - noise).max() > 1e-3


def test_greedy_text_matches_oracle_loop(sampler_setup):
    """Understanding: greedy decoding = argmax of the oracle's logits on context + <|im_start|> t1..tk, step by step."""
    from bagel_jax.data.sample import Sample, build_document
    from bagel_jax.infer.context import layout_for, query_text
    from bagel_jax.infer.text import TextGenerator

    cfg, params, model, tok, _, _ = sampler_setup
    pre = Preprocess(tok, ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    ctx = interleave_contexts([lib.pixels(np.random.default_rng(9), 30, 40), "what is it"], pre, understanding=True)
    assert [type(s).__name__ for s in ctx.gen] == ["Image", "Text"] and ctx.gen[0].vae == "none" and ctx.gen[0].vit
    max_length = 5
    got = TextGenerator(model, params, tok).generate(ctx.gen, max_length=max_length)

    sd = lib.official_sd(params, cfg)
    lay = layout_for(cfg, tok, (16, 16))
    want = []
    for _ in range(max_length):  # reference loop: feed <|im_start|>, t1, ...; stop at <|im_end|> or max_length
        doc = build_document(Sample(ctx.gen + [query_text(want)]), lay, np.random.default_rng(0))
        logits = unpacked_forward(sd, cfg, doc)["logits"]
        nxt = int(np.argmax(logits[np.nonzero(doc.und_nat == doc.num_tokens - 2)[0][0]]))
        if nxt == tok.eos_id or len(want) + 1 >= max_length:
            break
        want.append(nxt)
    assert got == want and len(got) == max_length - 1
