"""Think mode and interleaved generation (``infer/interleave.py``) on the KV-cached path = on the cache-free oracle
(f32): identical greedy ids, logits and image latents within 1e-5; the contexts follow the reference's rules; the
interleaved loop's control flow (text → image → text → end) on a model steered to emit ``<|vision_start|>``; a batch
of interleaved requests = the requests alone; prompts longer than the cache are one clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.infer.api import Inferencer
from bagel_jax.infer.buckets import CacheOverflowError
from bagel_jax.infer.context import Contexts
from bagel_jax.infer.interleave import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    posterior_draws,
    split_thinking,
)

TOL = 1e-5
HW = (32, 32)
IMAGE = dict(num_timesteps=3)


@pytest.fixture(scope="module")
def setup():
    config, cfg, params, model = lib.tiny_setup()
    tok = lib.CharTokenizer()
    tok.vocab_size = 512
    return dict(config=config, cfg=cfg, params=params, model=model, tok=tok)


def _inferencers(setup, params=None, **kw):
    params = setup["params"] if params is None else params
    return {
        cached: Inferencer(setup["model"], params, setup["tok"], setup["config"].data, cached=cached, max_batch=2, **kw)
        for cached in (True, False)
    }


def _steered(params, pairs):
    """``params`` whose lm_head column ``dst`` is 1.5× column ``src`` for each pair: ``dst`` is emitted exactly where
    ``src`` would have won (with a positive logit), so the random model's choices are steered, not faked."""
    params = jax.tree.map(lambda a: a, params)
    kernel = np.array(params["language_model"]["lm_head"]["kernel"])
    for dst, src in pairs:
        kernel[:, dst] = 1.5 * kernel[:, src]
    params["language_model"]["lm_head"]["kernel"] = jnp.asarray(kernel)
    return params


def test_split_thinking():
    assert split_thinking("<think> plan a fox </think> a red fox") == ("plan a fox", "a red fox")
    assert split_thinking("<think> still planning") == ("still planning", "")
    assert split_thinking("just an answer ") == ("", "just an answer")
    assert split_thinking("a</think>b</think>c") == ("a", "b</think>c")


def test_think_understanding_cached_equals_oracle(setup):
    """Understanding in think mode: the VLM think prompt, then the image (ViT only) and the question; the whole
    decoded text is returned and split. Cached = oracle: ids identical, every step's logits within 1e-5."""
    inf = _inferencers(setup)
    items = [lib.pixels(np.random.default_rng(2), 40, 60), "what is it"]
    got = {c: i.think(items, understanding=True, max_think_tokens=5) for c, i in inf.items()}
    assert got[True].text_ids == got[False].text_ids and len(got[True].text_ids) == 4
    assert got[True].text == got[False].text and got[True].answer == split_thinking(got[True].text)[1]
    pre = inf[True].pre
    gen = [pre.text(VLM_THINK_SYSTEM_PROMPT), pre.image(items[0], vae=False, vit=True)[0], pre.text(items[1])]
    ids, logits = inf[True]._text.generate([gen], max_length=5, with_logits=True)
    want_ids, want_logits = inf[False]._text.trace(gen, max_length=5)
    assert ids[0] == want_ids == got[True].text_ids
    assert np.abs(want_logits[0]).max() > 0.1
    np.testing.assert_allclose(logits[0], np.stack(want_logits), atol=TOL)


def test_overflow_is_one_clear_error(setup):
    """A prompt (with the think system prompt) longer than the cache: one error naming the limit, on both paths,
    before anything runs."""
    for inf in _inferencers(setup, max_context_tokens=200).values():
        with pytest.raises(CacheOverflowError, match="max_context_tokens=200"):
            inf.think(["a red square"], hw=HW, max_think_tokens=4)
        with pytest.raises(CacheOverflowError, match="max_context_tokens=200"):
            inf.interleave(["a long prompt " * 20], hw=HW, max_length=4)


