"""Parts of a nested-dict param tree: the trainable leaves an EMA holds, the leaves a checkpoint stores, and merging
them back into the full tree.

A part keeps the full tree's keys for the leaves it holds and drops the others (a dict left empty is dropped too), so
it is an ordinary pytree that Orbax saves and restores and ``jax.tree.map`` walks. Any node that is not a mapping is
a leaf (an array, a ``ShapeDtypeStruct``, a ``nn.LogicallyPartitioned`` box, a sharding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def select(tree: Any, mask: Any) -> dict:
    """The part of ``tree`` where the bool tree ``mask`` (same nesting; one bool per leaf) is True."""
    out = {}
    for key, sub in tree.items():
        keep = mask[key]
        if isinstance(sub, Mapping):
            part = select(sub, keep)
            if part:
                out[key] = part
        elif keep:
            out[key] = sub
    return out


def like(tree: Any, part: Any) -> dict:
    """The leaves of ``tree`` at the paths the part ``part`` holds (e.g. the params an EMA follows)."""
    return {key: like(tree[key], sub) if isinstance(sub, Mapping) else tree[key] for key, sub in part.items()}


def within(tree: Any, other: Any) -> dict:
    """The leaves of ``tree`` at paths ``other`` also has (either may hold leaves the other does not)."""
    out = {}
    for key, sub in tree.items():
        if key not in other:
            continue
        if isinstance(sub, Mapping):
            part = within(sub, other[key]) if isinstance(other[key], Mapping) else {}
            if part:
                out[key] = part
        elif not isinstance(other[key], Mapping):
            out[key] = sub
    return out


def merge(*parts: Any) -> dict:
    """The union of ``parts`` (later parts win where two hold the same leaf)."""
    out: dict = {}
    for part in parts:
        for key, sub in part.items():
            if isinstance(sub, Mapping):
                out[key] = merge(out.get(key, {}), sub)
            else:
                out[key] = sub
    return out


def paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The key path of every leaf of ``tree``, in key order."""
    out = []
    for key in sorted(tree):
        sub = tree[key]
        out.extend(paths(sub, prefix + (key,)) if isinstance(sub, Mapping) else [prefix + (key,)])
    return out


def missing(tree: Any, part: Any) -> list[str]:
    """'/'-joined paths of the leaves of ``tree`` that ``part`` does not hold."""
    have = set(paths(part))
    return ["/".join(p) for p in paths(tree) if p not in have]
