"""shapes-GenEval: text-to-image compositional accuracy on synthetic shapes, scored like GenEval.

GenEval (Ghosh et al., 2023) generates images for templated prompts in six categories and checks them with an
object detector; a prompt is correct only if every requirement holds, and the overall score is the mean of
the six category accuracies. Here the "classes" are the renderer's shapes, the detector is ``detector.detect``
and the prompts are the builder's own captions (``synthetic_shapes.describe``), so a model trained on the
shapes data understands them:

=============  ===============================================  =============================================
category       prompt (builder caption of a random scene)       correct when the detections hold (and no more
                                                                objects than the caption describes)
=============  ===============================================  =============================================
single_object  "A red circle at the top left."                  ≥ 1 circle
two_object     "An image with one blue square and one red …"    ≥ 1 of each of the two (different) shapes
counting       "An image with three green triangles."           exactly N triangles (N ∈ {2, 3})
colors         "An image with one yellow square."               ≥ 1 yellow square
position       "A red circle at the top left and a blue …"      each shape at the grid cell its prompt names
color_attr     "An image with one blue square and one red …"    a blue square and a red circle (two shapes and
                                                                two colours, each colour bound to its shape)
=============  ===============================================  =============================================

Like GenEval, counting checks the shape count regardless of colour, and single/two-object and position
checks ignore colour. Unlike GenEval, every prompt here is the caption of a whole scene, so an image is also
wrong when it holds more objects than the prompt describes (``GenExample.no_extras``): without this rule an
untrained model, whose images are colour blobs the detector reads as many shapes, passed the "≥ 1 circle"
checks by chance (it scored 1.0 on single and two objects). Position is absolute (the captions name grid cells),
where GenEval's prompts are relative. Prompts are drawn from a random stream separate from the builder's (a
different salt), and ``exclude`` (e.g. every training caption) removes prompts outright.

Like GenEval (4 images per prompt), ``samples_per_prompt`` images are generated per prompt, each from its own
sampling seed (``canvas.noise_seed``), and a category's accuracy is the mean over all of its images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.eval import canvas, detector
from bagel_jax.eval.batched import call_all

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_SALT = 0x6E5E  # separates this stream from the builder's (which seeds with [seed, split, i])
_NOISE_SALT = 0x6E5F  # the images' sampling seeds
_MAX_DRAWS = 1000


@dataclasses.dataclass(frozen=True)
class Requirement:
    """At least ``count`` detections of ``shape`` (with ``color`` / at ``cell`` when given); with ``exact``,
    also no more than ``count`` of ``shape`` in total (GenEval's counting "exclude" rule)."""

    shape: str
    count: int = 1
    color: str | None = None
    cell: int | None = None
    exact: bool = False

    def holds(self, objs: Sequence[shapes.Obj]) -> bool:
        same_shape = [o for o in objs if o.shape == self.shape]
        matching = [
            o
            for o in same_shape
            if (self.color is None or o.color == self.color) and (self.cell is None or o.cell == self.cell)
        ]
        return len(matching) >= self.count and (not self.exact or len(same_shape) == self.count)


@dataclasses.dataclass(frozen=True)
class GenExample:
    """A prompt, what must hold in its image, and one scene that satisfies it (what an oracle draws)."""

    category: str
    prompt: str
    requirements: tuple[Requirement, ...]
    objects: tuple[shapes.Obj, ...]
    width: int
    height: int

    no_extras: bool = True

    def correct(self, objs: Sequence[shapes.Obj]) -> bool:
        """Every requirement holds and, with ``no_extras``, no more objects are detected than described."""
        if self.no_extras and len(objs) > len(self.objects):
            return False
        return all(r.holds(objs) for r in self.requirements)

    def render(self) -> np.ndarray:
        return np.asarray(shapes.render(list(self.objects), self.width, self.height))


def _objs(rng, n: int, *, distinct_shapes=False, distinct_colors=False, same=False) -> list[shapes.Obj]:
    cells = [int(c) for c in rng.choice(9, size=n, replace=False)]
    shape_ids = rng.choice(3, size=n, replace=not distinct_shapes)
    color_ids = rng.choice(len(detector.COLOR_NAMES), size=n, replace=not distinct_colors)
    if same:
        shape_ids, color_ids = [shape_ids[0]] * n, [color_ids[0]] * n
    return [
        shapes.Obj(shapes.SHAPES[s], detector.COLOR_NAMES[c], cell) for s, c, cell in zip(shape_ids, color_ids, cells)
    ]


def draw_example(
    category: str, rng: np.random.Generator, min_px: int = 64, max_px: int = 96, square: bool = False
) -> GenExample:
    """One example of ``category`` from ``rng`` (see the module table)."""
    if category == "single_object":
        objs = _objs(rng, 1)
        prompt, reqs = shapes.describe(objs)[0], [Requirement(objs[0].shape)]
    elif category == "two_object":
        objs = _objs(rng, 2, distinct_shapes=True)
        prompt, reqs = shapes.describe(objs)[1], [Requirement(o.shape) for o in objs]
    elif category == "counting":
        objs = _objs(rng, int(rng.integers(2, 4)), same=True)
        prompt, reqs = shapes.describe(objs)[1], [Requirement(objs[0].shape, count=len(objs), exact=True)]
    elif category == "colors":
        objs = _objs(rng, 1)
        prompt, reqs = shapes.describe(objs)[1], [Requirement(objs[0].shape, color=objs[0].color)]
    elif category == "position":
        objs = _objs(rng, 2, distinct_shapes=True)
        prompt, reqs = shapes.describe(objs)[0], [Requirement(o.shape, cell=o.cell) for o in objs]
    elif category == "color_attr":
        objs = _objs(rng, 2, distinct_shapes=True, distinct_colors=True)
        prompt, reqs = shapes.describe(objs)[1], [Requirement(o.shape, color=o.color) for o in objs]
    else:
        raise ValueError(f"category: expected one of {CATEGORIES}, got {category!r}")
    w, h = canvas.draw_size(rng, min_px, max_px, square)
    return GenExample(category, prompt, tuple(reqs), tuple(objs), w, h)


def make_examples(
    num_per_category: int,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
    exclude: Iterable[str] = (),
    min_px: int = 64,
    max_px: int = 96,
    square: bool = False,
) -> list[GenExample]:
    """``num_per_category`` examples of each category, deterministic in ``seed``; example i of a category
    depends only on (seed, category, i). Prompts in ``exclude`` are redrawn."""
    if num_per_category < 1:
        raise ValueError(f"num_examples: must be >= 1, got {num_per_category}")
    canvas.check_sizes(min_px, max_px)
    exclude = set(exclude)
    out = []
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(f"categories: unknown {category!r}; known {CATEGORIES}")
        for i in range(num_per_category):
            rng = np.random.default_rng([seed, _SALT, CATEGORIES.index(category), i])
            for _ in range(_MAX_DRAWS):
                ex = draw_example(category, rng, min_px, max_px, square)
                if ex.prompt not in exclude:
                    break
            else:
                raise ValueError(f"exclude: no {category} prompt outside it in {_MAX_DRAWS} draws")
            out.append(ex)
    return out


def aggregate(categories: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Per-category accuracy and ``overall`` = their mean (GenEval's overall score)."""
    per = {}
    for c in dict.fromkeys(categories):
        hits = [ok for cat, ok in zip(categories, correct) if cat == c]
        per[c] = float(np.mean(hits))
    return {**per, "overall": float(np.mean(list(per.values())))}


class ShapesGenEval:
    """Evaluator: ``run(generate_fn)`` with ``generate_fn(prompt: str, seed: int) -> image`` (PIL or [H, W, 3]
    uint8 / float in [0, 1]; ``seed`` picks the sampling noise) → {category: accuracy, ..., "overall": mean}.
    ``num_examples`` is per category, ``samples_per_prompt`` images per prompt (GenEval: 4); ``no_extras=False``
    drops the whole-scene rule and scores exactly like GenEval's requirements; ``square`` draws the reference scenes
    square (``render``; the generated images are whatever ``generate_fn`` makes)."""

    fn_name = "generate_fn"

    def __init__(
        self,
        num_examples: int = 16,
        seed: int = 0,
        categories: Sequence[str] = CATEGORIES,
        exclude: Iterable[str] = (),
        min_px: int = 64,
        max_px: int = 96,
        square: bool = False,
        no_extras: bool = True,
        samples_per_prompt: int = 1,
    ):
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: must be >= 1, got {samples_per_prompt}")
        examples = make_examples(num_examples, seed, tuple(categories), exclude, min_px, max_px, square)
        self.examples = [dataclasses.replace(e, no_extras=no_extras) for e in examples]
        per_category = {}
        self.samples: list[tuple[GenExample, int]] = []  # (example, sampling seed) per image, example-major
        for e in self.examples:
            i = per_category[e.category] = per_category.get(e.category, -1) + 1
            self.samples += [
                (e, canvas.noise_seed(seed, _NOISE_SALT, CATEGORIES.index(e.category), i, k))
                for k in range(samples_per_prompt)
            ]

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    def judge(self, images) -> list[bool]:
        """Correctness of each image (same order as ``samples``)."""
        images = list(images)
        if len(images) != len(self.samples):
            raise ValueError(f"images: expected {len(self.samples)} (one per sample), got {len(images)}")
        return [e.correct(detector.detect_objects(img)) for (e, _), img in zip(self.samples, images)]

    def score(self, images) -> dict[str, float]:
        return aggregate([e.category for e, _ in self.samples], self.judge(images))

    def run(self, generate_fn: Callable[[str, int], object]) -> dict[str, float]:
        return self.score(call_all(generate_fn, [e.prompt for e, _ in self.samples], [n for _, n in self.samples]))
