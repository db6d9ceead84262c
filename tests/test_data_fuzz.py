"""Any record, with any JSON value in any field of any kind, becomes a document or a skip counted under a known
reason: the decoder never raises, and never needs its catch-all (``internal_error``, a bug)."""

import json

import grain
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_data import bad_images, good_images
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.pack import Budgets, PackIterDataset, Skipped, split_extras
from bagel_jax.data.pipeline import DocumentTransform
from bagel_jax.data.records import KINDS, RecordDecoder
from bagel_jax.data.sample import Document, LayoutConfig
from bagel_jax.data.skips import SKIP_REASONS
from bagel_jax.data.tokenizer import train_sentencepiece

SOURCE = "fuzz/data.jsonl:7"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
WORDS = st.sampled_from(["a red circle", "two blue squares", "what colour is it", "make it green"])
ODD_TEXT = st.sampled_from(["", "   ", "<image>", "<video>", "\ud800 lone surrogate", "x" * 600]) | st.text(max_size=12)
GOOD, BAD = list(good_images().values()), [b for b, _ in bad_images().values()]
BROKEN_META = st.sampled_from(["{not json", "[" * 100_000, b"\xff\xfe{}", "", "null", "[1, 2]", '"text"'])


def valid_meta(kind: str, n: int):
    """A ``meta`` of the right types for ``kind`` with ``n`` images; one in six has nothing to train on."""
    empty = {
        "t2i": {"captions": ["", "  "]},
        "vlm": {"conversations": [{"from": "human", "value": "<image>hi"}]},
        "edit": {"instructions": [[" "]] * (n - 1)},
        "video": {"captions": [""] * (n - 1)},
        "web": {"items": [{"image": 0}, {"text": ""}]},
    }[kind]
    return st.one_of(*[_valid_meta(kind, n)] * 5, st.just(empty))


def _valid_meta(kind: str, n: int):
    texts = lambda size: st.lists(WORDS, min_size=size, max_size=size)  # noqa: E731
    if kind == "t2i":
        return st.fixed_dictionaries({"captions": st.lists(WORDS, min_size=1, max_size=3)})
    if kind == "vlm":
        return st.tuples(WORDS, WORDS).map(
            lambda qa: {
                "conversations": [{"from": "human", "value": "<image>" * n + qa[0]}, {"from": "gpt", "value": qa[1]}]
            }
        )
    if kind == "edit":
        return st.lists(st.lists(WORDS, min_size=1, max_size=2), min_size=n - 1, max_size=n - 1).map(
            lambda steps: {"instructions": steps}
        )
    if kind == "video":  # frames of a folder (captions), or of a video file (frame_indexes, captions optional)
        clip = st.tuples(st.lists(st.integers(1, 30), min_size=n, max_size=n), texts(n - 1), st.booleans())
        return st.one_of(
            texts(n - 1).map(lambda caps: {"captions": caps}),
            clip.map(lambda c: {"frame_indexes": np.cumsum(c[0]).tolist(), **({"captions": c[1]} if c[2] else {})}),
        )
    return texts(n).map(lambda ts: {"items": [x for i, t in enumerate(ts) for x in ({"text": t}, {"image": i})]})


