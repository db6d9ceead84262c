"""shapes-VQA: questions about shape images, scored by exact match.

The questions and answers use the builder's ``vlm`` templates, so a model trained on the shapes data knows the
format; the scenes come from a random stream separate from the builder's. Three question kinds, balanced:

* ``count``    "How many circles are there?"      → "There are two circles."
* ``color``    "What colour is the square at the top left?" → "It is red."
* ``position`` "Where is the red square?"          → "It is at the top left."  (asked only when unambiguous)

A prediction is correct when, normalised (lower case, single spaces, no trailing punctuation), it equals the
builder-format answer or the bare answer ("two" / "2", "red", "top left" / "at the top left").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.data.builders.synthetic_shapes import _plural, _where  # the builder's phrasing helpers
from bagel_jax.eval import canvas, detector
from bagel_jax.eval.batched import call_all

KINDS = ("count", "color", "position")
_SALT = 0x7A9A


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, trailing ``.!?`` and surrounding spaces removed."""
    return re.sub(r"\s+", " ", str(text)).strip().lower().rstrip(".!? ").strip()


@dataclasses.dataclass(frozen=True)
class VQAExample:
    kind: str
    question: str
    answer: str  # in the builder's format
    accepted: tuple[str, ...]  # normalised strings counted as correct
    objects: tuple[shapes.Obj, ...]
    width: int
    height: int

    def render(self) -> np.ndarray:
        return np.asarray(shapes.render(list(self.objects), self.width, self.height))

    def correct(self, prediction: str) -> bool:
        return normalize(prediction) in self.accepted


def _scene(rng) -> list[shapes.Obj]:
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    return [
        shapes.Obj(
            shapes.SHAPES[rng.integers(3)], detector.COLOR_NAMES[rng.integers(len(detector.COLOR_NAMES))], int(c)
        )
        for c in cells
    ]


def draw_example(
    kind: str, rng: np.random.Generator, min_px: int = 64, max_px: int = 96, square: bool = False
) -> VQAExample:
    while True:
        objs = _scene(rng)
        if kind == "count":
            shape = shapes.SHAPES[rng.integers(3)]
            n = sum(o.shape == shape for o in objs)
            q = f"How many {shape}s are there?"
            a = f"There {'is' if n == 1 else 'are'} {shapes.NUMBERS[n]} {_plural(shape, n)}."
            short = (shapes.NUMBERS[n], str(n)) + (("zero", "none") if n == 0 else ())
        elif kind == "color":
            o = objs[rng.integers(len(objs))]
            q, a, short = f"What colour is the {o.shape} {_where(o.cell)}?", f"It is {o.color}.", (o.color,)
        elif kind == "position":
            unique = [o for o in objs if sum((p.shape, p.color) == (o.shape, o.color) for p in objs) == 1]
            if not unique:
                continue
            o = unique[rng.integers(len(unique))]
            q, a, short = (
                f"Where is the {o.color} {o.shape}?",
                f"It is {_where(o.cell)}.",
                (shapes.PLACES[o.cell], _where(o.cell)),
            )
        else:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        w, h = canvas.draw_size(rng, min_px, max_px, square)
        accepted = tuple(dict.fromkeys(normalize(s) for s in (a, *short)))
        return VQAExample(kind, q, a, accepted, tuple(objs), w, h)


def make_examples(
    num_examples: int, seed: int = 0, min_px: int = 64, max_px: int = 96, square: bool = False
) -> list[VQAExample]:
    """Example i has kind ``KINDS[i % 3]`` and depends only on (seed, i)."""
    return canvas.cycled_examples(draw_example, KINDS, _SALT, num_examples, seed, min_px, max_px, square)


class ShapesVQA:
    """Evaluator: ``run(answer_fn)`` with ``answer_fn(image: uint8 [H, W, 3], question: str) -> str``
    → {"count": acc, "color": acc, "position": acc, "overall": exact-match accuracy over all questions}."""

    fn_name = "answer_fn"

    def __init__(self, num_examples: int = 48, seed: int = 0, min_px: int = 64, max_px: int = 96, square: bool = False):
        self.examples = make_examples(num_examples, seed, min_px, max_px, square)

    def score(self, predictions: Sequence[str]) -> dict[str, float]:
        predictions = list(predictions)
        if len(predictions) != len(self.examples):
            raise ValueError(f"predictions: expected {len(self.examples)} (one per example), got {len(predictions)}")
        for p in predictions:
            if not isinstance(p, str):
                raise TypeError(f"answer_fn: must return str, got {type(p).__name__}")
        hits = [e.correct(p) for e, p in zip(self.examples, predictions)]
        out = {
            k: float(np.mean([h for e, h in zip(self.examples, hits) if e.kind == k]))
            for k in KINDS
            if any(e.kind == k for e in self.examples)
        }
        return {**out, "overall": float(np.mean(hits))}

    def run(self, answer_fn: Callable[[np.ndarray, str], str]) -> dict[str, float]:
        return self.score(call_all(answer_fn, [e.render() for e in self.examples], [e.question for e in self.examples]))
