"""Video files: frame sampling (the reference's rule), decoding only the sampled frames, bad files with their
reasons, the shot rule, and the future-frame sample layout (``_add_video``: multi-frame splits, ``frame_delta`` RoPE
steps, one timestep per split) through packing, against the reference's dense mask."""

import json

import numpy as np
import pytest

from bagel_jax.batch import KIND_CLEAN_VAE as C
from bagel_jax.batch import KIND_NOISED_VAE as N
from bagel_jax.batch import KIND_TEXT as T
from bagel_jax.batch import KIND_VIT as V
from bagel_jax.data import video
from bagel_jax.data.images import ResizeRule
from bagel_jax.data.pack import Budgets, assemble
from bagel_jax.data.records import RecordDecoder
from bagel_jax.data.sample import build_document
from data_fixtures import bad_videos, check_rows, moving_square_frames, reference_dense_mask, write_video
from test_data_sample import LAYOUT, WordTokenizer, png

# --- frame sampling ------------------------------------------------------------------------------------------------


def test_frame_indices_hand_examples():
    rng = np.random.default_rng(0)
    # 100 frames, 4 intervals [0,25) [25,50) [50,75) [75,100): middle = (a + b - 1) // 2 with b - 1 the reference's end
    assert video.frame_indices(4, 100, rng, "middle") == [12, 37, 62, 87]
    assert video.frame_indices(4, 100, rng, "middle", fix_start=3) == [3, 28, 53, 78]
    # fewer frames than asked: one per frame, padded with the last
    assert video.frame_indices(5, 3, rng, "middle") == [0, 1, 2, 2, 2]
    # fps0.5 on a 10 s video at 10 fps: one frame per 2 s at the slot centres 1, 3, 5, 7, 9 s
    assert video.frame_indices(0, 100, rng, "fps0.5", input_fps=10) == [10, 30, 50, 70, 90]
    assert video.frame_indices(0, 100, rng, "fps0.5", input_fps=10, max_num_frames=2) == [10, 30]
    with pytest.raises(ValueError, match="fps<x>"):
        video.frame_indices(4, 10, rng, "every")


def test_rand_sampling_draws_one_frame_per_interval_like_the_reference():
    rng = np.random.default_rng(1)
    for vlen in (9, 10, 17, 40, 100, 301):
        for n in (1, 4, 8, 12):
            for _ in range(20):
                got = video.frame_indices(n, vlen, rng, "rand")
                assert len(got) == n
                k = min(n, vlen)
                edges = np.linspace(0, vlen, k + 1).astype(int)
                if all(b - 1 > a for a, b in zip(edges[:-1], edges[1:])):
                    # the reference draws random.choice(range(a, b - 1)): frame b - 1 is never taken
                    assert all(a <= g < b - 1 for g, a, b in zip(got, edges[:-1], edges[1:])), (vlen, n, got)
                else:  # an interval too short: k distinct random frames, sorted
                    assert got[:k] == sorted(set(got[:k])) and len(set(got[:k])) == k
                assert got[k:] == [got[k - 1]] * (n - k)


def test_frame_sampler_draws_8_to_12_frames():
    rng = np.random.default_rng(2)
    sampler = video.FrameSampler(max_num_frames=12, min_num_frames=8)
    counts = {len(sampler(500, rng)) for _ in range(200)}
    assert counts == set(range(8, 13))
    assert video.FrameSampler(max_num_frames=3, sample="fps1")(100, rng, fps=10) == [5, 15, 25]


# --- decoding ------------------------------------------------------------------------------------------------------

CONTAINERS = [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("mkv", "libx264")]


@pytest.mark.parametrize("ext,codec", CONTAINERS)
def test_sampled_frames_match_the_written_ones(tmp_path, ext, codec):
    frames = moving_square_frames(60)
    path = tmp_path / f"v.{ext}"
    write_video(path, frames, codec, fps=10, gop=12)
    info = video.probe(str(path))
    assert (info.num_frames, info.fps, info.width, info.height) == (60, 10.0, 64, 48)
    idx = video.frame_indices(5, 60, np.random.default_rng(0), "rand") + [3]
    stats = video.DecodeStats()
    got = video.read_frames(path.read_bytes(), idx, info, stats=stats)
    for g, i in zip(got, idx):
        assert g.shape == (48, 64, 3) and g.dtype == np.uint8
        err = np.abs(g.astype(int) - frames[i].astype(int)).mean()
        assert err < 4.0, (i, err)  # codec error; neighbouring frames differ by far more
        assert err < np.abs(g.astype(int) - frames[(i + 5) % 60].astype(int)).mean() / 3
    assert stats.decoded < 40, stats  # seeks to the key frame before each wanted frame, never decodes all 60


