"""Interleaved video: frames with a caption for each change between consecutive frames, via ``manual_dir``.

``manual_dir`` holds ``*.jsonl`` files (any depth). Each line::

    {"frames": "clip_0/" | ["f0.jpg", "f1.jpg", ...], "captions": ["the car turns left", ...]}

    {"video": "a.mp4", "duration": 12.5}                                   # shots of a file, no captions
    {"video": "a.mp4", "times": [0.0, 1.5, 3.0], "captions": ["it opens", "it falls"]}

``frames`` is a folder of frames (sorted by name) or a list of paths, relative to the jsonl's folder;
``captions[i]`` describes the change from frame i to frame i + 1 (so len(captions) = frames − 1). At most
``--max_frames`` (default 8) frames are kept per clip; when frames are dropped, the captions of the merged
changes are joined.

``video`` is a file (mp4, webm, mkv, ...; PyAV). With ``times`` (seconds, increasing) the frames at those times
form one clip, ``captions`` (optional) describing each change. Without, the video is cut into shots
(``video.shot_starts``: PySceneDetect's content rule) and each shot of >= 2 frames gives one clip of at most
``--max_frames`` frames, evenly spread (the reference's ``middle`` sampling), without captions. Records store the
frames (JPEG) and their ``frame_indexes`` in the video, which training turns into future-frame samples with
``frame_delta`` RoPE steps (records.py). ``duration`` (seconds, optional) is checked against the file. An unusable
file skips the line, counted by reason with the file named (``skips.VIDEO_SKIP_REASONS``).

    python -m bagel_jax.data.builders.interleaved_video --manual_dir=/data/video --data_dir=/data/tfds
"""

from __future__ import annotations

import os

import numpy as np

from bagel_jax.data import video as video_lib
from bagel_jax.data.builders import common, video_files
from bagel_jax.data.record_schema import check_meta


class InterleavedVideo(common.LocalFilesBuilder):
    """Frames + per-change captions from manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def __init__(self, *, max_frames: int = 8, **kwargs):
        self.max_frames = max_frames
        super().__init__(**kwargs)

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        for key, where, base, item in common.jsonl_rows(manual_dir, report):
            if item.get("video") is None:
                rec = report.convert(where, self._record, item, base, manual_dir, where, report)
                if rec is not None:
                    yield key, rec
                continue
            clips = report.convert(where, self._clips, item, base, manual_dir, where)
            for j, rec in enumerate(clips or []):
                yield f"{key}:{j}", rec
            report.written += len(clips or [1]) - 1
        report.finish(manual_dir)

    def _clips(self, item: dict, base: str, manual_dir: str, where: str) -> list[dict]:
        """Records of one video file: the clip at ``times``, or one per shot (module doc)."""
        path = common.resolve(base, common.text_field(item, "video"))
        name = os.path.relpath(path, manual_dir)
        src, info = video_files.load(path, name, item.get("duration"))
        if item.get("times") is not None:
            times = item["times"]
            if not isinstance(times, list) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in times
            ):
                raise common.RowError(f"'times' is {common.show(times)}, expected a list of seconds")
            idx = [min(round(t * info.fps), info.num_frames - 1) for t in times]
            if len(idx) < 2 or any(b <= a for a, b in zip(idx[:-1], idx[1:])):
                raise common.RowError(f"'times' {times} give frames {idx}: need >= 2 increasing frames")
            meta = {"captions": item.get("captions", []), "frame_indexes": idx}
            clips = [(idx, check_meta("video", meta, len(idx), where)["captions"])]
        else:
            if item.get("captions") is not None:
                raise common.RowError("'captions' need 'times' (the frames they describe)")
            starts = video_lib.shot_starts(video_lib.shot_scores(src, name)) + [info.num_frames]
            rng = video_files.rng_for(where)
            clips = []
            for a, b in zip(starts[:-1], starts[1:]):
                if b - a >= 2:
                    picked = video_lib.frame_indices(self.max_frames, b - a, rng, "middle")
                    idx = sorted({a + i for i in picked})
                    clips.append((idx, []))
        out = []
        for idx, captions in clips:
            images = video_files.frames_as_jpeg(src, idx, info, name)
            meta = {"captions": captions, "frame_indexes": idx}
            out.append(common.record("video", meta, images, video_files.frame_names(name, idx), where))
        if not out:
            raise video_lib.VideoError(f"{name}: no shot of >= 2 frames", "no_frames")
        return out

    def _record(self, item: dict, base: str, manual_dir: str, where: str, report: common.BuildReport) -> dict:
        frames = item.get("frames")
        paths = (
            common.frame_files(common.resolve(base, frames))
            if isinstance(frames, str)
            else [common.resolve(base, f) for f in common.path_list(frames, "frames")]
        )
        captions = check_meta("video", {"captions": item.get("captions")}, len(paths), where)["captions"]
        if len(paths) > self.max_frames:
            keep = sorted(set(np.linspace(0, len(paths) - 1, self.max_frames).round().astype(int).tolist()))
            captions = [" ".join(captions[a:b]) for a, b in zip(keep[:-1], keep[1:])]
            paths = [paths[k] for k in keep]
        images = [common.read_file(p, report, where) for p in paths]
        names = [os.path.relpath(p, manual_dir) for p in paths]
        return common.record("video", {"captions": captions}, images, names, where)


def main(argv=None):
    common.cli(InterleavedVideo, __doc__, argv)


if __name__ == "__main__":
    main()
