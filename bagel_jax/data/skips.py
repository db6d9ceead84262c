"""Skipped data: the fixed reason names, per-reason counts, and a rate-limited log of sample messages.

Training skips a record (never crashes on it) for one of ``SKIP_REASONS``; the counts go to the training metrics
as ``data/skipped/<reason>``. The record ...

* ``unreadable_record``: could not be read from the built data (a corrupt ArrayRecord file);
* ``bad_record``: has a feature missing or of the wrong type, a ``meta`` that is not a JSON object, or another kind;
* ``bad_field``: has a ``meta`` field of the wrong type or shape (``"captions": 5``, a turn's ``"value": null``,
  an unknown role, an image index out of range, fewer instructions or captions than images need);
* ``empty_text``: has no non-empty text where its kind needs one;
* ``no_loss``: has nothing to train on (a conversation without an answer);
* ``missing_file``: has an image whose file was missing or unreadable when the data was built (empty bytes);
* ``undecodable_image``: has an image that is not an image, is truncated or corrupt, or that PIL cannot decode
  (PIL also refuses zero-width or zero-height files this way);
* ``image_too_large``: has an image with more pixels than ``data.max_input_pixels`` (read from its header, before
  any pixel is decoded; PIL's own bomb check is raised so it never refuses an image below that limit);
* ``bad_image``: has an image that decodes but cannot be used (zero width or height);
* ``too_large``: does not fit an empty row of the budgets (und / gen tokens, ViT patches, VAE images, VAE size);
* ``internal_error``: made the decoder fail in a way it does not classify: a bug (please report it); the record is
  skipped all the same, so training goes on.

``pack.MAX_SKIPS_IN_A_ROW`` records skipped in a row (no usable document between them) stop the pipeline with
one error naming the counts: the data is unusable, and waiting would hang training.

Builders skip a line or row of the user's files (the build goes on) for one of ``BUILD_SKIP_REASONS``:

* ``unreadable_file``: the file cannot be opened or parsed (or lacks a required column): all of it is skipped;
* ``not_json``: the line is not UTF-8 JSON, or a JSON-text column (``captions``) is not JSON;
* ``bad_row``: the line / row has the wrong shape: not an object, a field missing or of the wrong type;
* ``undecodable_video``, ``no_frames``, ``unsupported_codec``, ``video_too_large``, ``wrong_duration``: the line's
  video file is not a video or is truncated, has no frames, needs a decoder this FFmpeg lacks, is absurdly large
  (bytes, frame size or frame count), or is not as long as the line's ``duration`` says (``VIDEO_SKIP_REASONS``).

Records kept with a missing image are counted in the build summary (training skips them as ``missing_file``).

``SkipLog`` logs the first few messages of each reason, then at most one per reason every ``interval_s`` seconds
(with the number it left out), so a dataset with a million bad records cannot flood the console.
"""

from __future__ import annotations

import logging
import reprlib
import time
from collections.abc import Iterable, Mapping

import numpy as np

SKIP_REASONS = (
    "unreadable_record",
    "bad_record",
    "bad_field",
    "empty_text",
    "no_loss",
    "missing_file",
    "undecodable_image",
    "image_too_large",
    "bad_image",
    "too_large",
    "internal_error",
)
# The reason order before ``skips.py`` (iterator states saved then hold counts as a list in this order).
LEGACY_SKIP_REASONS = (
    "undecodable_image",
    "missing_file",
    "empty_text",
    "too_large",
    "no_loss",
    "bad_image",
    "bad_record",
)
# A video file that cannot be used (``data/video.py``): not a video or truncated, no frames, a codec this FFmpeg
# cannot decode, absurd size (file bytes, frame size or frame count), a duration in the index that the file does not
# have.
VIDEO_SKIP_REASONS = ("undecodable_video", "no_frames", "unsupported_codec", "video_too_large", "wrong_duration")
BUILD_SKIP_REASONS = ("unreadable_file", "not_json", "bad_row") + VIDEO_SKIP_REASONS

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 40, 40, 2, 4, 4


def show(value) -> str:
    """A short one-line description of any value for error messages: ``int 5``, ``null``, ``list [1, 2, ...]``."""
    if value is None:
        return "null"
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001  (a value whose repr fails still gets a message)
        text = "?"
    return f"{type(value).__name__} {text}".replace("\n", " ")


def counts_to_array(counts, reasons: tuple[str, ...] = SKIP_REASONS) -> np.ndarray:
    """int64[len(reasons)] from ``{reason: n}`` or from a list in ``LEGACY_SKIP_REASONS`` order (older states)."""
    out = np.zeros(len(reasons), np.int64)
    if isinstance(counts, Mapping):
        items = counts.items()
    else:
        counts = list(counts)
        if len(counts) != len(LEGACY_SKIP_REASONS):
            raise ValueError(
                f"skip counts: expected a dict or {len(LEGACY_SKIP_REASONS)} legacy counts, got {len(counts)}"
            )
        items = zip(LEGACY_SKIP_REASONS, counts, strict=True)
    for reason, n in items:
        if reason not in reasons:
            raise ValueError(f"skip counts: unknown reason {reason!r} (known: {', '.join(reasons)})")
        out[reasons.index(reason)] += int(n)
    return out


def array_to_counts(array: np.ndarray, reasons: tuple[str, ...] = SKIP_REASONS) -> dict[str, int]:
    return {r: int(n) for r, n in zip(reasons, array, strict=True)}


class SkipLog:
    """Rate-limited skip messages: per reason the first ``first`` in full, then at most one every ``interval_s``
    seconds, which says how many were left out since the last one logged."""

    def __init__(
        self,
        what: str = "skipped",
        first: int = 5,
        interval_s: float = 60.0,
        logger: logging.Logger | None = None,
        clock=time.monotonic,
    ):
        self.what, self.first, self.interval_s = what, first, interval_s
        self.logger = logger or logging.getLogger("bagel_jax.data")
        self.clock = clock
        self.seen: dict[str, int] = {}
        self._left_out: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def __call__(self, reason: str, message: str, count: int = 1) -> None:
        """One skip of ``reason`` (``count`` > 1: that many, of which ``message`` is a sample)."""
        n = self.seen.get(reason, 0)
        self.seen[reason] = n + count
        now = self.clock()
        if n < self.first or now - self._last.get(reason, -np.inf) >= self.interval_s:
            left = self._left_out.pop(reason, 0) + count - 1
            more = f" (and {left} more {reason} since the last one logged)" if left else ""
            self.logger.warning("%s (%s): %s%s", self.what, reason, message, more)
            self._last[reason] = now
        else:
            self._left_out[reason] = self._left_out.get(reason, 0) + count

    def log_all(self, messages: Iterable[tuple[str, str]]) -> None:
        for reason, message in messages:
            self(reason, message)
