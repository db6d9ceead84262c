"""Image sizes of the evaluators' held-out scenes (shared by shapes-GenEval, -VQA and -edit) and the sampling
seeds of the images they ask a model to generate."""
from __future__ import annotations

import numpy as np


def check_sizes(min_px: int, max_px: int) -> None:
    if not 8 <= min_px <= max_px:
        raise ValueError(f"min_px/max_px: need 8 <= min_px <= max_px, got {min_px}, {max_px}")


def draw_size(rng: np.random.Generator, min_px: int, max_px: int, square: bool = False) -> tuple[int, int]:
    """(width, height) in [min_px, max_px]; ``square``: height = width (the same draws either way, so every other
    draw of an example stays the same)."""
    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    return (w, w) if square else (w, h)


def noise_seed(*index: int) -> int:
    """A sampling seed in [0, 2**31) for one generated image, from its evaluator seed, salt and indices: images get
    independent noise (not one shared ``key(0)``, which makes every image's errors the same draw), and an image's
    seed does not change when the evaluator draws more examples."""
    return int(np.random.SeedSequence([int(i) for i in index]).generate_state(1)[0] & 0x7FFFFFFF)
