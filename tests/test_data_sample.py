"""Split layout of each sample kind, written from the reference rules (data/dataset_base.py pack_sequence and the
datasets in data/), plus CFG dropout. Expected tables are spelled out by hand, not computed by the code under test.

Geometry: VAE rule (48, 32, 16), ViT rule (42, 28, 14); a 32x48 (w x h) image = 2x3 latents, a 32x32 image = 2x2
latents and 2x2 ViT patches (28x28), a 28x42 image = 2x3 ViT patches. Every image split adds 2 vision markers.
"""

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from bagel_jax.attention.mask import MaskMeta, Split, allowed, metadata_from_splits
from bagel_jax.batch import KIND_CLEAN_VAE as C
from bagel_jax.batch import KIND_NOISED_VAE as N
from bagel_jax.batch import KIND_TEXT as T
from bagel_jax.batch import KIND_VIT as V
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.records import RecordDecoder, RecordError
from bagel_jax.data.sample import Image, LayoutConfig, Sample, Text, build_document
from data_fixtures import reference_dense_mask

BOS, EOS, VS, VE = 1, 2, 3, 4


class WordTokenizer:
    """One id per whitespace-separated word (test double for the tokenizer interface)."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]


class ScriptedRng:
    """Returns scripted draws: integers(...) and random() from their queues (random defaults to 0.99)."""

    def __init__(self, integers=(), random=(), normal=0.25):
        self._int, self._rand, self._normal = list(integers), list(random), normal

    def integers(self, low, high=None):
        lo, hi = (0, low) if high is None else (low, high)
        v = self._int.pop(0)
        assert lo <= v < hi, f"scripted {v} outside [{lo}, {hi})"
        return v

    def random(self):
        return self._rand.pop(0) if self._rand else 0.99

    def standard_normal(self):
        return self._normal


def png(w, h, color=(200, 30, 30)):
    b = io.BytesIO()
    PILImage.new("RGB", (w, h), color).save(b, format="PNG")
    return b.getvalue()


def record(kind, meta, sizes):
    import json

    return {
        "kind": kind,
        "meta": json.dumps(meta),
        "images": [png(w, h) for w, h in sizes],
        "image_names": [f"{kind}{i}.png" for i in range(len(sizes))],
    }


LAYOUT = LayoutConfig(
    bos_id=BOS,
    eos_id=EOS,
    vision_start_id=VS,
    vision_end_id=VE,
    vit_patch_size=14,
    vit_max_patches_per_side=8,
    vae_downsample=16,
    max_latent_size=8,
    vae_pad_hw=(64, 64),
)


def decode(kind, rec, rng, layout=LAYOUT, tok=None):
    dec = RecordDecoder(kind, tok or WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    return build_document(dec(rec, rng, key=7), layout, rng)


def img(kind, n):  # an image split: marker, n tokens of `kind`, marker
    return [T] + [kind] * n + [T]


# kind, record, scripted rng, expected splits, expected RoPE ids, expected token kinds (natural order)
TABLE = [
    (
        "t2i caption + noised target (t2i_dataset.py; bagel.md §2.4 [ran] example)",
        "t2i",
        ({"captions": ["a red circle"]}, [(32, 48)]),
        dict(integers=[0]),
        [("causal", 5), ("noise", 8)],
        [0, 1, 2, 3, 4] + [5] * 8,
        [T] * 5 + img(N, 6),
    ),
    (
        "vlm image then question (loss 0) and answer (loss 1) (vlm_dataset.py; [ran] example)",
        "vlm",
        (
            {
                "conversations": [
                    {"from": "human", "value": "<image>what shape"},
                    {"from": "gpt", "value": "a red circle"},
                ]
            },
            [(28, 42)],
        ),
        {},
        [("full", 8), ("causal", 4), ("causal", 5)],
        [0] * 8 + [1, 2, 3, 4] + [5, 6, 7, 8, 9],
        img(V, 6) + [T] * 9,
    ),
    (
        "edit, 2 images: clean VAE + ViT of the source, instruction, noised target (edit_dataset.py; [ran] example)",
        "edit",
        ({"instructions": [["turn it"]]}, [(32, 32), (32, 32)]),
        dict(integers=[0, 1, 0]),
        [("full", 6), ("full", 6), ("causal", 4), ("noise", 6)],
        [0] * 6 + [1] * 6 + [2, 3, 4, 5] + [6] * 6,
        img(C, 4) + img(V, 4) + [T] * 4 + img(N, 4),
    ),
    (
        "edit, 3 images, per-step branch: intermediate image noised, then clean VAE + ViT",
        "edit",
        ({"instructions": [["make it blue"], ["move it"]]}, [(32, 32)] * 3),
        dict(integers=[0, 2, 0, 0], random=[0.7]),
        [("full", 6), ("full", 6), ("causal", 5), ("noise", 6), ("full", 6), ("full", 6), ("causal", 4), ("noise", 6)],
        [0] * 6 + [1] * 6 + [2, 3, 4, 5, 6] + [7] * 6 + [7] * 6 + [8] * 6 + [9, 10, 11, 12] + [13] * 6,
        img(C, 4) + img(V, 4) + [T] * 5 + img(N, 4) + img(C, 4) + img(V, 4) + [T] * 4 + img(N, 4),
    ),
    (
        "edit, 3 images, joined branch: end == last is pulled back by one (the reference's quirk)",
        "edit",
        ({"instructions": [["make it blue"], ["move it"]]}, [(32, 32)] * 3),
        dict(integers=[0, 2, 0], random=[0.3]),
        [("full", 6), ("full", 6), ("causal", 5), ("noise", 6)],
        [0] * 6 + [1] * 6 + [2, 3, 4, 5, 6] + [7] * 6,
        img(C, 4) + img(V, 4) + [T] * 5 + img(N, 4),
    ),
    (
        "video, 3 frames: frames chained like edit steps, captions between them",
        "video",
        ({"captions": ["it moves", "it turns red"]}, [(32, 32)] * 3),
        {},
        [("full", 6), ("full", 6), ("causal", 4), ("noise", 6), ("full", 6), ("full", 6), ("causal", 5), ("noise", 6)],
        [0] * 6 + [1] * 6 + [2, 3, 4, 5] + [6] * 6 + [6] * 6 + [7] * 6 + [8, 9, 10, 11, 12] + [13] * 6,
        img(C, 4) + img(V, 4) + [T] * 4 + img(N, 4) + img(C, 4) + img(V, 4) + [T] * 5 + img(N, 4),
    ),
    (
        "web: texts with loss; images after text generated then kept as conditions",
        "web",
        (
            {"items": [{"text": "hello world"}, {"image": 0}, {"text": "a red circle"}, {"image": 1}, {"text": "bye"}]},
            [(32, 32)] * 2,
        ),
        {},
        [
            ("causal", 4),
            ("noise", 6),
            ("full", 6),
            ("full", 6),
            ("causal", 5),
            ("noise", 6),
            ("full", 6),
            ("full", 6),
            ("causal", 3),
        ],
        [0, 1, 2, 3] + [4] * 6 + [4] * 6 + [5] * 6 + [6, 7, 8, 9, 10] + [11] * 6 + [11] * 6 + [12] * 6 + [13, 14, 15],
        [T] * 4 + img(N, 4) + img(C, 4) + img(V, 4) + [T] * 5 + img(N, 4) + img(C, 4) + img(V, 4) + [T] * 3,
    ),
    (
        "web: a leading image is a condition only; the last image is only generated",
        "web",
        ({"items": [{"image": 0}, {"text": "a red circle"}, {"image": 1}]}, [(32, 32)] * 2),
        {},
        [("full", 6), ("full", 6), ("causal", 5), ("noise", 6)],
        [0] * 6 + [1] * 6 + [2, 3, 4, 5, 6] + [7] * 6,
        img(C, 4) + img(V, 4) + [T] * 5 + img(N, 4),
    ),
]


@pytest.mark.parametrize("name,kind,rec,script,splits,positions,kinds", TABLE, ids=[t[0][:40] for t in TABLE])
def test_split_layout_per_kind(name, kind, rec, script, splits, positions, kinds):
    doc = decode(kind, record(kind, *rec), ScriptedRng(**script))
    assert list(zip(doc.split_modes, doc.split_lens.tolist())) == splits
    assert doc.positions().tolist() == positions
    assert doc.kinds().tolist() == kinds
    # the row mask built from these splits equals the reference's dense mask for the sample
    meta = metadata_from_splits([Split(1, m, n) for m, n in splits])
    ours = np.asarray(allowed(MaskMeta(**{k: np.asarray(v) for k, v in meta.items()})))
    np.testing.assert_array_equal(ours, reference_dense_mask([n for _, n in splits], [m for m, _ in splits]))
    # markers and text ids
    und_text = doc.und_text[doc.und_kind == T]
    assert set(und_text[:1].tolist()) <= {BOS, VS}
    assert (doc.vae_timestep[[k == N for k in _image_kinds(doc)]] == 0.25).all()
    assert np.isneginf(doc.vae_timestep[[k == C for k in _image_kinds(doc)]]).all()


def _image_kinds(doc):
    """Kind (C or N) of each VAE image of the document, in order."""
    return [int(doc.gen_kind[doc.gen_src // 16 == k][0]) for k in range(len(doc.vae_pixels))]


def test_text_labels_and_weights():
    tok = WordTokenizer()
    rec = record(
        "vlm",
        {"conversations": [{"from": "human", "value": "<image>what shape"}, {"from": "gpt", "value": "a red circle"}]},
        [(28, 42)],
    )
    doc = decode("vlm", rec, ScriptedRng(), tok=tok)
    a, red, circle = tok.encode("a red circle")
    what, shape = tok.encode("what shape")
    text = doc.und_kind == T
    assert doc.und_text[text].tolist() == [VS, VE, BOS, what, shape, EOS, BOS, a, red, circle, EOS]
    # the slot that predicts: <|im_start|> a red circle -> a red circle <|im_end|>; <|im_end|> predicts nothing
    assert doc.und_label[text].tolist() == [0, 0, 0, 0, 0, 0, a, red, circle, EOS, 0]
    assert doc.und_ce[text].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    layout = LayoutConfig(**{**LAYOUT.__dict__, "ce_loss_reweighting": True})
    doc = decode("vlm", rec, ScriptedRng(), layout=layout, tok=tok)
    assert doc.und_ce[doc.und_kind == T].tolist() == [0] * 6 + [0.5] * 4 + [0]  # len2weight(4) = 1/sqrt(4)


def test_vae_and_vit_geometry():
    doc = decode(
        "edit", record("edit", {"instructions": [["turn it"]]}, [(32, 48), (32, 48)]), ScriptedRng(integers=[0, 1, 0])
    )
    # clean image 0: 3 rows x 2 cols of latents in a 64x64 pad (4 tokens per pad row); noised image 1
    assert doc.gen_src.tolist() == [0, 1, 4, 5, 8, 9] + [16, 17, 20, 21, 24, 25]
    assert doc.gen_latent_pos.tolist() == [0, 1, 8, 9, 16, 17] * 2  # r * max_latent_size + c
    assert doc.vit_pos.tolist() == [0, 1, 8, 9, 16, 17]  # ViT rule scales 32x48 by 0.875: 28x42, 3x2 patches
    assert doc.vit_patches.shape == (6, 588) and doc.vit_patches.dtype == np.uint8
    assert [p.shape for p in doc.vae_pixels] == [(48, 32, 3)] * 2


def test_cfg_dropout_all_dropped_keeps_reference_positions():
    drop_all = LayoutConfig(
        **{**LAYOUT.__dict__, "text_cond_dropout_prob": 1.0, "vit_cond_dropout_prob": 1.0, "vae_cond_dropout_prob": 1.0}
    )
    rng = ScriptedRng(integers=[0], random=[0.0] * 10)
    doc = decode("t2i", record("t2i", {"captions": ["a red circle"]}, [(32, 48)]), rng, layout=drop_all)
    assert list(zip(doc.split_modes, doc.split_lens.tolist())) == [("noise", 8)]
    assert doc.positions().tolist() == [0] * 8  # a dropped text does not advance
    doc = decode(
        "edit",
        record("edit", {"instructions": [["turn it"]]}, [(32, 32)] * 2),
        ScriptedRng(integers=[0, 1, 0], random=[0.0] * 10),
        layout=drop_all,
    )
    assert list(zip(doc.split_modes, doc.split_lens.tolist())) == [("noise", 6)]
    assert doc.positions().tolist() == [2] * 6  # dropped clean VAE and ViT advance by one each


def test_cfg_dropout_rates():
    layout = LayoutConfig(
        **{**LAYOUT.__dict__, "text_cond_dropout_prob": 0.1, "vit_cond_dropout_prob": 0.3, "vae_cond_dropout_prob": 0.3}
    )
    px = np.zeros((32, 32, 3), np.uint8)
    sample = Sample(
        [
            Image(vae="clean", vit=True, cfg=True, vae_pixels=px, vit_pixels=px[:28, :28]),
            Text([11, 12], cfg=True),
            Image(vae="noised", vae_pixels=px),
            Text([13], loss=True),
        ]
    )  # not droppable
    rng = np.random.default_rng(0)
    n = 3000
    kept = np.zeros(3)
    for _ in range(n):
        doc = build_document(sample, layout, rng)
        modes = list(doc.split_modes)
        kept += [modes.count("causal") - 1, (doc.vit_pos.size > 0), (doc.gen_kind == C).any()]
    drop = 1 - kept / n
    np.testing.assert_allclose(drop, [0.1, 0.3, 0.3], atol=0.03)


def test_bad_records_raise_with_reason():
    cases = [
        ("t2i", record("t2i", {"captions": ["", "   "]}, [(32, 32)]), "empty_text"),
        ("vlm", record("vlm", {"conversations": [{"from": "human", "value": "<image>hi"}]}, [(28, 28)]), "no_loss"),
        ("edit", record("edit", {"instructions": []}, [(32, 32)]), "bad_record"),
        ("video", record("video", {"captions": ["a"]}, [(32, 32)] * 3), "bad_field"),
        ("t2i", {"kind": "t2i", "meta": "{not json", "images": [], "image_names": []}, "bad_record"),
    ]
    for kind, rec, reason in cases:
        with pytest.raises(RecordError) as e:
            decode(kind, rec, ScriptedRng(integers=[0, 0, 0]))
        assert e.value.reason == reason, (kind, str(e.value))
    with pytest.raises(ValueError, match="needs vae_pixels"):
        Image(vae="clean")
