"""Image-editing sequences from local parquet files (the reference's ``unified_edit`` format), via ``manual_dir``.

``manual_dir`` holds ``*.parquet`` files (any depth), one editing sequence per row:

* ``image_list``: list of encoded images (source, then the result of each step);
* ``instruction_list``: per step, a list of alternative instructions (or one string).

At training time a random sub-sequence of at most two steps is drawn, as in the reference's ``parse_row``.

    python -m bagel_jax.data.builders.edit --manual_dir=/data/edit_parquet --data_dir=/data/tfds
"""

from __future__ import annotations

from bagel_jax.data.builders import common
from bagel_jax.data.record_schema import check_meta
from bagel_jax.data.skips import show


def _record(row: dict, where: str, report: common.BuildReport) -> dict:
    images, instructions = row.get("image_list"), row.get("instruction_list")
    if not isinstance(images, list):
        raise common.RowError(f"'image_list' is {show(images)}, expected a list of encoded images")
    if not isinstance(instructions, list):
        raise common.RowError(f"'instruction_list' is {show(instructions)}, expected a list (one entry per step)")
    check_meta("edit", {"instructions": instructions}, len(images), where)
    data = []
    for k, b in enumerate(images):
        if b is not None and not isinstance(b, (bytes, bytearray)):
            raise common.RowError(f"'image_list[{k}]' is {show(b)}, expected bytes")
        if not b:
            report.missing(f"{where}: image {k}: no image bytes")
        data.append(bytes(b or b""))
    steps = [[s] if isinstance(s, str) else list(s) for s in instructions]
    return common.record("edit", {"instructions": steps}, data, [""] * len(data), where)  # embedded: no names


class Edit(common.LocalFilesBuilder):
    """Editing sequences from parquet files in manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        report = common.BuildReport(self.name)
        yield from common.converted(
            common.parquet_rows(manual_dir, report, ("image_list", "instruction_list")), report, _record
        )
        report.finish(manual_dir)


def main(argv=None):
    common.cli(Edit, __doc__, argv)


if __name__ == "__main__":
    main()
