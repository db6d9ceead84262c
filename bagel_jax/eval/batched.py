"""Calling an evaluator's callable on all of its inputs: at once when it has a batched form, else one by one.

A callable may carry ``fn.batch``: the same function over columns of inputs, returning one output per row
(``eval/inferencer_fns.py`` gives the ``Inferencer``'s batched calls this way, so an evaluator's images are
generated many per compiled call). Callables without it (``--fns`` factories, the ground-truth self-check) run row
by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def call_all(fn: Callable, *columns: Sequence) -> list:
    """``[fn(*row) for row in zip(*columns)]``, through ``fn.batch(*columns)`` when ``fn`` has it."""
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"call_all: columns of different lengths {[len(c) for c in columns]}")
    batch = getattr(fn, "batch", None)
    if batch is None:
        return [fn(*row) for row in zip(*columns)]
    out = list(batch(*columns))
    if len(out) != n:
        raise ValueError(f"{getattr(fn, '__name__', 'fn')}.batch returned {len(out)} outputs for {n} inputs")
    return out