def test_bad_files_raise_with_their_reason(tmp_path):
    good = tmp_path / "good.mkv"
    write_video(good, moving_square_frames(30))
    for name, reason in bad_videos(tmp_path / "bad", good).items():
        with pytest.raises(video.VideoError) as e:
            info = video.probe(str(tmp_path / "bad" / name), name)
            video.read_frames(str(tmp_path / "bad" / name), [0, info.num_frames - 1], info, name)
        assert e.value.reason == reason and name in str(e.value), (name, e.value.reason, str(e.value))


def test_shot_rule_finds_the_cuts_and_agrees_with_pyscenedetect(tmp_path):
    frames = moving_square_frames(90, shots=3)  # cuts at 30 and 60
    path = tmp_path / "shots.mp4"
    write_video(path, frames)
    starts = video.shot_starts(video.shot_scores(str(path)))
    assert starts == [0, 30, 60]
    scenedetect = pytest.importorskip("scenedetect")
    scenes = scenedetect.detect(str(path), scenedetect.ContentDetector())
    assert [s.get_frames() for s, _ in scenes] == starts


# --- future-frame samples: the reference's _add_video layout -------------------------------------------------------


def reference_layout(plan):
    """The reference's ``pack_sequence`` (data/dataset_base.py) over plan items, for lengths and ids only:
    ``(split_lens, attn_modes, rope ids per token, timestep group per VAE image)``. Items: ``("text", n)``,
    ``("vit", n)``, ``("vae", n, loss, split_start, split_end, frame_delta or None)``; n = inner tokens."""
    split_lens, modes, pos, groups = [], [], [], []
    rope, group = 0, -1
    for item in plan:
        start, end = (item[3], item[4]) if item[0] == "vae" else (True, True)
        if start:
            cur = 0
        if item[0] == "text":
            n = item[1] + 2
            pos += list(range(rope, rope + n))
            rope += n
            modes.append("causal")
        elif item[0] == "vit":
            n = item[1] + 2
            pos += [rope] * n
            rope += 1
            modes.append("full")
        else:
            _, inner, loss, _, _, delta = item
            n = inner + 2
            if loss and start:
                group += 1  # np.random.randn() drawn at split_start only, reused by the split's other frames
            groups.append(group if loss else None)
            if start:
                modes.append("noise" if loss and delta is None else "full")
            pos += [rope] * n
            rope += delta if delta is not None else (0 if loss else 1)
        cur += n
        if end:
            split_lens.append(cur)
    return split_lens, modes, pos, groups


def video_plan(k, n, idx, text_len, lat, vit):
    """``_add_video`` items for k clean context frames (VAE then ViT), the text, and n - k noised targets."""
    plan = []
    for i in range(k):
        plan.append(("vae", lat, 0, i == 0, i == k - 1, idx[i + 1] - idx[i] if i < k - 1 else None))
    plan += [("vit", vit)] * k
    if text_len:
        plan.append(("text", text_len))
    for j, i in enumerate(range(k, n)):
        plan.append(("vae", lat, 1, j == 0, i == n - 1, idx[i + 1] - idx[i] if i < n - 1 else None))
    return plan


def clip_record(idx, captions):
    return {
        "kind": "video",
        "meta": json.dumps({"captions": captions, "frame_indexes": idx}),
        "images": [png(32, 32, (40 * i, 0, 0)) for i in range(len(idx))],
        "image_names": [f"v.mp4#frame{i}" for i in idx],
    }


