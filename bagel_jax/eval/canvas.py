"""Image sizes of the evaluators' held-out scenes (shared by shapes-GenEval, -VQA and -edit), the example stream
of VQA and edit, and the sampling seeds of the images they ask a model to generate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

Example = TypeVar("Example")


def check_sizes(min_px: int, max_px: int) -> None:
    if not 8 <= min_px <= max_px:
        raise ValueError(f"min_px/max_px: need 8 <= min_px <= max_px, got {min_px}, {max_px}")


def draw_size(rng: np.random.Generator, min_px: int, max_px: int, square: bool = False) -> tuple[int, int]:
    """(width, height) in [min_px, max_px]; ``square``: height = width (the same draws either way, so every other
    draw of an example stays the same)."""
    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    return (w, w) if square else (w, h)


def cycled_examples(
    draw_example: Callable[[str, np.random.Generator, int, int, bool], Example],
    kinds: Sequence[str],
    salt: int,
    num_examples: int,
    seed: int,
    min_px: int,
    max_px: int,
    square: bool,
) -> list[Example]:
    """``num_examples`` examples; example i is ``draw_example(kinds[i % len(kinds)], rng, min_px, max_px, square)``
    with ``rng = default_rng([seed, salt, i])``, so it depends only on (seed, i)."""
    if num_examples < 1:
        raise ValueError(f"num_examples: must be >= 1, got {num_examples}")
    check_sizes(min_px, max_px)
    return [
        draw_example(kinds[i % len(kinds)], np.random.default_rng([seed, salt, i]), min_px, max_px, square)
        for i in range(num_examples)
    ]


def noise_seed(*index: int) -> int:
    """A sampling seed in [0, 2**31) for one generated image, from its evaluator seed, salt and indices: images get
    independent noise (not one shared ``key(0)``, which makes every image's errors the same draw), and an image's
    seed does not change when the evaluator draws more examples."""
    return int(np.random.SeedSequence([int(i) for i in index]).generate_state(1)[0] & 0x7FFFFFFF)
