"""What every builder shares: one record layout, the TFDS builder base, building, and opening built data.

Record layout (all builders, all kinds; ``records.py`` turns it into samples):

| feature       | type | content |
|---------------|------|---------|
| ``kind``        | text | t2i, vlm, edit, video or web |
| ``meta``        | text | JSON: captions / conversations / instructions / items (see records.py) |
| ``images``      | sequence of bytes | encoded images (JPEG, PNG, ...); ``b""`` = file missing at build time |
| ``image_names`` | sequence of text | where each image came from (error messages, skip counts) |

Images stay encoded in the ArrayRecord files (decode + resize happen in grain workers). A file that is missing at
build time is kept as an empty image so the pipeline skips the record and counts it as ``missing_file``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

FEATURES_DOC = "kind, meta (JSON), images (encoded bytes), image_names"


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "kind": tfds.features.Text(),
        "meta": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "image_names": tfds.features.Sequence(tfds.features.Text()),
    })


def record(kind: str, meta: dict, images: list[bytes], image_names: list[str]) -> dict[str, Any]:
    return {"kind": kind, "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True), "images": list(images),
            "image_names": list(image_names)}


class RecordBuilder(tfds.core.GeneratorBasedBuilder):
    """Base for our builders: the common features, ArrayRecord output, no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default probes importlib_resources (a backport we do not install) for builders in packages.
        return epath.Path(sys.modules[cls.__module__].__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not dataset_info_from_configs): no CITATIONS.bib / TAGS.txt next to the module.
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features(),
                                     homepage="", citation="", metadata=self._metadata())

    def _metadata(self):
        return None


class LocalFilesBuilder(RecordBuilder):
    """A builder reading user files from ``manual_dir`` into one ``train`` split."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put your files in manual_dir (see the module docstring for the layout)."

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        if not os.path.isdir(manual):
            raise FileNotFoundError(f"{self.name}: manual_dir {manual} does not exist")
        return {"train": self._generate_examples(manual)}  # subclasses: _generate_examples(manual_dir)


def build(builder_cls, data_dir: str, manual_dir: str | None = None, **builder_kwargs) -> str:
    """Builds ``builder_cls`` into ``data_dir`` as ArrayRecord (offline); returns the dataset directory."""
    tfds.disable_progress_bar()
    b = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record", **builder_kwargs)
    cfg = tfds.download.DownloadConfig(manual_dir=manual_dir and os.fspath(manual_dir), try_download_gcs=False)
    b.download_and_prepare(download_config=cfg)
    return os.fspath(b.data_dir)


def cli(builder_cls, doc: str, argv=None) -> str:
    """``python -m bagel_jax.data.builders.<name> --manual_dir=... --data_dir=... [--max_frames=N]``."""
    import argparse
    import inspect
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--manual_dir", required=True, help="folder with your files")
    p.add_argument("--data_dir", required=True, help="TFDS data dir to write to")
    if "max_frames" in inspect.signature(builder_cls.__init__).parameters:
        p.add_argument("--max_frames", type=int, default=8)
    a = p.parse_args(argv)
    kwargs = {"max_frames": a.max_frames} if hasattr(a, "max_frames") else {}
    out = build(builder_cls, a.data_dir, a.manual_dir, **kwargs)
    print(f"built {builder_cls.name} into {out}")
    return out


def read_file(path: str) -> bytes:
    """File bytes, or ``b""`` (logged) if the file does not exist: the record is kept and skipped later."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        logging.warning("missing file %s (record kept; the pipeline skips it as missing_file)", path)
        return b""


def files(manual_dir: str, pattern: str) -> list[str]:
    """Sorted files matching ``pattern`` anywhere under ``manual_dir``."""
    found = sorted(glob.glob(os.path.join(manual_dir, "**", pattern), recursive=True))
    if not found:
        raise FileNotFoundError(f"no {pattern} files under manual_dir {manual_dir}")
    return found


def jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                yield i, json.loads(line)


def resolve(base_dir: str, rel: str) -> str:
    """An image path from a jsonl line: absolute, relative to the jsonl's folder, or to its ``images/`` folder."""
    if os.path.isabs(rel):
        return rel
    for cand in (os.path.join(base_dir, rel), os.path.join(base_dir, "images", rel)):
        if os.path.exists(cand):
            return cand
    return os.path.join(base_dir, rel)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def frame_files(folder: str) -> list[str]:
    """Sorted image files in a frames folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def sample_uniform(items: list, max_count: int) -> list:
    """At most ``max_count`` items spread evenly (first and last kept)."""
    if len(items) <= max_count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, max_count).round().astype(int)
    return [items[i] for i in idx]


# --- reading built data -----------------------------------------------------------------------------------------

def dataset_dir(data_dir: str, name: str) -> str:
    """``{data_dir}/{name}`` (``name`` may include a config: ``name/config``) → its newest built version dir."""
    root = os.path.join(os.fspath(data_dir), name)
    found = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "dataset_info.json"),
                                                          recursive=True)})
    if not found:
        raise FileNotFoundError(f"no built dataset {name!r} under data_dir {data_dir} (build it first, e.g. "
                                f"python -m bagel_jax.data.builders.synthetic_shapes --data_dir={data_dir})")
    configs = {os.path.relpath(os.path.dirname(p), root) for p in found}
    if len(configs) > 1:
        raise ValueError(f"{name!r} under {data_dir} has several configs {sorted(configs)}; name one as "
                         f"'{name}/<config>'")
    return max(found, key=lambda p: tfds.core.Version(os.path.basename(p)))


def open_source(data_dir: str, spec: str):
    """``"name[/config][:split]"`` → random-access ArrayRecord source of records (split defaults to ``train``)."""
    name, _, split = spec.partition(":")
    builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
    split = split or "train"
    if split not in builder.info.splits:
        raise ValueError(f"{spec!r}: no split {split!r} (has {sorted(builder.info.splits)})")
    return builder.as_data_source(split=split)
