"""Text-to-image pairs from local parquet files (the reference's T2I format), via TFDS ``manual_dir``.

``manual_dir`` holds ``*.parquet`` files (any depth) with one image per row:

* ``image``: encoded image bytes (or a Hugging Face ``datasets`` Image struct ``{bytes, path}``);
* ``captions``: JSON text of a dict (the reference's layout, e.g. ``{"caption": "...", "short": "..."}``) or of a
  list; or ``caption``: plain text. One caption is drawn per sample at training time.

A row whose captions are not JSON or not strings is skipped (``file:row N`` reported); a file that cannot be read
or has no ``image`` column is skipped whole; a row without image bytes is kept and skipped at training time.

    python -m bagel_jax.data.builders.t2i --manual_dir=/data/t2i_parquet --data_dir=/data/tfds
"""

from __future__ import annotations

import json

from bagel_jax.data.builders import common
from bagel_jax.data.record_schema import check_meta
from bagel_jax.data.skips import show


def _image_bytes(value, report: common.BuildReport, where: str) -> bytes:
    """Image bytes from the ``image`` column; b"" (kept, reported) when there are none."""
    if isinstance(value, dict):  # a Hugging Face datasets Image struct
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return common.read_file(common.path_list(value["path"], "image.path")[0], report, where)
        value = None
    if value is None or (isinstance(value, (bytes, bytearray)) and not value):
        report.missing(f"{where}: no image bytes")
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise common.RowError(f"'image' is {show(value)}, expected bytes or a {{bytes, path}} struct")


def _captions(row: dict, where: str) -> list[str]:
    """JSON text (dict or list) in ``captions``, or plain text in ``caption``; raises naming the field."""
    if row.get("captions") is not None:
        caps = row["captions"]
        if isinstance(caps, (str, bytes)):
            try:
                caps = json.loads(caps)
            except (ValueError, RecursionError) as e:
                raise common.NotJsonError(f"'captions' is not JSON ({type(e).__name__}: {str(e)[:120]})") from None
        return check_meta("t2i", {"captions": caps}, 1, where)["captions"]
    if row.get("caption") is not None:
        return [common.text_field(row, "caption")]
    raise common.RowError("no caption: 'captions' and 'caption' are both missing or null")


def _record(row: dict, where: str, report: common.BuildReport) -> dict:
    captions = _captions(row, where)
    return common.record("t2i", {"captions": captions}, [_image_bytes(row.get("image"), report, where)], [""], where)


class T2i(common.LocalFilesBuilder):
    """Image + captions from parquet files in manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        yield from common.converted(
            common.parquet_rows(manual_dir, report, ("image",), ("captions", "caption")), report, _record
        )
        report.finish(manual_dir)


def main(argv=None):
    common.cli(T2i, __doc__, argv)


if __name__ == "__main__":
    main()
