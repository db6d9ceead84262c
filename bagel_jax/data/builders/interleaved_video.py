"""Interleaved video: frames with a caption for each change between consecutive frames, via ``manual_dir``.

``manual_dir`` holds ``*.jsonl`` files (any depth). Each line::

    {"frames": "clip_0/" | ["f0.jpg", "f1.jpg", ...], "captions": ["the car turns left", ...]}

``frames`` is a folder of frames (sorted by name) or a list of paths, relative to the jsonl's folder;
``captions[i]`` describes the change from frame i to frame i + 1 (so len(captions) = frames − 1). At most
``--max_frames`` (default 8) frames are kept per clip; when frames are dropped, the captions of the merged
changes are joined.

    python -m bagel_jax.data.builders.interleaved_video --manual_dir=/data/video --data_dir=/data/tfds
"""

from __future__ import annotations

import os

import numpy as np

from bagel_jax.data.builders import common
from bagel_jax.data.record_schema import check_meta


class InterleavedVideo(common.LocalFilesBuilder):
    """Frames + per-change captions from manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def __init__(self, *, max_frames: int = 8, **kwargs):
        self.max_frames = max_frames
        super().__init__(**kwargs)

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        rows = (
            (key, where, item, base, manual_dir) for key, where, base, item in common.jsonl_rows(manual_dir, report)
        )
        yield from common.converted(rows, report, self._record)
        report.finish(manual_dir)

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