class FixedK:
    """A real generator whose first ``integers`` draw (the number of context frames) is ``k``."""

    def __init__(self, k, seed=0):
        self.k, self.rng, self.first = k, np.random.default_rng(seed), True

    def integers(self, lo, hi=None):
        if self.first:
            self.first = False
            assert lo <= self.k < hi
            return self.k
        return self.rng.integers(lo, hi)

    def __getattr__(self, name):
        return getattr(self.rng, name)


@pytest.mark.parametrize(
    "idx,captions,k",
    [([0, 3, 5, 9], ["a b", "c", "d e f"], 2), ([0, 4, 8], [], 1), ([2, 3, 7, 12, 20], ["x"] * 4, 4)],
)
def test_future_frame_sample_follows_add_video(idx, captions, k):
    dec = RecordDecoder("video", WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))
    rng = FixedK(k)
    doc = build_document(dec(clip_record(idx, captions), rng, key=5), LAYOUT, rng)
    text_len = len(" ".join(captions[k - 1 :]).split()) if captions else 0
    ref_lens, ref_modes, ref_pos, groups = reference_layout(video_plan(k, len(idx), idx, text_len, 4, 4))
    # our one deviation: a multi-frame noised split stays a noise split (the reference's check marks it "full")
    ours_modes = list(ref_modes)
    ours_modes[-1] = "noise"
    assert doc.split_lens.tolist() == ref_lens
    assert list(doc.split_modes) == ours_modes
    assert doc.positions().tolist() == ref_pos
    img = [T, *[C] * 4, T]
    kinds = img * k + ([T] + [V] * 4 + [T]) * k + [T] * (text_len + 2 if text_len else 0)
    assert doc.kinds().tolist() == kinds + [T, *[N] * 4, T] * (len(idx) - k)
    # one timestep per noised split, shared by its frames; clean frames -inf
    ts = doc.vae_timestep
    assert np.isneginf(ts[:k]).all() and np.isfinite(ts[k:]).all() and len(set(ts[k:].tolist())) == 1
    assert len({g for g in groups if g is not None}) == 1
    # packed into a row: positions and the mask (oracle) equal the reference's dense mask with noise modes
    budgets = Budgets(
        seq_len=256, und_len=160, max_vit_patches=64, max_vae_images=8, vae_hw=(64, 64), vit_patch_dim=588
    )
    batch = assemble([[doc]], budgets)
    check_rows(batch, 160, 8, 8, docs_per_row=[[doc]])
    ref = reference_dense_mask(ref_lens, ours_modes)
    later = sum(ref_lens[:-1])
    assert not ref[:later, later:].any()  # nothing before the targets sees them
    np.testing.assert_array_equal(batch["vae_timestep"][0][: len(idx)], ts)


@pytest.mark.parametrize(
    "idx,captions,k,start",
    [
        ([0, 1, 2], ["a b", "a b"], 2, 0),  # the moving-shapes eval: 2 context frames -> frame 3
        ([0, 3, 5, 9, 10], ["a", "b c", "d", "e f g"], 2, 2),  # a window inside a longer clip
        ([2, 3, 7, 12], [], 1, 1),
        ([0, 4], ["x"], 3, 0),  # a clip of n <= k frames: its n - 1 frames -> its last
    ],
)
def test_future_context_frames_make_k_context_frames_and_one_target(idx, captions, k, start):
    dec = RecordDecoder(
        "video", WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14), future_context_frames=k
    )
    rec = clip_record(idx, captions)
    sample = dec(rec, FixedK(start), key=5)
    k = min(k, len(idx) - 1)
    win = idx[start : start + k + 1]
    context, target = sample.segments[0], sample.segments[-1]
    assert list(context.frame_indexes) == win[:k] and list(target.frame_indexes) == win[k:]
    # the pixels are the window's frames (frame i is coloured 40 * i): all frames from the default split at k=1
    every = RecordDecoder("video", WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14))(rec, FixedK(1))
    frames = list(every.segments[0].vae_pixels) + list(every.segments[-1].vae_pixels)
    for got, want in zip(list(context.vae_pixels) + list(target.vae_pixels), frames[start : start + k + 1]):
        np.testing.assert_array_equal(got, want)
    # the layout is the reference's _add_video for the window alone: k clean frames, the one caption into the target
    rng = np.random.default_rng(0)
    doc = build_document(dec(rec, FixedK(start), key=5), LAYOUT, rng)
    text_len = len(captions[start + k - 1].split()) if captions else 0
    ref_lens, ref_modes, ref_pos, _ = reference_layout(video_plan(k, k + 1, win, text_len, 4, 4))
    assert doc.split_lens.tolist() == ref_lens and list(doc.split_modes) == ref_modes
    assert doc.positions().tolist() == ref_pos
    assert (doc.kinds() == N).sum() == 4 and np.isfinite(doc.vae_timestep).sum() == 1


