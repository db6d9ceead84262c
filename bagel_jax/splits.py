"""Split-wise attention mask rule as O(L) per-token metadata, in numpy (DESIGN §5).

A row is a sequence of *splits* (contiguous token ranges of one document) with a mode:
``causal`` (text), ``full`` (ViT image, clean VAE image) or ``noise`` (noised VAE image).
For token i in split s = [start, end) the metadata is

* ``doc[i]``   document id within the row, 0 = padding;
* ``index[i]`` the token's logical position (natural order of the row);
* ``q_hi[i]``  last logical index i may attend to: i (causal) or end-1 (full, noise);
* ``kv_hi[i]`` last logical index that may attend to i: end-1 (noise) or +inf.

allowed(q, kv) = doc[q] == doc[kv] != 0 and index[kv] <= q_hi[q] and index[q] <= kv_hi[kv].

A leaf of the package: numpy only, so the data pipeline (host workers) builds metadata without importing jax. The
device side (``MaskMeta``, the dense ``allowed`` mask, the kernels) is ``bagel_jax.attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

CAUSAL, FULL, NOISE = "causal", "full", "noise"
MODES = (CAUSAL, FULL, NOISE)
KV_HI_INF = np.iinfo(np.int32).max  # kv_hi of tokens every later query of the document may see


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: ``length`` tokens of document ``doc`` (>= 1) attending in ``mode``."""

    doc: int
    mode: str
    length: int

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"split mode must be one of {MODES}, got {self.mode!r}")
        if self.length < 1 or self.doc < 1:
            raise ValueError(f"split needs length >= 1 and doc >= 1, got {self}")


def metadata_from_splits(splits: Sequence[Split], length: int | None = None) -> dict[str, np.ndarray]:
    """Builds natural-order metadata for one row from its splits.

    Args:
      splits: the row's splits in natural order (documents one after another).
      length: pad the row to this many tokens (padding: doc 0, index continuing, q_hi = index,
        kv_hi = +inf). Defaults to the total split length.

    Returns:
      dict of int32[length] arrays ``doc``, ``index``, ``q_hi``, ``kv_hi``.
    """
    total = sum(s.length for s in splits)
    length = total if length is None else length
    if length < total:
        raise ValueError(f"splits hold {total} tokens, more than the row length {length}")
    doc = np.zeros(length, np.int32)
    index = np.arange(length, dtype=np.int32)
    q_hi = index.copy()
    kv_hi = np.full(length, KV_HI_INF, np.int32)
    start = 0
    for s in splits:
        end = start + s.length
        doc[start:end] = s.doc
        if s.mode != CAUSAL:
            q_hi[start:end] = end - 1
        if s.mode == NOISE:
            kv_hi[start:end] = end - 1
        start = end
    return dict(doc=doc, index=index, q_hi=q_hi, kv_hi=kv_hi)


def splits_from_lengths(docs: Iterable[Sequence[tuple[str, int]]]) -> list[Split]:
    """Convenience: ``[[(mode, len), ...] per document]`` → flat list of Splits, docs numbered from 1."""
    return [Split(d, mode, n) for d, doc in enumerate(docs, start=1) for mode, n in doc]
