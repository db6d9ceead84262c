"""Image-editing sequences from local parquet files (the reference's ``unified_edit`` format), via ``manual_dir``.

``manual_dir`` holds ``*.parquet`` files (any depth), one editing sequence per row:

* ``image_list``: list of encoded images (source, then the result of each step);
* ``instruction_list``: per step, a list of alternative instructions (or one string).

At training time a random sub-sequence of at most two steps is drawn, as in the reference's ``parse_row``.

    python -m bagel_jax.data.builders.edit --manual_dir=/data/edit_parquet --data_dir=/data/tfds
"""
from __future__ import annotations

import os

from bagel_jax.data.builders import common


class Edit(common.LocalFilesBuilder):
    """Editing sequences from parquet files in manual_dir (see module docstring)."""

    DESCRIPTION = __doc__

    def _generate_examples(self, manual_dir):
        import pyarrow.parquet as pq
        for path in common.files(manual_dir, "*.parquet"):
            rel = os.path.relpath(path, manual_dir)
            table = pq.read_table(path, columns=["image_list", "instruction_list"])
            for i, row in enumerate(table.to_pylist()):
                images = [bytes(b) if b is not None else b"" for b in row["image_list"]]
                instructions = [[s] if isinstance(s, str) else list(s) for s in row["instruction_list"]]
                names = [f"{rel}:{i}/{k}" for k in range(len(images))]
                yield f"{rel}:{i}", common.record("edit", {"instructions": instructions}, images, names)


def main(argv=None):
    common.cli(Edit, __doc__, argv)


if __name__ == "__main__":
    main()
