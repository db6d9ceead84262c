"""shapes-edit: instruction-based image editing on shape scenes, scored with the detector.

Each example is a source scene, one edit (``recolor``, ``move``, ``add``, ``remove``; balanced) phrased with the
builder's ``edit`` templates (only phrasings that name one object unambiguously), and the target scene. The
edited image is reduced by ``detector.detect_objects`` to a multiset D of (shape, colour, cell), the target T
and the source S likewise; the cells the edit touches are those of the objects in S △ T:

* ``edit_success``: in the touched cells D equals T (the recoloured / moved / added shape is there and right,
  the removed or moved-away one is gone);
* ``preservation``: in every other cell D equals T (nothing else changed, appeared or vanished);
* ``overall``: D == T (both of the above); also reported per operation.

Those verdicts are all-or-nothing per edit, so a model that is only starting to edit scores 0 on a few dozen edits.
Beside them, the distance to the ground truth (MagicBrush's L1, Zhang et al. 2023) grades every edit: the target is
rendered at the edited image's size and compared pixel by pixel (mean |edited − target| / 255 over pixels and
channels), over the touched cells (``edit_l1``) and over the rest (``rest_l1``). Lower is better. For reference, two
edits that do nothing useful (properties of the examples, not of the model): ``edit_l1_unedited`` returns the source
unchanged (its ``rest_l1`` is 0), ``edit_l1_blank`` returns an empty canvas.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.data.builders.synthetic_shapes import _where  # the builder's phrasing helper
from bagel_jax.eval import canvas, detector
from bagel_jax.eval.batched import call_all

OPS = ("recolor", "move", "add", "remove")
_SALT = 0xED17
_NOISE_SALT = 0xED18  # the edited images' sampling seeds


@dataclasses.dataclass(frozen=True)
class EditExample:
    op: str
    instruction: str
    source: tuple[shapes.Obj, ...]
    target: tuple[shapes.Obj, ...]
    width: int
    height: int

    def render(self, which: str = "source", width: int | None = None, height: int | None = None) -> np.ndarray:
        """uint8 [H, W, 3] of the source or target scene, at the example's size unless given."""
        objs = {"source": self.source, "target": self.target}[which]
        return np.asarray(shapes.render(list(objs), width or self.width, height or self.height))

    def touched_cells(self) -> set[int]:
        return {o.cell for o in set(self.source) ^ set(self.target)}

    def l1(self, image: np.ndarray) -> tuple[float, float]:
        """(touched cells, other cells): mean |image − the target scene rendered at image's size| / 255."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image: expected [H, W, 3], got shape {image.shape}")
        h, w = image.shape[:2]
        truth = self.render("target", w, h).astype(np.float32)
        diff = np.abs(image.astype(np.float32) - truth).mean(-1) / 255.0  # [H, W]
        cell = (np.arange(h)[:, None] * 3 // h) * 3 + np.arange(w)[None, :] * 3 // w  # [H, W]: 0..8 row-major
        touched = np.isin(cell, sorted(self.touched_cells()))
        return float(diff[touched].mean()), float(diff[~touched].mean()) if (~touched).any() else 0.0

    def judge(self, detected: Sequence[shapes.Obj]) -> tuple[bool, bool]:
        """(edit_success, preservation) of an edited image's detections."""
        edited = self.touched_cells()
        d, t = collections.Counter(detected), collections.Counter(self.target)
        edit_ok = {o: n for o, n in d.items() if o.cell in edited} == {o: n for o, n in t.items() if o.cell in edited}
        preserve_ok = {o: n for o, n in d.items() if o.cell not in edited} == {
            o: n for o, n in t.items() if o.cell not in edited
        }
        return edit_ok, preserve_ok


def _scene(rng, n: int) -> list[shapes.Obj]:
    cells = rng.choice(9, size=n, replace=False)
    return [
        shapes.Obj(
            shapes.SHAPES[rng.integers(3)], detector.COLOR_NAMES[rng.integers(len(detector.COLOR_NAMES))], int(c)
        )
        for c in cells
    ]


def _unique(objs, **attrs) -> bool:
    return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs) == 1


