"""Text-to-image pairs from local parquet files (the reference's T2I format), via TFDS ``manual_dir``.

``manual_dir`` holds ``*.parquet`` files (any depth) with one image per row:

* ``image``: encoded image bytes (or a Hugging Face ``datasets`` Image struct ``{bytes, path}``);
* ``captions``: JSON text of a dict (the reference's layout, e.g. ``{"caption": "...", "short": "..."}``) or of a
  list; or ``caption``: plain text. One caption is drawn per sample at training time.

    python -m bagel_jax.data.builders.t2i --manual_dir=/data/t2i_parquet --data_dir=/data/tfds
"""
from __future__ import annotations

import json
import os

from bagel_jax.data.builders import common


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):
        return value.get("bytes") or (common.read_file(value["path"]) if value.get("path") else b"")
    return bytes(value) if value is not None else b""


def _captions(row: dict) -> list[str]:
    if row.get("captions") is not None:
        caps = row["captions"]
        caps = json.loads(caps) if isinstance(caps, (str, bytes)) else caps
        return [str(v) for v in (caps.values() if isinstance(caps, dict) else caps)]
    if row.get("caption") is not None:
        return [str(row["caption"])]
    return []


class T2i(common.LocalFilesBuilder):
    """Image + captions from parquet files in manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        import pyarrow.parquet as pq
        for path in common.files(manual_dir, "*.parquet"):
            rel = os.path.relpath(path, manual_dir)
            table = pq.read_table(path)
            columns = [c for c in ("image", "captions", "caption") if c in table.column_names]
            for i, row in enumerate(table.select(columns).to_pylist()):
                yield f"{rel}:{i}", common.record("t2i", {"captions": _captions(row)},
                                                  [_image_bytes(row.get("image"))], [f"{rel}:{i}"])


def main(argv=None):
    common.cli(T2i, __doc__, argv)


if __name__ == "__main__":
    main()
