"""VLM instruction data in LLaVA jsonl + image folder form (the reference's ``vlm_sft`` format), via ``manual_dir``.

``manual_dir`` holds ``*.jsonl`` files (any depth). Each line::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
                                                          {"from": "gpt", "value": "..."}]}
    {"video": "clip.mp4" | "clip_frames/", "conversations": [{"from": "human", "value": "<video>\\nDescribe it."}, ...]}

Image paths are relative to the jsonl's folder (or its ``images/`` subfolder). A video is a file (mp4, webm, mkv,
mov, avi; decoded with PyAV, only the sampled frames) or a folder of frames. Frames are sampled like the
reference's ``FrameSampler`` (vlm_sft yaml: ``rand``, ``--min_frames`` 8 to ``--max_frames`` 12 frames; a folder
with no more frames than drawn keeps them all), seeded by the line, and stored as JPEG; ``<video>`` becomes one
``<image>`` per frame, and training resizes them with ``img_num`` = the frame count (the pixel budget is shared).
A missing image is stored empty and the sample is skipped (and counted) at training time; an unusable video file
skips the line, counted by reason (``skips.VIDEO_SKIP_REASONS``).

    python -m bagel_jax.data.builders.vlm_sft --manual_dir=/data/llava --data_dir=/data/tfds
"""

from __future__ import annotations

import os

from bagel_jax.data.builders import common, video_files
from bagel_jax.data.record_schema import check_meta
from bagel_jax.data.video import FrameSampler, VideoError


class VlmSft(common.LocalFilesBuilder):
    """LLaVA-style conversations with images from manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def __init__(self, *, max_frames: int = 12, min_frames: int = 8, frame_sample: str = "rand", **kwargs):
        self.sampler = FrameSampler(max_frames, min(min_frames, max_frames), frame_sample)
        super().__init__(**kwargs)

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        rows = (
            (key, where, item, base, manual_dir) for key, where, base, item in common.jsonl_rows(manual_dir, report)
        )
        yield from common.converted(rows, report, self._record)
        report.finish(manual_dir)

    def _record(self, item: dict, base: str, manual_dir: str, where: str, report: common.BuildReport) -> dict:
        turns = check_meta("vlm", {"conversations": item.get("conversations")}, 0, where)["turns"]
        conversations = [{"from": who, "value": value} for who, value in turns]
        if item.get("image") is not None:
            paths = [common.resolve(base, p) for p in common.path_list(item["image"], "image")]
        elif item.get("video") is not None:
            path = common.resolve(base, common.path_list(item["video"], "video")[0])
            turn = next((c for c in conversations if "<video>" in c["value"]), None)
            if turn is None:  # the reference skips such a line ("Cannot find <video> in the conversation!")
                raise common.RowError("a 'video' line needs <video> in a turn, found none")
            images, names = self._video(path, manual_dir, where, report)
            turn["value"] = turn["value"].replace("<video>", "<image>" * len(images))
            return common.record("vlm", {"conversations": conversations}, images, names, where)
        else:
            paths = []
        images = [common.read_file(p, report, where) for p in paths]
        names = [os.path.relpath(p, manual_dir) for p in paths]
        return common.record("vlm", {"conversations": conversations}, images, names, where)

    def _video(self, path: str, manual_dir: str, where: str, report: common.BuildReport) -> tuple[list, list]:
        """Sampled frames (encoded) and their names, from a video file or a frames folder."""
        rng = video_files.rng_for(where)
        name = os.path.relpath(path, manual_dir)
        if video_files.is_video_file(path):
            src, info = video_files.load(path, name)
            idx = self.sampler(info.num_frames, rng, info.fps)
            if not idx:  # fps<x> sampling of a clip shorter than one slot
                raise VideoError(f"{name}: no frame at {self.sampler.sample} ({info.duration_s:.2f} s)", "no_frames")
            return video_files.frames_as_jpeg(src, idx, info, name), video_files.frame_names(name, idx)
        paths = common.frame_files(path)
        idx = self.sampler(len(paths), rng) if paths else []
        paths = [paths[i] for i in sorted(set(idx))] if len(paths) > len(idx) else paths or [path]
        return [common.read_file(p, report, where) for p in paths], [os.path.relpath(p, manual_dir) for p in paths]


def main(argv=None):
    common.cli(VlmSft, __doc__, argv)


if __name__ == "__main__":
    main()