def draw_example(
    op: str, rng: np.random.Generator, min_px: int = 64, max_px: int = 96, square: bool = False
) -> EditExample:
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    n_range = {"recolor": (1, 3), "move": (1, 3), "add": (1, 2), "remove": (2, 3)}[op]
    while True:
        objs = _scene(rng, int(rng.integers(n_range[0], n_range[1] + 1)))
        free = [c for c in range(9) if c not in {o.cell for o in objs}]
        k = int(rng.integers(len(objs)))
        o = objs[k]
        by_shape, by_both = _unique(objs, shape=o.shape), _unique(objs, shape=o.shape, color=o.color)
        if op == "recolor":
            color = [c for c in detector.COLOR_NAMES if c != o.color][rng.integers(len(detector.COLOR_NAMES) - 1)]
            new = objs[:k] + [shapes.Obj(o.shape, color, o.cell)] + objs[k + 1 :]
            phrasings = [f"make the {o.shape} {color}"] * by_shape + [
                f"change the colour of the {o.color} {o.shape} to {color}"
            ] * by_both
        elif op == "move":
            cell = int(free[rng.integers(len(free))])
            new = objs[:k] + [shapes.Obj(o.shape, o.color, cell)] + objs[k + 1 :]
            phrasings = [f"move the {o.color} {o.shape} to the {shapes.PLACES[cell]}"] * by_both + [
                f"put the {o.shape} {_where(cell)}"
            ] * by_shape
        elif op == "add":
            color = detector.COLOR_NAMES[rng.integers(len(detector.COLOR_NAMES))]
            add = shapes.Obj(shapes.SHAPES[rng.integers(3)], color, int(free[rng.integers(len(free))]))
            new = objs + [add]
            phrasings = [f"add a {add.color} {add.shape} {_where(add.cell)}"]
        else:
            new = objs[:k] + objs[k + 1 :]
            phrasings = [f"remove the {o.color} {o.shape}"] * by_both + [f"delete the {o.shape} {_where(o.cell)}"]
        if phrasings:
            w, h = canvas.draw_size(rng, min_px, max_px, square)
            return EditExample(op, phrasings[rng.integers(len(phrasings))], tuple(objs), tuple(new), w, h)


def make_examples(
    num_examples: int, seed: int = 0, min_px: int = 64, max_px: int = 96, square: bool = False
) -> list[EditExample]:
    """Example i has op ``OPS[i % 4]`` and depends only on (seed, i)."""
    return canvas.cycled_examples(draw_example, OPS, _SALT, num_examples, seed, min_px, max_px, square)


class ShapesEdit:
    """Evaluator: ``run(edit_fn)`` with ``edit_fn(image: uint8 [H, W, 3], instruction: str, seed: int) -> image``
    (``seed`` picks the sampling noise, its own per example: ``canvas.noise_seed``)
    → {"edit_success", "preservation", "overall", and "overall" per op as "recolor", "move", "add", "remove";
    "edit_l1", "rest_l1" (lower is better) and the references "edit_l1_unedited", "edit_l1_blank"}."""

    fn_name = "edit_fn"

    def __init__(self, num_examples: int = 32, seed: int = 0, min_px: int = 64, max_px: int = 96, square: bool = False):
        self.examples = make_examples(num_examples, seed, min_px, max_px, square)
        self.seeds = [canvas.noise_seed(seed, _NOISE_SALT, i) for i in range(num_examples)]

    def judge(self, images) -> list[tuple[bool, bool]]:
        images = list(images)
        if len(images) != len(self.examples):
            raise ValueError(f"images: expected {len(self.examples)} (one per example), got {len(images)}")
        return [e.judge(detector.detect_objects(img)) for e, img in zip(self.examples, images)]

    def score(self, images) -> dict[str, float]:
        images = list(images)
        verdicts = self.judge(images)
        both = [a and b for a, b in verdicts]
        out = {
            "edit_success": float(np.mean([a for a, _ in verdicts])),
            "preservation": float(np.mean([b for _, b in verdicts])),
            "overall": float(np.mean(both)),
        }
        for op in OPS:
            hits = [ok for e, ok in zip(self.examples, both) if e.op == op]
            if hits:
                out[op] = float(np.mean(hits))
        edit_l1, rest_l1 = np.mean([e.l1(img) for e, img in zip(self.examples, images)], axis=0)
        sizes = [np.asarray(img).shape[1::-1] for img in images]  # (W, H) of each edited image
        unedited = [e.l1(e.render("source", w, h))[0] for e, (w, h) in zip(self.examples, sizes)]
        blank = [e.l1(np.asarray(shapes.render([], w, h)))[0] for e, (w, h) in zip(self.examples, sizes)]
        out.update(
            edit_l1=float(edit_l1),
            rest_l1=float(rest_l1),
            edit_l1_unedited=float(np.mean(unedited)),
            edit_l1_blank=float(np.mean(blank)),
        )
        return out

    def run(self, edit_fn: Callable[[np.ndarray, str, int], object]) -> dict[str, float]:
        return self.score(
            call_all(
                edit_fn, [e.render() for e in self.examples], [e.instruction for e in self.examples], list(self.seeds)
            )
        )
