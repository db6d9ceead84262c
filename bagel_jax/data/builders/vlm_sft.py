"""VLM instruction data in LLaVA jsonl + image folder form (the reference's ``vlm_sft`` format), via ``manual_dir``.

``manual_dir`` holds ``*.jsonl`` files (any depth). Each line::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
                                                          {"from": "gpt", "value": "..."}]}
    {"video": "clip_frames/", "conversations": [{"from": "human", "value": "<video>\\nDescribe it."}, ...]}

Image paths are relative to the jsonl's folder (or its ``images/`` subfolder). A video is a folder of frames;
at most ``--max_frames`` (default 8) are kept, evenly spread, and ``<video>`` becomes one ``<image>`` per frame.
A missing image is stored empty and the sample is skipped (and counted) at training time.

    python -m bagel_jax.data.builders.vlm_sft --manual_dir=/data/llava --data_dir=/data/tfds
"""

from __future__ import annotations

import os

from bagel_jax.data.builders import common
from bagel_jax.data.record_schema import check_meta


class VlmSft(common.LocalFilesBuilder):
    """LLaVA-style conversations with images from manual_dir (see module docstring)."""

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
        turns = check_meta("vlm", {"conversations": item.get("conversations")}, 0, where)["turns"]
        conversations = [{"from": who, "value": value} for who, value in turns]
        if item.get("image") is not None:
            paths = [common.resolve(base, p) for p in common.path_list(item["image"], "image")]
        elif item.get("video") is not None:
            folder = common.resolve(base, common.path_list(item["video"], "video")[0])
            paths = common.sample_uniform(common.frame_files(folder), self.max_frames) or [folder]
            for c in conversations:
                if "<video>" in c["value"]:
                    c["value"] = c["value"].replace("<video>", "<image>" * len(paths))
                    break
        else:
            paths = []
        images = [common.read_file(p, report, where) for p in paths]
        names = [os.path.relpath(p, manual_dir) for p in paths]
        return common.record("vlm", {"conversations": conversations}, images, names, where)


def main(argv=None):
    common.cli(VlmSft, __doc__, argv)


if __name__ == "__main__":
    main()