@pytest.mark.slow
def test_think_t2i_cached_equals_oracle(setup):
    """T2I in think mode: the plan is decoded after [think prompt, prompt], joins the gen context only, and the image
    is sampled with gen = [think prompt, prompt, plan], cfg_text = [think prompt], cfg_img = [think prompt, prompt]
    (the reference's contexts, built here by hand). Cached = oracle: plan ids identical, latents within 1e-5."""
    inf = _inferencers(setup)
    got = {c: i.think(["a red square"], rng=7, hw=HW, max_think_tokens=5, **IMAGE) for c, i in inf.items()}
    assert got[True].text_ids == got[False].text_ids and len(got[True].text_ids) == 4
    assert got[True].thinking == got[True].text
    np.testing.assert_allclose(got[True].latents, got[False].latents, atol=TOL)
    assert np.abs(got[True].image.astype(int) - got[False].image.astype(int)).max() <= 1
    pre = inf[False].pre
    system, prompt = pre.text(GEN_THINK_SYSTEM_PROMPT), pre.text("a red square")
    ctx = Contexts([system, prompt, pre.text(got[True].text)], [system], [system, prompt], None)
    _, want = inf[False].sample_contexts([ctx], [7], [HW], cfg_text_scale=4.0, cfg_img_scale=1.0, **IMAGE)
    np.testing.assert_allclose(got[False].latents, want[0], atol=TOL)


@pytest.mark.slow
def test_interleaved_cached_equals_oracle(setup):
    """The loop on a model steered to emit <|vision_start|> where token 407 would win and <|im_end|> where 214 would:
    text, then an image (it joins the context as VAE + ViT), then text until <|im_end|>. Cached = oracle: every
    round's ids identical, the image's latents within 1e-5, the logits of the round after the image within 1e-5;
    max_images=0 stops at the wanted image."""
    params = _steered(setup["params"], [(lib.VS, 407), (lib.EOS, 214)])
    inf = _inferencers(setup, params)
    kw = dict(hw=HW, max_length=6, max_images=2, **IMAGE)
    got = {c: i.interleave(["a red square"], rng=3, **kw) for c, i in inf.items()}
    a, b = got[True], got[False]
    assert [type(o).__name__ for o in a.outputs] == ["str", "ndarray", "str"] and a.stopped == "end"
    assert a.text_ids == b.text_ids and a.stopped == b.stopped and a.outputs[0] == b.outputs[0]
    assert [len(t) for t in a.text_ids] == [2, 3]  # each round ended by a steered token, before max_length
    np.testing.assert_allclose(a.latents[0], b.latents[0], atol=TOL)
    assert np.abs(a.outputs[1].astype(int) - b.outputs[1].astype(int)).max() <= 1
    pre = inf[True].pre
    gen = [pre.text("a red square"), pre.text(a.outputs[0]), pre.image(a.outputs[1], vae=True, vit=True)[0]]
    ids, logits = inf[True]._text.generate([gen], max_length=6, with_logits=True, rngs=[3])
    want_ids, want_logits = inf[False]._text.trace(gen, max_length=6, rng=jax.random.key(3))
    assert ids[0] == want_ids == a.text_ids[1]
    np.testing.assert_allclose(logits[0], np.stack(want_logits), atol=TOL)
    # the loop passes the generated image's posterior draw explicitly (rounds sample with their own keys): it is
    # the draw the request key gives implicitly, and it matters
    stop = (lib.EOS, lib.VS)
    draws = {s: posterior_draws(jax.random.key(s), gen, setup["cfg"]) for s in (3, 4)}
    _, _, explicit = inf[True]._text.generate_until(
        [gen], stop, max_length=6, with_logits=True, rngs=[5], posterior_noise=[draws[3]]
    )
    np.testing.assert_allclose(explicit[0], logits[0], atol=TOL)
    other = inf[False]._text.generate_until(gen, stop, max_length=6, rng=jax.random.key(5), posterior_noise=draws[4])
    assert np.abs(other[2][0] - want_logits[0]).max() > 1e-4
    capped = inf[True].interleave(["a red square"], rng=3, **{**kw, "max_images": 0})
    assert capped.stopped == "max_images" and capped.outputs == a.outputs[:1]


