"""The tiny future-frame task: moving-shapes clips (data), their future-frame samples, and the detector scorer."""

import json

import numpy as np
import pytest

from bagel_jax.batch import KIND_NOISED_VAE as N
from bagel_jax.config import ConfigError
from bagel_jax.data.builders import common, moving_shapes
from bagel_jax.data.builders.synthetic_shapes import MOVES, render
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.records import RecordDecoder
from bagel_jax.data.sample import Video, build_document
from bagel_jax.eval import future_frame, runner
from test_data_sample import LAYOUT, WordTokenizer


def test_clips_move_every_shape_one_cell_per_frame():
    for i in range(300):
        clip = moving_shapes.draw_clip(np.random.default_rng(i), 3)
        for j, move in enumerate(clip.moves):
            cells = [f[j].cell for f in clip.frames]
            (r0, c0), (r1, c1), (r2, c2) = (divmod(c, 3) for c in cells)
            assert (r1 - r0, c1 - c0) == (r2 - r1, c2 - c1) == MOVES[move]
            assert all(
                f[j].shape == clip.frames[0][j].shape and f[j].color == clip.frames[0][j].color for f in clip.frames
            )
        assert all(len({o.cell for o in f}) == len(f) for f in clip.frames)  # never two shapes in one cell
        assert clip.caption.count(" moves ") == len(clip.moves)
    with pytest.raises(ValueError, match="2 or 3"):
        moving_shapes.draw_clip(np.random.default_rng(0), 4)


def test_moving_shapes_records_become_future_frame_samples(tmp_path):
    common.build(moving_shapes.MovingShapes, tmp_path, num_examples=6)
    src = common.open_source(str(tmp_path), "moving_shapes")
    dec = RecordDecoder("video", WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    rng = np.random.default_rng(0)
    for i in range(len(src)):
        rec = src[i]
        meta = json.loads(rec["meta"])
        n = len(rec["images"])
        assert meta["frame_indexes"] == list(range(n)) and len(meta["captions"]) == n - 1
        sample = dec(rec, rng, key=i)
        assert isinstance(sample.segments[0], Video) and sample.segments[0].vae == "clean"
        assert isinstance(sample.segments[-1], Video) and sample.segments[-1].vae == "noised"
        doc = build_document(sample, LAYOUT, rng)
        assert doc.split_modes[-1] == "noise" and (doc.gen_kind == N).any()


def test_moving_shapes_num_frames_fixes_every_clip_length(tmp_path):
    common.build(moving_shapes.MovingShapes, tmp_path, num_examples=8, num_frames=3)
    src = common.open_source(str(tmp_path), "moving_shapes")
    assert [len(src[i]["images"]) for i in range(len(src))] == [3] * 8
    with pytest.raises(ValueError, match="num_frames: 2 or 3"):
        moving_shapes.MovingShapes(num_frames=4, data_dir=str(tmp_path / "x"))


def test_scorer_gives_one_to_the_truth_and_zero_to_copies_and_blanks():
    ev = future_frame.ShapesFutureFrame(num_examples=12, seed=3)
    truth = {id(c): c for c in ev.examples}

    def oracle(frames, indexes, caption, seed):
        clip = next(c for c in truth.values() if c.caption == caption and np.array_equal(c.render(0), frames[0]))
        assert indexes == [0, 1] and len(frames) == 2
        return clip.render(2)

    assert ev.run(oracle) == {"next_frame": 1.0, "objects": 1.0, "copy_baseline": 0.0}
    copy = ev.run(lambda frames, indexes, caption, seed: frames[-1])
    assert copy["next_frame"] == 0.0 and copy["objects"] == 0.0
    blank = ev.run(lambda frames, indexes, caption, seed: np.asarray(render([], 80, 80)))
    assert blank == {"next_frame": 0.0, "objects": 0.0, "copy_baseline": 0.0}
    # one shape right of two: objects counts it, next_frame does not
    two = next(c for c in ev.examples if len(c.moves) == 2)
    half = future_frame.judge(two, [two.frames[2][0], two.frames[1][1]])
    assert half == (False, 1)


def test_runner_scores_the_ground_truth_one_and_refuses_no_examples():
    evaluators = runner.build_evaluators({"future": dict(type="shapes_future_frame", num_examples=6, every=500)})
    assert [s for s in range(1, 1501) if evaluators["future"].due(s)] == [500, 1000, 1500]
    fns = runner.ground_truth_fns(None, evaluators)
    m = runner.run_evals(evaluators, future_fn=fns["future_fn"])
    assert {k: v for k, v in m.items() if k != "future/seconds"} == {
        "future/next_frame": 1.0,
        "future/objects": 1.0,
        "future/copy_baseline": 0.0,
    }
    with pytest.raises(ValueError, match="evals.future: shapes_future_frame needs future_fn"):
        runner.run_evals(evaluators, generate_fn=fns["generate_fn"])
    with pytest.raises(ConfigError, match=r"^evals.x.num_examples: must be >= 1, got 0$"):
        runner.build_evaluators({"x": dict(type="shapes_future_frame", num_examples=0)})


@pytest.mark.slow
def test_inferencer_future_fn_runs_on_a_random_tiny_model():
    """Smoke: the next frame is generated after a clip context laid out like training (a random model scores ~0)."""
    import bagel_testlib as lib
    from bagel_jax.infer.api import Inferencer

    config, _, params, model = lib.tiny_setup()
    tok = lib.CharTokenizer()
    tok.vocab_size = 512
    inf = Inferencer(model, params, tok, config.data, cached=False)
    fn = future_frame.inferencer_future_fn(inf, num_timesteps=2)
    ev = future_frame.ShapesFutureFrame(num_examples=2, min_px=32, max_px=32)
    frame = fn([c.render(0) for c in ev.examples[:1]] * 2, [0, 1], ev.examples[0].caption, 0)
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    scores = ev.run(fn)
    assert set(scores) == {"next_frame", "objects", "copy_baseline"} and 0 <= scores["objects"] <= 1
