"""TFDS builders: each builds offline from a tiny fixture made here and reads back; shapes are deterministic."""

import collections
import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from bagel_jax.data.builders import common, edit, interleaved_video, interleaved_web, synthetic_shapes, t2i, vlm_sft
from bagel_jax.data.images import ImageError, ResizeRule
from bagel_jax.data.records import KINDS, RecordDecoder
from bagel_jax.data.sample import LayoutConfig, build_document
from bagel_jax.data.tokenizer import load_tokenizer
from data_fixtures import SHAPES_EXAMPLES, shapes_dir


class WordTokenizer:
    def encode(self, text):
        return [10 + (hash(w) % 100) for w in text.split()]


def jpeg(w, h, color):
    b = io.BytesIO()
    PILImage.new("RGB", (w, h), color).save(b, format="JPEG")
    return b.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_all(data_dir, spec):
    src = common.open_source(data_dir, spec)
    return [src[i] for i in range(len(src))]


def decode_all(records, kind):
    dec = RecordDecoder(kind, WordTokenizer(), ResizeRule(64, 32, 16), ResizeRule(112, 56, 14))
    rng = np.random.default_rng(0)
    out = []
    for r in records:
        try:
            out.append(dec(r, rng))
        except ImageError as e:
            out.append(e.reason)
    return out


def test_t2i_builder(tmp_path):
    manual = tmp_path / "manual"
    images = [jpeg(40, 30, (255, 0, 0)), jpeg(50, 60, (0, 255, 0))]
    (manual / "sub").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {"image": images, "captions": [json.dumps({"a": "a red box", "b": "red"}), json.dumps({"a": "green"})]}
        ),
        manual / "part0.parquet",
    )
    pq.write_table(pa.table({"image": [jpeg(32, 32, (0, 0, 255))], "caption": ["blue"]}), manual / "sub" / "p1.parquet")
    common.build(t2i.T2i, tmp_path / "data", manual)
    recs = read_all(tmp_path / "data", "t2i")
    assert len(recs) == 3
    by_meta = {json.loads(r["meta"])["captions"][0]: r for r in recs}
    assert set(by_meta) == {"a red box", "green", "blue"}
    assert by_meta["a red box"]["images"][0] == images[0]
    assert json.loads(by_meta["a red box"]["meta"])["captions"] == ["a red box", "red"]
    samples = decode_all(recs, "t2i")
    assert all(s.segments[1].vae == "noised" for s in samples)