def test_future_context_frames_must_be_a_count():
    with pytest.raises(ValueError, match="future_context_frames: must be an int >= 0, got -1"):
        RecordDecoder(
            "video", WordTokenizer(), ResizeRule(48, 32, 16), ResizeRule(42, 28, 14), future_context_frames=-1
        )


# --- VLM video SFT ---------------------------------------------------------------------------------------------------


def test_vlm_sft_video_files_expand_video_and_share_the_pixel_budget(tmp_path):
    from bagel_jax.data.builders import common, vlm_sft

    write_video(tmp_path / "m" / "a.mp4", moving_square_frames(40))
    write_video(tmp_path / "m" / "b.webm", moving_square_frames(30), "libvpx-vp9")
    turns = [{"from": "human", "value": "<video>\nwhat moves"}, {"from": "gpt", "value": "a square"}]
    lines = [
        {"video": "a.mp4", "conversations": turns},
        {"video": "b.webm", "conversations": turns},
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    (tmp_path / "m" / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(vlm_sft.VlmSft, tmp_path / "d", tmp_path / "m")  # the reference's 8-12 frames, rand
    src = common.open_source(str(tmp_path / "d"), "vlm_sft")
    assert len(src) == 2  # the line without <video> is skipped (bad_row), like the reference
    rule = ResizeRule(980, 378, 14, 400_000)
    dec = RecordDecoder("vlm", WordTokenizer(), ResizeRule(64, 32, 16), rule)
    for i in range(2):
        rec = src[i]
        n = len(rec["images"])
        assert 8 <= n <= 12
        assert json.loads(rec["meta"])["conversations"][0]["value"] == "<image>" * n + "\nwhat moves"
        frames = [int(name.decode().rsplit("#frame", 1)[1]) for name in rec["image_names"]]
        total = 40 if rec["image_names"][0].startswith(b"a.mp4") else 30
        edges = np.linspace(0, total, n + 1).astype(int)
        assert all(a <= f < b for f, a, b in zip(frames, edges[:-1], edges[1:])), frames  # one per interval
        vit = [s.vit_pixels for s in dec(rec, np.random.default_rng(0)).segments if not hasattr(s, "ids")]
        assert len(vit) == n and len({v.shape for v in vit}) == 1
        h, w = vit[0].shape[:2]
        assert (w, h) == rule.target_size(64, 48, img_num=n) and w * h <= 400_000 / n < 504 * 378


def test_vlm_sft_fps_sampling_and_a_clip_too_short_for_it(tmp_path, caplog):
    from bagel_jax.data.builders import common, vlm_sft

    write_video(tmp_path / "m" / "a.mp4", moving_square_frames(40))  # 4 s at 10 fps
    write_video(tmp_path / "m" / "short.mp4", moving_square_frames(3))  # 0.3 s
    turns = [{"from": "human", "value": "<video>what"}, {"from": "gpt", "value": "a square"}]
    lines = [{"video": v, "conversations": turns} for v in ("a.mp4", "short.mp4")]
    (tmp_path / "m" / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common.build(vlm_sft.VlmSft, tmp_path / "d", tmp_path / "m", frame_sample="fps0.5", max_frames=12)
    (rec,) = [r for r in common.open_source(str(tmp_path / "d"), "vlm_sft")]
    # one frame per 2 s at the slot centres 1 s and 3 s
    assert [n.decode() for n in rec["image_names"]] == ["a.mp4#frame10", "a.mp4#frame30"]
    assert any("(no_frames): q.jsonl:2: short.mp4: no frame at fps0.5" in r.getMessage() for r in caplog.records)