def test_cli_flags_are_checked(capsys):
    """--mode=interleave needs an output directory; counts must be in range: exit 2, one line."""
    from bagel_jax.infer.cli import parse_args

    for argv, message in (
        (["--random_tiny", "--mode=interleave", "--prompt=x"], "needs --out (a directory)"),
        (["--random_tiny", "--mode=interleave", "--prompt=x", "--out=d", "--max_images=-1"], "--max_images: must be"),
        (
            ["--random_tiny", "--mode=t2i", "--think", "--prompt=x", "--out=x.png", "--max_think_tokens=0"],
            "must be >= 1",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    args = parse_args(["--random_tiny", "--mode=interleave", "--prompt=x", "--out=d", "--image=y.png"])
    assert args.cfg_img_scale == 2.0 and args.cfg_interval == (0.0, 1.0)  # an input image: edit defaults
    assert parse_args(["--random_tiny", "--mode=interleave", "--prompt=x", "--out=d"]).cfg_img_scale == 1.0


@pytest.mark.slow
def test_cli_think_and_interleave(tmp_path, monkeypatch):
    """As a user runs it: t2i with --think prints the plan and writes the image; --mode=interleave writes its outputs
    in order; a think prompt longer than --max_context_tokens is one line naming the limit."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def run(*args):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        cmd = [sys.executable, "-m", "bagel_jax.infer.cli", "--random_tiny", "--prompt=a red square", *args]
        return subprocess.run(cmd, cwd=lib.ROOT, env=env, capture_output=True, text=True, timeout=600)

    png, story = tmp_path / "x.png", tmp_path / "story"
    r = run("--mode=t2i", "--think", "--max_think_tokens=4", "--num_timesteps=2", f"--out={png}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("thinking: ") and png.exists()
    r = run("--mode=interleave", "--max_length=4", "--num_timesteps=2", f"--out={story}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("stopped: ")
    assert sorted(p.name for p in story.iterdir())[0] in ("00.txt", "00.png")
    r = run("--mode=t2i", "--think", "--max_context_tokens=100", f"--out={png}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "max_context_tokens=100" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # ~9 compiles (batch buckets 2 and 1 of each program): ~40 CPU-s
def test_interleaved_batch_equals_one_by_one(setup):
    """A batch of interleaved requests (prompts of different lengths, each with its own seed; two go text → image →
    text, one ends after its first text, so the rounds run on shrinking subsets; max_batch=2, so every round runs
    in pieces) = the same requests run alone: identical greedy ids and outputs, latents within 1e-5, images within
    one uint8 level. Another seed gives another image: the seed reaches each request's noise."""
    params = _steered(setup["params"], [(lib.VS, 407), (lib.EOS, 214)])
    inf = Inferencer(setup["model"], params, setup["tok"], setup["config"].data, max_batch=2)
    prompts = ["a red square on blue", "two blue circles", "one small green circle"]  # one context bucket
    seeds = [3, 4, 5]
    kw = dict(hw=HW, max_length=6, max_images=1, num_timesteps=2)
    batch = inf.interleave_batch([[p] for p in prompts], seeds, **kw)
    kinds = [[type(o).__name__ for o in r.outputs] for r in batch]
    assert kinds == [["str", "ndarray", "str"], ["str"], ["str", "ndarray", "str"]]
    for p, s, got in zip(prompts, seeds, batch):
        alone = inf.interleave([p], rng=s, **kw)
        assert alone.text_ids == got.text_ids and alone.stopped == got.stopped
        assert [o for o in alone.outputs if isinstance(o, str)] == [o for o in got.outputs if isinstance(o, str)]
        assert len(alone.latents) == len(got.latents)
        for a, b in zip(alone.latents, got.latents):
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        for a, b in zip(alone.outputs, got.outputs):
            if not isinstance(a, str):
                assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    other = inf.interleave([prompts[0]], rng=7, **kw)
    assert other.text_ids[0] == batch[0].text_ids[0] and np.abs(other.latents[0] - batch[0].latents[0]).max() > 1e-2