def paths(value, prefix=()):
    """Every place inside a JSON-like value: dict keys and list elements, at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from paths(v, prefix + (k,))


@st.composite
def records(draw, kind):
    """A valid record of ``kind``, then 0-3 of its features or meta fields (at any depth) replaced by any JSON
    value or by odd text, or deleted; images sometimes bad; the meta text sometimes broken."""
    n = draw(st.integers(1 if kind in ("t2i", "vlm", "web") else 2, 3))
    rec = {
        "kind": kind,
        "meta": draw(valid_meta(kind, n)),
        "images": [draw(st.sampled_from(GOOD) if draw(st.integers(0, 3)) else st.sampled_from(BAD)) for _ in range(n)],
        "image_names": [f"img{i}.png" for i in range(n)],
        "source": SOURCE,
    }
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(list(paths(rec))))
        parent = rec
        for k in where[:-1]:
            parent = parent[k]
        if draw(st.integers(0, 2)) == 0:
            del parent[where[-1]]
        elif where[0] == "meta":  # inside meta: JSON values only
            parent[where[-1]] = draw(JSON | ODD_TEXT)
        else:
            parent[where[-1]] = draw(JSON | ODD_TEXT | st.sampled_from(GOOD + BAD))
    if "meta" in rec:
        rec["meta"] = draw(
            st.one_of(*[st.just(json.dumps(rec["meta"]))] * 6, st.just(json.dumps(rec["meta"]).encode()), BROKEN_META)
        )
    return draw(st.one_of(*[st.just(rec)] * 20, JSON))  # rarely not a record at all


def expected_source(rec, fallback: str) -> str:
    """How a message names ``rec``: its ``source`` text on one line, else ``fallback`` (no usable source)."""
    src = rec.get("source") if isinstance(rec, dict) else None
    if isinstance(src, bytes):
        try:
            src = src.decode("utf-8")
        except UnicodeDecodeError:
            src = None
    text = " ".join(src.encode("utf-8", "replace").decode().split()) if isinstance(src, str) else ""
    return text[:100] or fallback


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = train_sentencepiece(
        ["a red circle", "two blue squares", "what colour is it", "make it green"] * 5,
        str(tmp_path_factory.mktemp("tok") / "t.model"),
        vocab_size=64,
    )
    layout = LayoutConfig(
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        vision_start_id=tok.vision_start_id,
        vision_end_id=tok.vision_end_id,
        vit_max_patches_per_side=8,
        max_latent_size=8,
        vae_pad_hw=(64, 64),
    )
    budgets = Budgets(
        seq_len=512,
        und_len=384,
        max_vit_patches=256,
        max_vae_images=8,
        vae_hw=(64, 64),
        vit_patch_dim=3 * 14 * 14,
        max_docs=16,
    )
    decoders = {
        k: RecordDecoder(k, tok, ResizeRule(64, 32, 16), ResizeRule(112, 56, 14), max_input_pixels=1 << 20)
        for k in KINDS
    }
    return layout, budgets, decoders


def test_any_record_is_a_document_or_a_counted_skip(parts):
    layout, budgets, decoders = parts
    seen = set()

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), st.lists(records(k), min_size=1, max_size=3)))
    )
    def check(case):
        kind, recs = case
        transform = DocumentTransform(kind, recs, decoders[kind], layout)
        for i, rec in enumerate(recs):
            out = transform(i, np.random.default_rng(i))
            if isinstance(out, Document):
                seen.add("document")
                continue
            assert isinstance(out, Skipped) and out.reason in SKIP_REASONS, out
            assert out.reason != "internal_error", out.message  # every failure is classified
            assert "\n" not in out.message
            assert out.message.startswith(expected_source(rec, f"{kind} record #{i}")), out.message
            seen.add(out.reason)
        # always counted: through the packer, documents placed + skips = records
        ds = grain.MapDataset.range(len(recs)).random_map(transform, seed=0)
        placed = skipped = 0
        for batch in PackIterDataset(ds, budgets, batch_rows=2):
            _, extras = split_extras(batch)
            placed += int((extras["records"] >= 0).sum())
            skipped += int(extras["skipped"].sum())
            assert len(extras["skip_messages"]) <= 2 * len(SKIP_REASONS)
        assert placed + skipped == len(recs)

    check()
    # the strategies reach documents and the classified reasons a record can have (not too_large: no such budgets)
    assert {
        "document",
        "bad_record",
        "bad_field",
        "empty_text",
        "no_loss",
        "missing_file",
        "undecodable_image",
        "image_too_large",
    } <= seen, seen
