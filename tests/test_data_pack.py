"""Packing: budgets respected, every document placed once, and rows satisfying the PackedBatch invariants."""

import numpy as np
import pytest

from bagel_jax.batch import FIELDS, PackedBatch, empty_row
from bagel_jax.data import images as img_lib
from bagel_jax.data.builders import synthetic_shapes
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.pack import Budgets, RowPacker, assemble, doc_cost, split_extras
from bagel_jax.data.records import KINDS, RecordDecoder
from bagel_jax.data.sample import LayoutConfig, build_document
from bagel_jax.data.tokenizer import train_sentencepiece
from data_fixtures import check_rows


def test_row_packer_respects_every_budget_and_places_each_item_once():
    rng = np.random.default_rng(0)
    cap = np.array([300, 200, 150, 4, 6])
    costs = np.stack(
        [
            rng.integers(0, 120, 500),
            rng.integers(0, 90, 500),
            rng.integers(0, 60, 500),
            rng.integers(0, 3, 500),
            np.ones(500, int),
        ],
        axis=1,
    )
    costs[:, 2] = np.minimum(costs[:, 2], costs[:, 0])
    packer = RowPacker(cap, buffer_size=16)
    rows, arrived, placed = [], {}, {}
    for i, c in enumerate(costs):
        arrived[i] = len(rows)
        for row in packer.add(i, c):
            rows.append(row)
            placed.update({j: len(rows) for j in row})
        assert len(packer.items) < 16
    rows += packer.flush()
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(500))
    for r in rows:
        assert np.all(costs[r].sum(0) <= cap)
    # each row starts with the oldest buffered item: nothing waits more than buffer_size rows
    assert max(placed[i] - arrived[i] for i in placed) <= 16
    with pytest.raises(ValueError, match="exceeds an empty row"):
        packer.add(999, np.array([301, 0, 0, 0, 1]))


def test_row_packer_beats_sequential_packing():
    rng = np.random.default_rng(1)
    cap = np.array([1000, 1000, 1000, 100, 100])
    costs = np.stack(
        [rng.integers(50, 600, 2000), rng.integers(0, 600, 2000)] + [np.zeros(2000, int)] * 2 + [np.ones(2000, int)],
        axis=1,
    )
    packer = RowPacker(cap, buffer_size=32)
    rows = [r for i, c in enumerate(costs) for r in packer.add(i, c)] + packer.flush()
    seq_rows, used = 1, np.zeros(5, int)  # next-fit: the reference-style sequential packer
    for c in costs:
        if np.any(used + c > cap):
            seq_rows, used = seq_rows + 1, np.zeros(5, int)
        used += c
    assert len(rows) < 0.85 * seq_rows, (len(rows), seq_rows)


@pytest.fixture(scope="module")
def shapes_docs(tmp_path_factory):
    """Documents of every kind from the shapes generator (no TFDS needed), tiny-config geometry."""
    tok = train_sentencepiece(synthetic_shapes.corpus(), str(tmp_path_factory.mktemp("tok") / "s.model"))
    layout = LayoutConfig(
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        vision_start_id=tok.vision_start_id,
        vision_end_id=tok.vision_end_id,
        vit_patch_size=14,
        vit_max_patches_per_side=8,
        vae_downsample=16,
        max_latent_size=8,
        vae_pad_hw=(64, 64),
        text_cond_dropout_prob=0.1,
        vit_cond_dropout_prob=0.3,
        vae_cond_dropout_prob=0.3,
    )
    gen = synthetic_shapes.Generator(seed=3)
    rng = np.random.default_rng(0)
    docs = []
    for i in range(24):
        for kind in KINDS:
            dec = RecordDecoder(kind, tok, ResizeRule(64, 32, 16), ResizeRule(112, 56, 14))
            rec = gen.example(kind, i)
            docs.append(build_document(dec(rec, rng, key=KINDS.index(kind) * 1000 + i), layout, rng))
    return docs


BUDGETS = Budgets(
    seq_len=512, und_len=384, max_vit_patches=128, max_vae_images=8, vae_hw=(64, 64), vit_patch_dim=588, max_docs=16
)


def test_packed_rows_satisfy_invariants(shapes_docs):
    packer = RowPacker(BUDGETS.capacity, buffer_size=12)
    rows = []
    for i, d in enumerate(shapes_docs):
        if packer.fits_empty(doc_cost(d)):
            rows += packer.add(i, doc_cost(d))
    rows += packer.flush()
    assert len(rows) > 5
    docs_per_row = [[shapes_docs[i] for i in r] for r in rows]
    batch = assemble(docs_per_row, BUDGETS)
    fields, extras = split_extras(batch)
    check_rows(fields | {"records": extras["records"]}, BUDGETS.und_len, 8, 8, docs_per_row)
    # per-row budgets
    for r, docs in enumerate(docs_per_row):
        u, g, v, n, _, _ = np.sum([doc_cost(d) for d in docs], axis=0)
        assert (u, g) == tuple(extras["real_tokens"][r]) and u <= 384 and g <= 128
        assert (batch["vit_image"][r] > 0).sum() == v <= 128 and (batch["vae_hw"][r, :, 0] > 0).sum() == n <= 8
    fill = extras["real_tokens"].sum() / (len(rows) * 512)
    assert fill > 0.6, fill  # the 8-image budget binds for video/web shapes docs (5 images each)
    # pixel content: images and patches land normalised at their place
    r, docs = 0, docs_per_row[0]
    k = 0
    for d in docs:
        for px in d.vae_pixels:
            h, w = px.shape[:2]
            np.testing.assert_array_equal(batch["vae_images"][r, k, :h, :w], img_lib.normalize(px))
            k += 1
    vit = np.concatenate([d.vit_patches for d in docs])
    np.testing.assert_array_equal(batch["vit_patches"][r, : len(vit)], img_lib.normalize(vit))
    # it is a PackedBatch of the documented shapes
    pb = PackedBatch(**fields)
    assert (pb.und_len, pb.gen_len, pb.seq_len) == (384, 128, 512)


def test_padding_row_equals_empty_row():
    batch = assemble([], BUDGETS, num_rows=2)
    want = empty_row(512, 384, 128, 588, 8, (64, 64))
    for f in FIELDS:
        np.testing.assert_array_equal(batch[f][1], want[f], err_msg=f)
        assert batch[f].dtype == want[f].dtype, f


def test_uint8_pixels_option_ships_raw_pixels(shapes_docs):
    rows = [shapes_docs[10:12], shapes_docs[20:21]]
    f32 = assemble(rows, BUDGETS)
    u8 = assemble(rows, Budgets(**{**BUDGETS.__dict__, "pixel_dtype": "uint8"}))
    for f in ("vae_images", "vit_patches"):
        assert u8[f].dtype == np.uint8 and f32[f].dtype == np.float32
        valid = f32[f] != 0  # padding is 0 in both
        np.testing.assert_array_equal(img_lib.normalize(u8[f])[valid], f32[f][valid])
        assert not u8[f][~valid].any()
    for f in FIELDS:
        if f not in ("vae_images", "vit_patches"):
            np.testing.assert_array_equal(u8[f], f32[f], err_msg=f)
    with pytest.raises(ValueError, match="pixel_dtype must be"):
        Budgets(**{**BUDGETS.__dict__, "pixel_dtype": "bfloat16"})
