"""Bad data never crashes training: user files with 30+ kinds of bad lines, rows, files, fields and images, mixed
with good ones, are built (the builders skip and report what they cannot use) and trained on for 30 steps of the
tiny model (one layer) with two grain workers. The run ends normally and every bad record is counted by reason in the
metrics (~47 CPU-seconds, most of it compiling)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bad_data import bad_images, encode, good_images
from bagel_jax.data.builders import common, edit, interleaved_video, synthetic_shapes, t2i, vlm_sft
from bagel_jax.data.pipeline import make_train_iterator
from bagel_jax.data.skips import SKIP_REASONS
from configs_util import shipped_config
from data_fixtures import shapes_dir

MAX_INPUT_PIXELS = 200_000
LONG = " ".join(["the red circle moves left"] * 90)  # more und tokens than a row holds (und_len 384)


def png(w=48, h=40, color=(200, 30, 30)):
    return encode(Image.new("RGB", (w, h), color))


class RawRecords(common.RecordBuilder):
    """Records stored as given, unchecked: data written by another tool, or by an older version of the builders."""

    RECORDS: list = []

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from ((str(i), r) for i, r in enumerate(self.RECORDS))


def raw(kind, meta, images=(), source=""):
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return {"kind": kind, "meta": text, "images": list(images), "image_names": [""] * len(images), "source": source}


def build_all(manual, data_dir):
    """Writes the user files, builds every dataset; returns the skips each record must get per epoch of training."""
    good, bad = good_images(), {k: v for k, (v, _) in bad_images().items()}
    # t2i parquet: 10 good rows (awkward encodings included), 7 rows training skips, 3 the builder skips, 2 bad files
    rows = [
        (data, '["a red circle"]')
        for data in [
            png(),
            *(
                good[k]
                for k in (
                    "jpeg",
                    "gray16_png",
                    "cmyk_jpeg",
                    "palette_transparent_png",
                    "la_png",
                    "exif_rotated_jpeg",
                    "animated_gif",
                    "animated_png",
                    "webp",
                )
            ),
        ]
    ]
    rows += [
        (bad["text"], '["a red circle"]'),
        (bad["truncated_png"], '["a blue square"]'),
        (bad["zero_width_png"], '["a red circle"]'),
        (bad["bomb_225mpx_png"], '["a red circle"]'),
        (png(500, 500), '["a red circle"]'),
        (None, '["a red circle"]'),
        (png(), '["   "]'),
        (png(), "{not json"),
        (png(), "5"),
        (png(), '{"a": null}'),
    ]
    (manual / "t2i").mkdir(parents=True)
    pq.write_table(
        pa.table({"image": [r[0] for r in rows], "captions": [r[1] for r in rows]}), manual / "t2i" / "part0.parquet"
    )
    (manual / "t2i" / "corrupt.parquet").write_bytes(b"PAR1 not really a parquet file PAR1")
    pq.write_table(pa.table({"picture": [png()], "caption": ["x"]}), manual / "t2i" / "no_image.parquet")
    # vlm jsonl: 3 good lines, 3 training skips, 5 builder skips
    (manual / "vlm" / "images").mkdir(parents=True)
    (manual / "vlm" / "images" / "a.png").write_bytes(png(56, 56))
    (manual / "vlm" / "images" / "page.png").write_bytes(bad["html"])
    qa = lambda q, a: [{"from": "human", "value": f"<image>{q}"}, {"from": "gpt", "value": a}]  # noqa: E731
    lines = [json.dumps({"image": "a.png", "conversations": qa("What colour is the circle?", "It is red.")})] * 3
    lines += [
        json.dumps({"image": "a.png", "conversations": qa("What colour?", "")[:1]}),  # no_loss
        json.dumps({"image": "gone.png", "conversations": qa("What?", "A circle.")}),  # missing_file
        json.dumps({"image": "page.png", "conversations": qa("What?", "A circle.")}),  # undecodable_image
        '{"image": "a.png", "conversations": [',
        '{"image": "a.png", "x": "\xff"}',  # not_json x2
        json.dumps({"image": "a.png", "conversations": [{"from": "human", "value": None}]}),
        json.dumps({"image": "a.png", "conversations": [{"from": "system", "value": "hi"}]}),
        json.dumps({"image": 5, "conversations": qa("What?", "A circle.")}),
    ]
    (manual / "vlm" / "a.jsonl").write_bytes(
        b"\n".join(line.encode("latin-1") if "\xff" in line else line.encode() for line in lines)
    )
    # edit parquet: 3 good rows, 2 training skips, 1 builder skip
    two = [png(), png(color=(30, 200, 30))]
    (manual / "edit").mkdir()
    pq.write_table(
        pa.table(
            {
                "image_list": [two] * 3 + [two, [bad["truncated_png"], two[1]], two],
                "instruction_list": [[["make it green"]]] * 3 + [[["   "]], [["make it green"]], []],
            }
        ),
        manual / "edit" / "e.parquet",
    )
    # video jsonl: 3 good clips, 1 training skip (too long), 2 builder skips
    (manual / "video").mkdir()
    for k in range(3):
        (manual / "video" / f"f{k}.png").write_bytes(png(color=(k * 80, 0, 0)))
    frames = ["f0.png", "f1.png", "f2.png"]
    clips = [{"frames": frames, "captions": ["the circle moves left", "the circle moves up"]}] * 3
    clips += [
        {"frames": frames[:2], "captions": [LONG]},
        {"frames": frames, "captions": ["one"]},
        {"frames": 5, "captions": []},
    ]
    (manual / "video" / "v.jsonl").write_text("\n".join(json.dumps(c) for c in clips))
    # web: records written unchecked (as older data): 3 good, 7 training skips
    doc = {"items": [{"text": "Here is a picture of some shapes."}, {"image": 0}, {"text": "That is all."}]}
    RawRecords.RECORDS = [raw("web", doc, [png()], f"web.jsonl:{i}") for i in (1, 2, 3)] + [
        raw("web", "{not json", [png()], "web.jsonl:4"),
        raw("web", "[1]", [png()], "web.jsonl:5"),
        raw("t2i", doc, [png()], "web.jsonl:6"),
        raw("web", {"items": 5}, [png()], "web.jsonl:7"),
        raw("web", {"items": [{"text": "a"}, {"image": 9}]}, [png()], "web.jsonl:8"),
        raw("web", {"items": [{"text": None}]}, [png()], "web.jsonl:9"),
        raw("web", {"items": [{"image": 0}]}, [png()], "web.jsonl:10"),
    ]
    for builder, sub in [
        (t2i.T2i, "t2i"),
        (vlm_sft.VlmSft, "vlm"),
        (edit.Edit, "edit"),
        (interleaved_video.InterleavedVideo, "video"),
    ]:
        common.build(builder, data_dir, manual / sub)
    common.build(RawRecords, data_dir)
    return dict(
        undecodable_image=5,
        image_too_large=2,
        missing_file=2,
        empty_text=3,
        no_loss=1,
        too_large=1,
        bad_record=3,
        bad_field=3,
    )


def config(data_dir):
    c = shipped_config("tiny_shapes")
    c.data.update(
        builder="",
        data_dir=str(data_dir),
        synthetic_examples=0,
        max_input_pixels=MAX_INPUT_PIXELS,
        tokenizer=synthetic_shapes.tokenizer_path(shapes_dir()),
        num_workers=2,
        pack_buffer=16,
        mixture=dict(t2i=1.0, vlm=1.0, edit=1.0, video=1.0, web=1.0),
    )
    c.data.sources.update(t2i="t2i", vlm="vlm_sft", edit="edit", video="interleaved_video", web="raw_records")
    c.train.update(steps=30, log_every=10, checkpoint_every=30)
    c.model.update(num_layers=1)  # cheaper to compile; the data path is what is under test
    c.model.vit.update(num_layers=1)
    return c


def test_bad_data_is_skipped_counted_and_training_finishes(tmp_path, caplog):
    caplog.set_level("WARNING")
    data_dir = tmp_path / "data"
    want = build_all(tmp_path / "manual", data_dir)
    built = [r.getMessage() for r in caplog.records if ": wrote " in r.getMessage()]
    assert built == [
        "t2i: wrote 17 records; skipped 5 (unreadable_file 2, not_json 1, bad_row 2); 1 missing images kept "
        "(training skips their records as missing_file)",
        "vlm_sft: wrote 6 records; skipped 5 (not_json 2, bad_row 3); 1 missing images kept "
        "(training skips their records as missing_file)",
        "edit: wrote 5 records; skipped 1 (bad_row 1); 0 missing images kept (training skips their records as "
        "missing_file)",
        "interleaved_video: wrote 4 records; skipped 2 (bad_row 2); 0 missing images kept (training skips their "
        "records as missing_file)",
    ], built
    c = config(data_dir)
    per_epoch = dict.fromkeys(SKIP_REASONS, 0) | want
    counted = dict.fromkeys(SKIP_REASONS, 0)
    for kind in c.data.mixture:  # one epoch of each source (a finite mixture stops at its first exhausted source)
        one = config(data_dir)
        one.data.mixture = {k: float(k == kind) for k in one.data.mixture}
        it = make_train_iterator(one, num_epochs=1, num_workers=0)
        for _ in it:
            pass
        counted = {r: counted[r] + n for r, n in it.skip_counts().items()}
    assert counted == per_epoch  # every bad record exactly once per epoch, under its reason

    caplog.clear()
    import jax

    from bagel_jax.train.train import train

    c.parallel.update(data=1)
    train(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "ce" in r]
    assert [r["step"] for r in rows] == [10, 20, 30] and all(np.isfinite(r["ce"]) for r in rows)
    last = rows[-1]
    for reason, n in per_epoch.items():  # 30 steps read every source at least once
        got = last[f"data/skipped/{reason}"]
        assert (got >= n) if n else (got == 0), (reason, got, n)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "bagel_jax.data")
    for needle in [
        "(no_loss): a.jsonl:4: no answer",
        "(missing_file): a.jsonl:5: image 0 (gone.png)",
        "(bad_field): web.jsonl:8: 'items[1].image' is int 9",
        "(too_large): v.jsonl:4: does not fit",
        "(image_too_large): part0.parquet:row 13: image 0: exceeds the limit max_input_pixels=200000",
    ]:
        assert needle in logged, (needle, logged)
