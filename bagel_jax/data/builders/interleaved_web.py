"""Interleaved web documents (texts and images in reading order), via ``manual_dir``.

``manual_dir`` holds ``*.jsonl`` files (any depth). Each line is either OBELICS-style aligned lists::

    {"texts": ["Intro ...", null, "More ..."], "images": [null, "img/1.jpg", null]}

or an explicit item list::

    {"items": [{"text": "Intro ..."}, {"image": "img/1.jpg"}, {"text": "More ..."}]}

Image paths are relative to the jsonl's folder (or its ``images/`` subfolder).

    python -m bagel_jax.data.builders.interleaved_web --manual_dir=/data/web --data_dir=/data/tfds
"""

from __future__ import annotations

import os

from bagel_jax.data.builders import common
from bagel_jax.data.record_schema import check_meta
from bagel_jax.data.skips import show


def _items(doc: dict) -> list[dict]:
    if "items" in doc:
        items = doc["items"]
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise common.RowError(f"'items' is {show(items)}, expected a list of {{text}} / {{image}} objects")
        return items
    texts, images = doc.get("texts", []), doc.get("images", [])
    if not isinstance(texts, list) or not isinstance(images, list):
        raise common.RowError(f"'texts' and 'images' must be lists, got {show(texts)} and {show(images)}")
    if len(texts) != len(images):
        raise common.RowError(f"texts ({len(texts)}) and images ({len(images)}) must be aligned lists")
    return [{"text": t} if t is not None else {"image": im} for t, im in zip(texts, images) if t is not None or im]


class InterleavedWeb(common.LocalFilesBuilder):
    """Interleaved text/image documents from manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        rows = (
            (key, where, item, base, manual_dir) for key, where, base, item in common.jsonl_rows(manual_dir, report)
        )
        yield from common.converted(rows, report, _record)
        report.finish(manual_dir)


def _record(doc: dict, base: str, manual_dir: str, where: str, report: common.BuildReport) -> dict:
    items, paths = [], []
    for k, item in enumerate(_items(doc)):
        if "text" in item:
            items.append({"text": common.text_field(item, "text")})
        elif "image" in item:
            paths.append(common.resolve(base, common.path_list(item["image"], f"items[{k}].image")[0]))
            items.append({"image": len(paths) - 1})
        else:
            raise common.RowError(f"item {k} is {show(item)}, expected {{text}} or {{image}}")
    check_meta("web", {"items": items}, len(paths), where)
    images = [common.read_file(p, report, where) for p in paths]
    names = [os.path.relpath(p, manual_dir) for p in paths]
    return common.record("web", {"items": items}, images, names, where)


def main(argv=None):
    common.cli(InterleavedWeb, __doc__, argv)


if __name__ == "__main__":
    main()
