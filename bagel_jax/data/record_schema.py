"""The stored record layout, checked: any record (any value in any feature, any JSON in any ``meta`` field) →
a ``Record`` whose fields have the types the sample rules need, or a ``RecordError`` naming the record's source
(``file:line``), the field and what is wrong, with its skip reason (``skips.SKIP_REASONS``).

Features (builders/common.py): ``kind`` and ``meta`` text (str or UTF-8 bytes), ``images`` a sequence of bytes,
``image_names`` a sequence of text, ``source`` text. A missing ``kind`` means the source's kind; missing or
unusable ``image_names`` / ``source`` only make messages less precise. ``meta`` is a JSON object per kind:

| kind  | meta                                                                  | images                     |
|-------|-----------------------------------------------------------------------|----------------------------|
| t2i   | ``captions``: list of str, dict of str (the reference's parquet), or str | 1 (more are ignored)     |
| vlm   | ``conversations``: list of ``{"from": "human" or "gpt", "value": str}`` | any number, used by ``<image>`` |
| edit  | ``instructions``: list (one per step, >= images - 1) of str or non-empty list of str | >= 2      |
| video | ``captions``: list of str, exactly images - 1 (``[]`` / absent: none, needs ``frame_indexes``) | >= 2 |
|       | ``frame_indexes`` (optional): increasing ints, the frames' numbers in the video |                           |
| web   | ``items``: list of ``{"text": str}`` or ``{"image": int index into images}`` | any number          |

Text with lone surrogates (valid JSON ``"\\ud800"``, not valid UTF-8) has them replaced by U+FFFD. Booleans
are not integers here (``{"image": true}`` is a bad field).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from bagel_jax.data.skips import show

KINDS = ("t2i", "vlm", "edit", "video", "web")
ROLES = ("human", "gpt")


class RecordError(ValueError):
    """A record that cannot become a sample; ``reason`` is one of ``skips.SKIP_REASONS``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Record:
    """A checked record. ``fields`` per kind: t2i ``captions`` list[str]; video ``captions`` list[str] (maybe
    empty) and ``frame_indexes`` list[int] | None; vlm ``turns`` list of
    (role, text); edit ``instructions`` list[list[str]]; web ``items`` list of ("text", str) | ("image", int)."""

    kind: str
    source: str
    images: list[bytes]
    names: list[str]
    fields: dict[str, Any]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def image_name(self, i: int) -> str:
        """``source: image i (name)`` for messages."""
        name = self.names[i] if i < len(self.names) else ""
        return f"{self.source}: image {i}" + (f" ({name})" if name and name != self.source else "")


def clean_text(s: str) -> str:
    """``s`` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _one_line(text: str, limit: int = 200) -> str:
    """Whitespace runs (newlines too) collapsed, at most ``limit`` characters: safe inside one-line messages."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_text(value) -> str | None:
    """str / UTF-8 bytes (numpy too) → str; anything else (or invalid UTF-8) → None."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return clean_text(str(value))
    return None


def _as_bytes(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    return None


def _as_sequence(value) -> list | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return list(value)
    return None


def parse_record(record, expected_kind: str, where: str) -> Record:
    """Checks a stored record (see the module doc); ``where`` names it when it has no ``source`` feature."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: the record is {show(record)}, not a mapping of features", "bad_record")
    source = _one_line(_as_text(record.get("source")) or "") or where
    kind = _as_text(record.get("kind", expected_kind))
    if kind is None:
        raise RecordError(f"{source}: feature 'kind' is {show(record.get('kind'))}, not text", "bad_record")
    if kind != expected_kind:
        raise RecordError(f"{source}: kind {kind!r} read from a {expected_kind!r} source", "bad_record")
    if "meta" not in record:
        raise RecordError(f"{source}: no 'meta' feature", "bad_record")
    text = _as_text(record["meta"])
    if text is None:
        raise RecordError(f"{source}: feature 'meta' is {show(record['meta'])}, not UTF-8 text", "bad_record")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RecordError(f"{source}: 'meta' is not JSON ({type(e).__name__}: {str(e)[:120]})", "bad_record") from None
    if not isinstance(meta, dict):
        raise RecordError(f"{source}: 'meta' is {show(meta)}, not a JSON object", "bad_record")
    raw = _as_sequence(record.get("images", []))
    if raw is None:
        raise RecordError(
            f"{source}: feature 'images' is {show(record.get('images'))}, not a list of bytes", "bad_record"
        )
    images = []
    for i, v in enumerate(raw):
        b = _as_bytes(v)
        if b is None:
            raise RecordError(f"{source}: images[{i}] is {show(v)}, not bytes", "bad_record")
        images.append(b)
    names = [_one_line(_as_text(n) or "") for n in (_as_sequence(record.get("image_names", [])) or [])]
    return Record(kind, source, images, names, check_meta(kind, meta, len(images), source))


