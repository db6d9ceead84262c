"""A folder of good and bad video files (mp4, webm, mkv) is built into vlm_sft and interleaved_video records: every
bad file is skipped and counted by reason with its name logged, and the tiny model (one layer) trains 20 steps on
the result (video future-frame samples + VLM video SFT)."""

import json

import numpy as np
import pytest

from bagel_jax.data.builders import common, interleaved_video, synthetic_shapes, vlm_sft
from configs_util import shipped_config
from data_fixtures import bad_videos, moving_square_frames, shapes_dir, write_video


def write_manual(root):
    """Good and bad videos with a jsonl for each builder; returns the bad files' reasons."""
    v = root / "video"
    write_video(v / "two_shots.mp4", moving_square_frames(40, shots=2))  # 2 clips (a cut at 20)
    write_video(v / "captioned.webm", moving_square_frames(20), "libvpx-vp9")
    write_video(v / "plain.mkv", moving_square_frames(20))
    bad = bad_videos(v, v / "plain.mkv")
    lines = [
        {"video": "two_shots.mp4", "duration": 4.0},
        {"video": "captioned.webm", "times": [0.0, 0.5, 1.0], "captions": ["it moves right", "it moves right"]},
        {"video": "plain.mkv"},
        {"video": "plain.mkv", "duration": 9.0},  # the index is wrong: the file has 2 s
        *({"video": name} for name in bad),
    ]
    (v / "v.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    q = root / "vlm"
    write_video(q / "a.mp4", moving_square_frames(30))
    write_video(q / "b.webm", moving_square_frames(24), "libvpx-vp9")
    (q / "truncated.mkv").write_bytes((v / "truncated.mkv").read_bytes())
    turns = [{"from": "human", "value": "<video>\nwhat moves"}, {"from": "gpt", "value": "the white square"}]
    lines = [{"video": f, "conversations": turns} for f in ("a.mp4", "b.webm", "truncated.mkv")]
    (q / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return bad | {"plain.mkv": "wrong_duration"}


@pytest.mark.slow
def test_video_build_counts_bad_files_and_trains(tmp_path, caplog):
    caplog.set_level("WARNING")
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    bad = write_manual(manual)
    common.build(interleaved_video.InterleavedVideo, data_dir, manual / "video", max_frames=4)
    common.build(vlm_sft.VlmSft, data_dir, manual / "vlm", max_frames=4, min_frames=3)
    messages = [r.getMessage() for r in caplog.records]
    built = [m for m in messages if ": wrote " in m]
    assert built[0].startswith(
        "interleaved_video: wrote 4 records; skipped 6 (undecodable_video 2, no_frames 1, unsupported_codec 1, "
        "video_too_large 1, wrong_duration 1)"
    ), built
    assert built[1].startswith("vlm_sft: wrote 2 records; skipped 1 (undecodable_video 1)"), built
    for name, reason in bad.items():  # each bad file named under its reason
        assert any(f"({reason}): v.jsonl:" in m and name in m for m in messages), (name, reason, messages)
    metas = [json.loads(r["meta"]) for r in _read(data_dir, "interleaved_video")]
    assert sorted((m["frame_indexes"], m["captions"]) for m in metas) == [
        ([0, 5, 10], ["it moves right", "it moves right"]),  # captioned.webm at 0, 0.5, 1 s
        ([2, 7, 12, 17], []),  # plain.mkv (20 frames, one shot) or two_shots.mp4's first shot: "middle" sampling
        ([2, 7, 12, 17], []),
        ([22, 27, 32, 37], []),  # two_shots.mp4's second shot (the cut at frame 20)
    ]

    import jax

    from bagel_jax.train.train import train

    c = shipped_config("tiny_shapes")
    c.data.update(
        builder="",
        data_dir=str(data_dir),
        synthetic_examples=0,
        tokenizer=synthetic_shapes.tokenizer_path(shapes_dir()),
        num_workers=0,  # tests/test_train_on_bad_data.py covers grain workers; here the video data is under test
        pack_buffer=8,
        mixture=dict(t2i=0.0, vlm=1.0, edit=0.0, video=1.0, web=0.0),
    )
    c.data.sources.update(vlm="vlm_sft", video="interleaved_video")
    c.train.update(steps=20, log_every=10, checkpoint_every=20)
    c.model.update(num_layers=1)
    c.model.vit.update(num_layers=1)
    c.parallel.update(data=1)
    train(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "ce" in r]
    assert [r["step"] for r in rows] == [10, 20]
    assert all(np.isfinite(r["ce"]) and np.isfinite(r["mse"]) for r in rows), rows
    assert all(v == 0 for k, v in rows[-1].items() if k.startswith("data/skipped/")), rows[-1]


def _read(data_dir, name):
    src = common.open_source(str(data_dir), name)
    return [src[i] for i in range(len(src))]
