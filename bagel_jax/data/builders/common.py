"""What every builder shares: one record layout, the TFDS builder base, reading the user's files with skip-and-report,
building, and opening built data.

Record layout (all builders, all kinds; ``records.py`` turns it into samples):

| feature       | type | content |
|---------------|------|---------|
| ``kind``        | text | t2i, vlm, edit, video or web |
| ``meta``        | text | JSON: captions / conversations / instructions / items (see records.py) |
| ``images``      | sequence of bytes | encoded images (JPEG, PNG, ...); ``b""`` = file missing at build time |
| ``image_names`` | sequence of text | where each image came from (error messages, skip counts) |
| ``source``      | text | origin: ``file.jsonl:LINE`` (1-based) or ``file.parquet:row ROW`` (0-based) |

Images stay encoded in the ArrayRecord files (decode + resize happen in grain workers). A file that is missing at
build time is kept as an empty image so the pipeline skips the record and counts it as ``missing_file``.

Reading the user's files never aborts a build on one bad line: ``jsonl_rows`` / ``parquet_rows`` skip an unreadable
file, a line that is not UTF-8 JSON, or a line that is not a JSON object, and ``BuildReport.convert`` skips a line
or row the builder cannot turn into a record (a field missing or of the wrong type, checked with
``record_schema.check_meta`` as training will). Each skip is reported with its ``file:line`` (the first few per
reason, ``skips.BUILD_SKIP_REASONS``), and a per-reason summary is logged when the build ends.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bagel_jax.data.record_schema import RecordError
from bagel_jax.data.skips import BUILD_SKIP_REASONS, SkipLog, show
from bagel_jax.data.video import VideoError

FEATURES_DOC = "kind, meta (JSON), images (encoded bytes), image_names, source"


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "kind": tfds.features.Text(),
            "meta": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_names": tfds.features.Sequence(tfds.features.Text()),
            "source": tfds.features.Text(),
        }
    )


def record(kind: str, meta: dict, images: list[bytes], image_names: list[str], source: str = "") -> dict[str, Any]:
    """One record in the common layout; all text made valid UTF-8 (TFDS stores UTF-8): ``meta`` falls back to
    ASCII-escaped JSON for lone surrogates, names and source (file names can hold undecodable bytes) are escaped."""
    text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(meta, ensure_ascii=True, sort_keys=True)
    return {
        "kind": kind,
        "meta": text,
        "images": [bytes(b) for b in images],
        "image_names": [utf8(n) for n in image_names],
        "source": utf8(source),
    }


def utf8(s: str) -> str:
    """``s`` as valid UTF-8 text: undecodable file-name bytes and lone surrogates become backslash escapes."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:  # a file name's undecodable bytes (os.fsdecode) → \xNN
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates → \udNNN
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


class RecordBuilder(tfds.core.GeneratorBasedBuilder):
    """Base for our builders: the common features, ArrayRecord output, no downloads."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "The source feature (file:line of each record)."}
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default probes importlib_resources (a backport we do not install) for builders in packages.
        return epath.Path(sys.modules[cls.__module__].__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not dataset_info_from_configs): no CITATIONS.bib / TAGS.txt next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features(),
            homepage="",
            citation="",
            metadata=self._metadata(),
        )

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
    params = inspect.signature(builder_cls.__init__).parameters
    options = {  # builder keyword → help (the default is the builder's own)
        "max_frames": "most frames per video / clip",
        "min_frames": "fewest frames drawn per video (the reference's FrameSampler)",
        "frame_sample": "video frame sampling: rand, middle or fps<x> (e.g. fps1: one frame per second)",
    }
    for key, text in options.items():
        if key in params:
            default = params[key].default
            p.add_argument(f"--{key}", type=type(default), default=default, help=f"{text} (default {default})")
    a = p.parse_args(argv)
    kwargs = {k: getattr(a, k) for k in options if hasattr(a, k)}
    out = build(builder_cls, a.data_dir, a.manual_dir, **kwargs)
    print(f"built {builder_cls.name} into {out}")
    return out


def read_file(path: str, report: BuildReport | None = None, where: str = "") -> bytes:
    """File bytes, or ``b""`` if it cannot be read (missing, a folder, no permission): the record is kept and
    skipped at training time as ``missing_file``; ``report`` counts it (else it is logged)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        message = f"{where + ': ' if where else ''}{path}: {e.strerror or e}"
        if report is not None:
            report.missing(message)
        else:
            logging.warning("missing file %s (record kept; the pipeline skips it as missing_file)", message)
        return b""


def files(manual_dir: str, pattern: str) -> list[str]:
    """Sorted files matching ``pattern`` anywhere under ``manual_dir``."""
    found = sorted(glob.glob(os.path.join(manual_dir, "**", pattern), recursive=True))
    if not found:
        raise FileNotFoundError(f"no {pattern} files under manual_dir {manual_dir}")
    return found


class RowError(ValueError):
    """A line or row of the user's files that the builder cannot turn into a record (skipped as ``bad_row``)."""


class NotJsonError(RowError):
    """A JSON-text field of a row that is not JSON (skipped as ``not_json``)."""