def test_vlm_sft_builder_with_video_and_missing_image(tmp_path):
    manual = tmp_path / "manual"
    write(str(manual / "images" / "a.jpg"), jpeg(40, 40, (1, 2, 3)))
    write(str(manual / "b.jpg"), jpeg(30, 50, (4, 5, 6)))
    for k in range(12):
        write(str(manual / "clip" / f"{k:03d}.png"), jpeg(28, 28, (k, k, k)))
    lines = [
        {
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
        },
        {
            "image": ["a.jpg", "b.jpg"],
            "conversations": [{"from": "human", "value": "<image><image>Compare"}, {"from": "gpt", "value": "Same."}],
        },
        {
            "video": "clip",
            "conversations": [{"from": "human", "value": "<video>\nDescribe"}, {"from": "gpt", "value": "Moving."}],
        },
        {
            "image": "gone.jpg",
            "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}],
        },
    ]
    (manual / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(vlm_sft.VlmSft, tmp_path / "data", manual, max_frames=4)
    recs = sorted(
        read_all(tmp_path / "data", "vlm_sft"), key=lambda r: json.loads(r["meta"])["conversations"][1]["value"]
    )
    assert [json.loads(r["meta"])["conversations"][1]["value"] for r in recs] == ["A.", "Moving.", "Same.", "Yo"]
    video = recs[1]
    assert len(video["images"]) == 4  # 12 frames -> 4 evenly spread
    assert json.loads(video["meta"])["conversations"][0]["value"] == "<image>" * 4 + "\nDescribe"
    assert recs[3]["images"][0] == b"" and recs[3]["image_names"][0].endswith(b"gone.jpg")
    out = decode_all(recs, "vlm")
    assert [sum(getattr(s, "vit", False) for s in o.segments) for o in out[:3]] == [1, 4, 2]
    assert out[3] == "missing_file"


def test_edit_builder(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    rows = {
        "image_list": [[jpeg(32, 32, (c, 0, 0)) for c in (10, 20, 30)], [jpeg(48, 32, (0, 9, 0))] * 2],
        "instruction_list": [[["make it red", "redden"], ["more red"]], [["edit me"]]],
    }
    pq.write_table(pa.table(rows), manual / "edits.parquet")
    common.build(edit.Edit, tmp_path / "data", manual)
    recs = read_all(tmp_path / "data", "edit")
    metas = sorted(json.loads(r["meta"])["instructions"] for r in recs)
    assert metas == [[["edit me"]], [["make it red", "redden"], ["more red"]]]
    for s in decode_all(recs, "edit"):
        assert s.segments[0].vae == "clean" and s.segments[0].vit and s.segments[-1].vae == "noised"


def test_interleaved_video_builder(tmp_path):
    manual = tmp_path / "manual"
    for k in range(10):
        write(str(manual / "clip0" / f"f{k}.jpg"), jpeg(32, 32, (k * 20, 0, 0)))
    write(str(manual / "x.jpg"), jpeg(32, 32, (0, 0, 0)))
    write(str(manual / "y.jpg"), jpeg(32, 32, (9, 9, 9)))
    lines = [
        {"frames": "clip0", "captions": [f"step {k}" for k in range(9)]},
        {"frames": ["x.jpg", "y.jpg"], "captions": ["it brightens"]},
    ]
    (manual / "v.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(interleaved_video.InterleavedVideo, tmp_path / "data", manual, max_frames=4)
    recs = sorted(read_all(tmp_path / "data", "interleaved_video"), key=lambda r: len(r["images"]))
    assert [len(r["images"]) for r in recs] == [2, 4]
    kept = json.loads(recs[1]["meta"])["captions"]  # frames 0, 3, 6, 9 kept: merged change captions
    assert kept == ["step 0 step 1 step 2", "step 3 step 4 step 5", "step 6 step 7 step 8"]
    s = decode_all(recs, "video")[1]
    assert [getattr(x, "vae", "text") for x in s.segments] == [
        "clean",
        "text",
        "noised+clean",
        "text",
        "noised+clean",
        "text",
        "noised",
    ]


def test_interleaved_web_builder(tmp_path):
    manual = tmp_path / "manual"
    write(str(manual / "img" / "1.jpg"), jpeg(32, 32, (1, 1, 1)))
    write(str(manual / "img" / "2.jpg"), jpeg(32, 32, (2, 2, 2)))
    lines = [
        {"texts": ["Intro", None, "More", None], "images": [None, "img/1.jpg", None, "img/2.jpg"]},
        {"items": [{"image": "img/2.jpg"}, {"text": "Caption"}]},
    ]
    (manual / "web.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(interleaved_web.InterleavedWeb, tmp_path / "data", manual)
    recs = sorted(read_all(tmp_path / "data", "interleaved_web"), key=lambda r: -len(r["images"]))
    assert json.loads(recs[0]["meta"])["items"] == [{"text": "Intro"}, {"image": 0}, {"text": "More"}, {"image": 1}]
    assert recs[0]["images"][1] == open(manual / "img" / "2.jpg", "rb").read()
    first, second = decode_all(recs, "web")
    assert [getattr(x, "vae", "text") for x in first.segments] == ["text", "noised+clean", "text", "noised"]
    assert [getattr(x, "vae", "text") for x in second.segments] == ["clean", "text"]


def _files(d):
    out = {}
    for p in sorted(glob.glob(os.path.join(d, "synthetic_shapes", "**", "*"), recursive=True)):
        if os.path.isfile(p) and (".array_record" in p or p.endswith(".model")):
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_shapes_are_byte_identical_for_a_seed(tmp_path):
    a = synthetic_shapes.build(tmp_path / "a", num_examples=6, seed=5)
    synthetic_shapes.main([f"--data_dir={tmp_path / 'b'}", "--num_examples=6", "--seed=5"])  # the CLI
    c = synthetic_shapes.build(tmp_path / "c", num_examples=6, seed=6)
    fa, fb, fc = _files(a), _files(str(tmp_path / "b")), _files(c)
    assert len(fa) == len(synthetic_shapes.SPLITS) + 1 and fa == fb
    assert all(fa[k] != fc[k] for k in fa if ".array_record" in k)
    with pytest.raises(ValueError, match="holds shapes built with"):
        synthetic_shapes.build(tmp_path / "a", num_examples=7, seed=5)


def test_shapes_read_back_into_documents():
    d = shapes_dir()
    tok = load_tokenizer(synthetic_shapes.tokenizer_path(d))
    assert tok.vocab_size <= 512
    layout = LayoutConfig(
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        vision_start_id=tok.vision_start_id,
        vision_end_id=tok.vision_end_id,
        vit_max_patches_per_side=8,
        max_latent_size=8,
        vae_pad_hw=(64, 64),
    )
    rng = np.random.default_rng(0)
    for kind in KINDS:
        recs = read_all(d, f"synthetic_shapes:{kind}")
        assert len(recs) == SHAPES_EXAMPLES
        dec = RecordDecoder(kind, tok, ResizeRule(64, 32, 16), ResizeRule(112, 56, 14))
        for r in recs[:10]:
            doc = build_document(dec(r, rng), layout, rng)
            assert doc.num_tokens > 0 and (doc.und_text < tok.vocab_size).all()
    with pytest.raises(FileNotFoundError, match="no built dataset 'nothing'"):
        common.open_source(d, "nothing:train")
    with pytest.raises(ValueError, match="no split 'train'"):
        common.open_source(d, "synthetic_shapes")


def test_square_shapes_keep_the_scenes_and_the_data_dir_check(tmp_path):
    """``square``: every image is width = height; scenes (objects, captions) are those of the default stream only
    where the size draw does not shift them, so the option is part of the data dir's identity."""
    gen, sq = synthetic_shapes.Generator(3), synthetic_shapes.Generator(3, square=True)
    for i in range(20):
        objs, w, h = sq.t2i_scene(i)
        assert w == h and 64 <= w <= 96
        assert objs == gen.t2i_scene(i)[0]  # the objects are drawn before the size
        for split in ("vlm", "edit"):
            ex = sq.example(split, i)
            for png in ex["images"]:
                w, h = PILImage.open(io.BytesIO(png)).size
                assert w == h
    synthetic_shapes.build(tmp_path / "sq", num_examples=4, seed=5, square=True)
    with pytest.raises(ValueError, match="holds shapes built with"):
        synthetic_shapes.build(tmp_path / "sq", num_examples=4, seed=5)
    plain = synthetic_shapes.build(tmp_path / "plain", num_examples=4, seed=5)
    meta = os.path.join(common.dataset_dir(plain, "synthetic_shapes"), "metadata.json")
    old = json.load(open(meta))
    del old["square"]  # a data dir built before the option existed still matches the default
    json.dump(old, open(meta, "w"))
    synthetic_shapes.build(tmp_path / "plain", num_examples=4, seed=5)


def _question_kinds(gen, n):
    kinds = collections.Counter()
    for i in range(n):
        for turn in json.loads(gen.example("vlm", i)["meta"])["conversations"]:
            v = turn["value"]
            if turn["from"] == "human" and v != synthetic_shapes.DESCRIBE:
                kinds["count" if "How many" in v else "colour" if "colour" in v else "position"] += 1
    return kinds


def test_shapes_question_weights_draw_the_vlm_question_kinds(tmp_path):
    """Equal weights are the uniform stream (same data, same data dir); 3 : 1 : 1 makes 3 in 5 questions count ones
    and keeps the scenes; the weights are part of the data dir's identity; bad weights raise one line."""
    uniform, equal = synthetic_shapes.Generator(2), synthetic_shapes.Generator(2, question_weights=(2, 2, 2))
    counted = synthetic_shapes.Generator(2, question_weights=(3, 1, 1))
    assert all(uniform.example("vlm", i) == equal.example("vlm", i) for i in range(10))
    assert all(counted.example("t2i", i) == uniform.example("t2i", i) for i in range(10))
    n = _question_kinds(uniform, 600)
    c = _question_kinds(counted, 600)
    total = sum(c.values())
    assert abs(n["count"] / sum(n.values()) - 1 / 3) < 0.04
    assert abs(c["count"] / total - 0.6) < 0.04 and abs(c["colour"] / total - 0.2) < 0.04
    synthetic_shapes.build(tmp_path / "u", num_examples=3, seed=5)
    synthetic_shapes.build(tmp_path / "u", num_examples=3, seed=5, question_weights=(1, 1, 1))  # same data
    with pytest.raises(ValueError, match="holds shapes built with"):
        synthetic_shapes.build(tmp_path / "u", num_examples=3, seed=5, question_weights=(3, 1, 1))
    synthetic_shapes.main([f"--data_dir={tmp_path / 'w'}", "--num_examples=3", "--seed=5", "--question_weights=3,1,1"])
    synthetic_shapes.build(tmp_path / "w", num_examples=3, seed=5, question_weights=(0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="holds shapes built with"):
        synthetic_shapes.build(tmp_path / "w", num_examples=3, seed=5)
    with pytest.raises(SystemExit) as e:  # argparse: one usage line, exit 2
        synthetic_shapes.main([f"--data_dir={tmp_path / 'x'}", "--question_weights=2,x,1"])
    assert e.value.code == 2
    for bad in ((1, 1), (0, 0, 0), (-1, 1, 1), (float("nan"), 1, 1)):
        with pytest.raises(ValueError, match="question weights must be"):
            synthetic_shapes.Generator(0, question_weights=bad)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_builders_skip_bad_lines_and_rows_naming_them(tmp_path, caplog):
    """One bad line / row / file never aborts a build: it is skipped, named file:line, and counted by reason in a
    summary; the records keep their source (file:line) for training-time messages."""
    caplog.set_level("WARNING")
    manual = tmp_path / "vlm"
    write(str(manual / "sub" / "a.jpg"), jpeg(40, 40, (1, 2, 3)))
    good = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    lines = [
        json.dumps(good).encode(),
        b'{"image": "a.jpg", "conversations": [',  # line 2: not JSON
        b"[1, 2, 3]",  # line 3: not an object
        json.dumps({**good, "conversations": [{"from": "human", "value": None}]}).encode(),  # 4: value null
        json.dumps({**good, "image": 5}).encode(),  # line 5: an image path that is a number
        json.dumps({**good, "conversations": "hello"}).encode(),  # line 6
        b'{"image": "a.jpg", "conversations": [{"from": "gpt", "value": "\xff\xfe"}]}',  # line 7: not UTF-8
        b"",  # line 8: blank lines are fine
        json.dumps({**good, "image": "gone.jpg"}).encode(),  # line 9: kept, missing image
        json.dumps({**good, "conversations": [{"from": "gpt", "value": "\ud800 x"}]}).encode(),
    ]  # 10: kept
    (manual / "sub" / "d.jsonl").write_bytes(b"\n".join(lines))
    common.build(vlm_sft.VlmSft, tmp_path / "data", manual)
    recs = read_all(tmp_path / "data", "vlm_sft")
    assert sorted(r["source"].decode() for r in recs) == ["sub/d.jsonl:1", "sub/d.jsonl:10", "sub/d.jsonl:9"]
    logged = "\n".join(_warnings(caplog))
    for where, needle in [
        (2, "not_json"),
        (3, "a line must be a JSON object, got list"),
        (4, "'conversations[0].value' is null, expected a string"),
        (5, "'image' is int 5"),
        (6, "'conversations' is str"),
        (7, "not_json"),
    ]:
        assert any(f"sub/d.jsonl:{where}:" in m and needle in m for m in _warnings(caplog)), (where, logged)
    assert "vlm_sft: wrote 3 records; skipped 6 (not_json 2, bad_row 4); 1 missing images kept" in logged

    caplog.clear()
    manual = tmp_path / "t2i"
    manual.mkdir()
    img = jpeg(32, 32, (0, 0, 255))
    caps = ['["a blue box"]', "{not json", "5", '{"a": null}', '["ok"]']
    pq.write_table(pa.table({"image": [img, img, img, img, None], "captions": caps}), manual / "p.parquet")
    pq.write_table(pa.table({"picture": [img], "caption": ["x"]}), manual / "no_image_column.parquet")
    (manual / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    common.build(t2i.T2i, tmp_path / "data", manual)
    recs = read_all(tmp_path / "data", "t2i")
    assert sorted(r["source"].decode() for r in recs) == ["p.parquet:row 0", "p.parquet:row 4"]
    logged = "\n".join(_warnings(caplog))
    for needle in [
        "p.parquet:row 1: 'captions' is not JSON",
        "p.parquet:row 2: 'captions' is int 5",
        "p.parquet:row 3: 'captions.a' is null",
        "no_image_column.parquet: no column image",
        "corrupt.parquet: unreadable",
    ]:
        assert needle in logged, (needle, logged)
    assert "t2i: wrote 2 records; skipped 5 (unreadable_file 2, not_json 1, bad_row 2); 1 missing images" in logged

    bad = tmp_path / "all_bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text("{oops\n[]\n")
    with pytest.raises(ValueError, match="no usable records under manual_dir .*skipped 2 \\(not_json 1, bad_row 1\\)"):
        common.build(interleaved_web.InterleavedWeb, tmp_path / "data2", bad)


def test_video_edit_web_builders_skip_rows_of_the_wrong_shape(tmp_path, caplog):
    caplog.set_level("WARNING")
    manual = tmp_path / "video"
    for k in range(3):
        write(str(manual / f"f{k}.jpg"), jpeg(32, 32, (k * 50, 0, 0)))
    lines = [
        {"frames": ["f0.jpg", "f1.jpg", "f2.jpg"], "captions": ["a", "b"]},
        {"frames": ["f0.jpg", "f1.jpg", "f2.jpg"], "captions": ["a"]},  # 2: too few captions
        {"frames": 5, "captions": []},  # 3
        {"captions": ["a"]},
    ]  # 4: no frames
    (manual / "v.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(interleaved_video.InterleavedVideo, tmp_path / "data", manual)
    assert [r["source"] for r in read_all(tmp_path / "data", "interleaved_video")] == [b"v.jsonl:1"]
    logged = "\n".join(_warnings(caplog))
    assert "v.jsonl:2: 'captions' has 1 entries for 3 frames" in logged and "v.jsonl:3: 'frames' is int 5" in logged
    assert "v.jsonl:4: 'frames' is null" in logged

    manual = tmp_path / "web"
    write(str(manual / "1.jpg"), jpeg(32, 32, (1, 1, 1)))
    lines = [
        {"items": [{"text": "hi"}, {"image": "1.jpg"}]},
        {"texts": ["a", None], "images": [None]},
        {"items": [{"text": 3}]},
        {"items": "nope"},
    ]
    (manual / "w.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(interleaved_web.InterleavedWeb, tmp_path / "data", manual)
    assert [r["source"] for r in read_all(tmp_path / "data", "interleaved_web")] == [b"w.jsonl:1"]
    logged = "\n".join(_warnings(caplog))
    assert "w.jsonl:2: texts (2) and images (1) must be aligned" in logged and "w.jsonl:3: 'text' is int 3" in logged

    manual = tmp_path / "edit"
    manual.mkdir()
    two = [jpeg(32, 32, (0, 9, 0))] * 2
    pq.write_table(
        pa.table({"image_list": [two, two, [two[0], None]], "instruction_list": [[["fine"]], [], [["ok"]]]}),
        manual / "e.parquet",
    )
    pq.write_table(pa.table({"image_list": [two], "instruction_list": ["make it red"]}), manual / "f.parquet")
    common.build(edit.Edit, tmp_path / "data", manual)
    assert sorted(r["source"] for r in read_all(tmp_path / "data", "edit")) == [b"e.parquet:row 0", b"e.parquet:row 2"]
    logged = "\n".join(_warnings(caplog))
    assert "e.parquet:row 1: 'instructions' has 0 steps for 2 images" in logged
    assert "f.parquet:row 0: 'instruction_list' is str" in logged
    assert "edit: wrote 2 records; skipped 2 (bad_row 2); 1 missing images kept" in logged
