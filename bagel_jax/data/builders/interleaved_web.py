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


def _items(doc: dict) -> list[dict]:
    if "items" in doc:
        return list(doc["items"])
    texts, images = doc.get("texts", []), doc.get("images", [])
    if len(texts) != len(images):
        raise ValueError(f"texts ({len(texts)}) and images ({len(images)}) must be aligned lists")
    return [{"text": t} if t is not None else {"image": im} for t, im in zip(texts, images) if t is not None or im]


class InterleavedWeb(common.LocalFilesBuilder):
    """Interleaved text/image documents from manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        for path in common.files(manual_dir, "*.jsonl"):
            base, rel = os.path.dirname(path), os.path.relpath(path, manual_dir)
            for i, doc in common.jsonl(path):
                items, images, names = [], [], []
                for item in _items(doc):
                    if "image" in item:
                        p = common.resolve(base, item["image"])
                        items.append({"image": len(images)})
                        images.append(common.read_file(p))
                        names.append(os.path.relpath(p, manual_dir))
                    else:
                        items.append({"text": item["text"]})
                yield f"{rel}:{i}", common.record("web", {"items": items}, images, names)


def main(argv=None):
    common.cli(InterleavedWeb, __doc__, argv)


if __name__ == "__main__":
    main()