class BuildReport:
    """What one build skipped (per reason, ``skips.BUILD_SKIP_REASONS``) and kept with missing images; logs the
    first few messages per reason (``skips.SkipLog``) and, from ``finish``, a one-line summary."""

    def __init__(self, name: str, first: int = 10):
        self.name = name
        self.log = SkipLog(f"{name}: skipped", first=first)
        self.missing_log = SkipLog(f"{name}: missing image, record kept", first=first)
        self.skipped = dict.fromkeys(BUILD_SKIP_REASONS, 0)
        self.missing_images = 0
        self.written = 0

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.log(reason, message)

    def missing(self, message: str) -> None:
        self.missing_images += 1
        self.missing_log("missing_file", message)

    def convert(self, where: str, fn, *args):
        """``fn(*args)`` (a record), or None when it raises: the line / row ``where`` is skipped as ``bad_row``."""
        try:
            out = fn(*args)
        except VideoError as e:
            text = str(e)
            self.skip(e.reason, text if text.startswith(where) else f"{where}: {text}")
            return None
        except (RowError, RecordError) as e:
            text = str(e)
            self.skip(
                "not_json" if isinstance(e, NotJsonError) else "bad_row",
                text if text.startswith(where) else f"{where}: {text}",
            )
            return None
        except Exception as e:  # noqa: BLE001  (any surprise in one row must not abort the whole build)
            self.skip("bad_row", f"{where}: {type(e).__name__}: {e}")
            return None
        self.written += 1
        return out

    def summary(self) -> str:
        skipped = ", ".join(f"{r} {n}" for r, n in self.skipped.items() if n) or "none"
        return (
            f"{self.name}: wrote {self.written} records; skipped {sum(self.skipped.values())} ({skipped}); "
            f"{self.missing_images} missing images kept (training skips their records as missing_file)"
        )

    def finish(self, manual_dir: str) -> None:
        """Logs the summary; raises when nothing usable was found (one line, with the summary)."""
        if self.written == 0:
            raise ValueError(f"no usable records under manual_dir {manual_dir}: {self.summary()}")
        self.log.logger.warning("%s", self.summary())


def jsonl_rows(manual_dir: str, report: BuildReport) -> Iterator[tuple[str, str, str, dict]]:
    """``(key, where, folder, object)`` per line of every ``*.jsonl`` under ``manual_dir`` (``where`` =
    ``file:LINE``, 1-based); skips and reports unreadable files, lines that are not UTF-8 JSON or not objects."""
    for path in files(manual_dir, "*.jsonl"):
        base, rel = os.path.dirname(path), os.path.relpath(path, manual_dir)
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            report.skip("unreadable_file", f"{rel}: {e.strerror or e}")
            continue
        for i, raw in enumerate(lines):
            where = f"{rel}:{i + 1}"
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                report.skip("not_json", f"{where}: not UTF-8 JSON ({type(e).__name__}: {str(e)[:120]})")
                continue
            if not isinstance(item, dict):
                report.skip("bad_row", f"{where}: a line must be a JSON object, got {show(item)}")
                continue
            yield f"{rel}:{i}", where, base, item


def converted(rows: Iterator[tuple], report: BuildReport, record_fn) -> Iterator[tuple[str, dict]]:
    """``(key, record)`` for each ``(key, where, *args)`` of ``rows`` that ``record_fn(*args, where, report)``
    converts; a row that raises is skipped and counted by ``report`` (see ``BuildReport.convert``)."""
    for key, where, *args in rows:
        rec = report.convert(where, record_fn, *args, where, report)
        if rec is not None:
            yield key, rec


def parquet_rows(
    manual_dir: str, report: BuildReport, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Iterator[tuple[str, str, dict]]:
    """``(key, where, row)`` per row of every ``*.parquet`` under ``manual_dir`` (``where`` = ``file:row ROW``,
    0-based), reading ``required`` + present ``optional`` columns; skips and reports a file that cannot be read or
    lacks a required column (from the row where reading failed on)."""
    import pyarrow.parquet as pq

    for path in files(manual_dir, "*.parquet"):
        rel = os.path.relpath(path, manual_dir)
        i = 0
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            missing = [c for c in required if c not in names]
            if missing:
                report.skip("unreadable_file", f"{rel}: no column {', '.join(missing)} (has {', '.join(names)})")
                continue
            columns = [c for c in required + optional if c in names]
            for batch in pf.iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    yield f"{rel}:{i}", f"{rel}:row {i}", row
                    i += 1
        except Exception as e:  # noqa: BLE001  (pyarrow raises many types for a corrupt file)
            report.skip("unreadable_file", f"{rel}: unreadable from row {i} ({type(e).__name__}: {str(e)[:160]})")


def text_field(row: dict, key: str, required: bool = True) -> str | None:
    """``row[key]`` as a string (None if absent and not ``required``); raises ``RowError`` naming the field."""
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RowError(f"'{key}' is {'missing' if key not in row else show(value)}, expected a string")
    return value


def path_list(value, key: str) -> list[str]:
    """A path or a list of paths from a jsonl field; raises ``RowError`` naming the field."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RowError(f"'{key}' is {show(value)}, expected a path or a list of paths")
    return paths


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
    found = sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "dataset_info.json"), recursive=True)}
    )
    if not found:
        raise FileNotFoundError(
            f"no built dataset {name!r} under data_dir {data_dir} (build it first, e.g. "
            f"python -m bagel_jax.data.builders.synthetic_shapes --data_dir={data_dir})"
        )
    configs = {os.path.relpath(os.path.dirname(p), root) for p in found}
    if len(configs) > 1:
        raise ValueError(
            f"{name!r} under {data_dir} has several configs {sorted(configs)}; name one as '{name}/<config>'"
        )
    return max(found, key=lambda p: tfds.core.Version(os.path.basename(p)))


def open_source(data_dir: str, spec: str):
    """``"name[/config][:split]"`` → random-access ArrayRecord source of records (split defaults to ``train``)."""
    name, _, split = spec.partition(":")
    builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
    split = split or "train"
    if split not in builder.info.splits:
        raise ValueError(f"{spec!r}: no split {split!r} (has {sorted(builder.info.splits)})")
    return builder.as_data_source(split=split)