def check_meta(kind: str, meta, num_images: int, source: str) -> dict[str, Any]:
    """The validated ``fields`` of ``meta`` for ``kind`` with ``num_images`` images (also used by builders to
    reject a line at build time); raises ``RecordError`` naming the field."""
    if not isinstance(meta, dict):
        raise RecordError(f"{source}: meta is {show(meta)}, not a JSON object", "bad_record")
    f = _Fields(meta, source)
    if kind == "t2i":
        if num_images < 1:
            raise RecordError(f"{source}: a t2i record needs an image, has none", "bad_record")
        return {"captions": f.captions("captions")}
    if kind == "vlm":
        return {"turns": f.turns("conversations")}
    if kind == "edit":
        if num_images < 2:
            raise RecordError(f"{source}: an edit record needs >= 2 images, has {num_images}", "bad_record")
        steps = f.list("instructions")
        if len(steps) < num_images - 1:
            raise RecordError(
                f"{source}: 'instructions' has {len(steps)} steps for {num_images} images (needs {num_images - 1})",
                "bad_field",
            )
        return {"instructions": [f.alternatives(v, f"instructions[{i}]") for i, v in enumerate(steps)]}
    if kind == "video":
        if num_images < 2:
            raise RecordError(f"{source}: a video record needs >= 2 frames, has {num_images}", "bad_record")
        raw = meta.get("captions", [])
        captions = [f.text(v, f"captions[{i}]") for i, v in enumerate(f.list("captions"))] if raw != [] else []
        if captions and len(captions) != num_images - 1:
            raise RecordError(
                f"{source}: 'captions' has {len(captions)} entries for {num_images} frames (needs {num_images - 1})",
                "bad_field",
            )
        indexes = None
        if meta.get("frame_indexes") is not None:
            indexes = f.list("frame_indexes")
            if (
                len(indexes) != num_images
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexes)
                or any(b <= a for a, b in zip(indexes[:-1], indexes[1:]))
            ):
                raise f._bad("frame_indexes", indexes, f"{num_images} increasing frame numbers")
        elif not captions:
            raise RecordError(f"{source}: a video record needs 'captions' or 'frame_indexes', has neither", "bad_field")
        return {"captions": captions, "frame_indexes": indexes}
    if kind == "web":
        return {"items": f.items("items", num_images)}
    raise RecordError(f"{source}: unknown kind {kind!r} (known: {', '.join(KINDS)})", "bad_record")


class _Fields:
    """Typed access to ``meta`` fields; every failure is a ``bad_field`` RecordError naming the path."""

    def __init__(self, meta: dict, source: str):
        self.meta, self.source = meta, source

    def _bad(self, path: str, value, want: str) -> RecordError:
        got = "missing" if value is _MISSING else show(value)
        return RecordError(f"{self.source}: '{path}' is {got}, expected {want}", "bad_field")

    def get(self, key: str, want: str):
        value = self.meta.get(key, _MISSING)
        if value is _MISSING:
            raise self._bad(key, value, want)
        return value

    def list(self, key: str) -> list:
        value = self.get(key, "a list")
        if not isinstance(value, list):
            raise self._bad(key, value, "a list")
        return value

    def text(self, value, path: str) -> str:
        if not isinstance(value, str):
            raise self._bad(path, value, "a string")
        return clean_text(value)

    def captions(self, key: str) -> list[str]:
        value = self.get(key, "a list of strings")
        if isinstance(value, str):
            return [clean_text(value)]
        if isinstance(value, dict):  # the reference's parquet stores a JSON dict of captions
            return [self.text(v, f"{key}.{k}") for k, v in value.items()]
        if isinstance(value, list):
            return [self.text(v, f"{key}[{i}]") for i, v in enumerate(value)]
        raise self._bad(key, value, "a list of strings")

    def alternatives(self, value, path: str) -> list[str]:
        if isinstance(value, str):
            return [clean_text(value)]
        if not isinstance(value, list) or not value:
            raise self._bad(path, value, "a string or a non-empty list of strings")
        return [self.text(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def turns(self, key: str) -> list[tuple[str, str]]:
        out = []
        for i, turn in enumerate(self.list(key)):
            path = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise self._bad(path, turn, 'an object {"from": ..., "value": ...}')
            role = turn.get("from", _MISSING)
            if role not in ROLES:
                raise self._bad(f"{path}.from", role, '"human" or "gpt"')
            out.append((role, self.text(turn.get("value", _MISSING), f"{path}.value")))
        return out

    def items(self, key: str, num_images: int) -> list[tuple[str, Any]]:
        out = []
        for i, item in enumerate(self.list(key)):
            path = f"{key}[{i}]"
            if not isinstance(item, dict) or not ("text" in item or "image" in item):
                raise self._bad(path, item, 'an object {"text": str} or {"image": index}')
            if "text" in item:
                out.append(("text", self.text(item["text"], f"{path}.text")))
                continue
            index = item["image"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_images:
                raise self._bad(f"{path}.image", index, f"an image index in [0, {num_images})")
            out.append(("image", index))
        return out


class _Missing:
    def __repr__(self):
        return "missing"


_MISSING = _Missing()
