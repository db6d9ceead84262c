"""Synthetic shapes: procedurally generated multimodal data, no download. Deterministic from a seed.

Scenes of up to three coloured shapes (circle, square, triangle; six colours) on a 3×3 grid of positions, rendered
with PIL and stored as PNG, each side 64–96 px (``square``: width = height, so a grid cell falls on the same latent
tokens and ViT patches in every image once resized). One split per data kind:

* ``t2i``   an image and captions (objects, colours, counts, positions);
* ``vlm``   an image and 1–3 question/answer turns about it (count, colour, position; uniformly, or drawn with
  ``question_weights``), LLaVA format; half of
  the conversations end with "Describe the image." answered by a caption. Without that turn a tiny model
  trained from scratch learnt the answers' priors and ignored the image (blank-image CE equal to 4 digits);
  a caption's every content word depends on the image;
* ``edit``  2–3 images, each made from the previous by one edit (recolour, move, add, remove), with instructions
  ("make the circle blue"), two phrasings per step;
* ``video`` 3–4 frames of one shape moving, a caption per change ("the red circle moves right");
* ``web``   a short document interleaving texts and two or three images.

It is the default data for the tests, the tiny training run and the notebook. Alongside it lives a SentencePiece
model trained on every phrase the generator can produce (``tokenizer_path(data_dir)``), 512 ids incl. the special
tokens, which fits ``configs/tiny.py``.

    python -m bagel_jax.data.builders.synthetic_shapes --data_dir=/tmp/shapes --num_examples=256 [--seed=0] [--square] \
        [--question_weights=3,1,1]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from bagel_jax.data.builders import common

NAME = "synthetic_shapes"
SPLITS = ("t2i", "vlm", "edit", "video", "web")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("no", "one", "two", "three")
DESCRIBE = "Describe the image."
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int  # 0..8, row-major on the 3×3 grid


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _where(cell: int) -> str:
    return "in the center" if PLACES[cell] == "center" else f"at the {PLACES[cell]}"


def render(objs: list[Obj], width: int, height: int, background=(245, 245, 240)) -> Image.Image:
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    cw, ch = width / 3, height / 3
    for o in objs:
        r, c = divmod(o.cell, 3)
        cx, cy = (c + 0.5) * cw, (r + 0.5) * ch
        s = 0.32 * min(cw, ch)
        box = [cx - s, cy - s, cx + s, cy + s]
        if o.shape == "circle":
            draw.ellipse(box, fill=COLORS[o.color])
        elif o.shape == "square":
            draw.rectangle(box, fill=COLORS[o.color])
        else:
            draw.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=COLORS[o.color])
    return img


def cell_labels(objs: list[Obj]) -> tuple[np.ndarray, np.ndarray]:
    """Per grid cell (row-major, 9): shape id (0 = empty, 1 + index in SHAPES) and colour id (0 = empty,
    1 + index in COLORS), int32[9] each."""
    shape, color = np.zeros(9, np.int32), np.zeros(9, np.int32)
    for o in objs:
        shape[o.cell], color[o.cell] = 1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color)
    return shape, color


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def describe(objs: list[Obj]) -> list[str]:
    """Two captions: one with positions, one with counts."""
    detail = " and ".join(f"a {o.color} {o.shape} {_where(o.cell)}" for o in objs)
    groups = {}
    for o in objs:
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    counts = " and ".join(f"{NUMBERS[n]} {c} {_plural(s, n)}" for (c, s), n in sorted(groups.items()))
    return [detail[0].upper() + detail[1:] + ".", f"An image with {counts}."]


QUESTION_KINDS = ("count", "colour", "position")


def normalise_question_weights(weights) -> tuple[float, ...] | None:
    """Normalised (count, colour, position) draw weights of the ``vlm`` questions; None = uniform (also for equal
    weights, so those build the same data). Raises ValueError (one line) unless 3 finite weights >= 0, sum > 0."""
    if weights is None:
        return None
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or not all(np.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"question weights must be 3 finite numbers >= 0 {QUESTION_KINDS}, sum > 0, got {weights}")
    return None if len(set(w)) == 1 else tuple(x / sum(w) for x in w)


class Generator:
    """Deterministic example generator: example ``i`` of split ``s`` depends only on (seed, s, i).

    ``question_weights``: draw weights of the ``vlm`` question kinds (count, colour, position); None = uniform.
    """

    def __init__(self, seed: int = 0, min_px: int = 64, max_px: int = 96, square: bool = False, question_weights=None):
        if not 8 <= min_px <= max_px:
            raise ValueError(f"need 8 <= min_px <= max_px, got {min_px}, {max_px}")
        self.seed, self.min_px, self.max_px, self.square = seed, min_px, max_px, square
        self.question_weights = normalise_question_weights(question_weights)

    def rng(self, split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(split), i])

    def _size(self, rng) -> tuple[int, int]:
        w = int(rng.integers(self.min_px, self.max_px + 1))
        return (w, w) if self.square else (w, int(rng.integers(self.min_px, self.max_px + 1)))

    def _scene(self, rng, n: int | None = None) -> list[Obj]:
        n = int(rng.integers(1, 4)) if n is None else n
        cells = rng.choice(9, size=n, replace=False)
        return [Obj(SHAPES[rng.integers(3)], list(COLORS)[rng.integers(len(COLORS))], int(c)) for c in cells]

    def example(self, split: str, i: int) -> dict:
        rng = self.rng(split, i)
        return {**getattr(self, f"_{split}")(rng, i), "source": f"{NAME}/{split}:{i}"}

    def t2i_scene(self, i: int) -> tuple[list[Obj], int, int]:
        """The objects and (width, height) of ``t2i`` example ``i`` (what its image shows)."""
        rng = self.rng("t2i", i)
        objs = self._scene(rng)
        return (objs,) + self._size(rng)

    def _t2i(self, rng, i):
        objs, w, h = self.t2i_scene(i)
        return common.record("t2i", {"captions": describe(objs)}, [png(render(objs, w, h))], [f"t2i/{i}.png"])

    def _qa(self, rng, objs) -> tuple[str, str]:
        w = self.question_weights
        kind = rng.integers(3) if w is None else rng.choice(3, p=w)
        if kind == 0:
            shape = SHAPES[rng.integers(3)]
            n = sum(o.shape == shape for o in objs)
            answer = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {_plural(shape, n)}."
            return f"How many {shape}s are there?", answer
        o = objs[rng.integers(len(objs))]
        if kind == 1:
            return f"What colour is the {o.shape} {_where(o.cell)}?", f"It is {o.color}."
        return f"Where is the {o.color} {o.shape}?", f"It is {_where(o.cell)}."

    def _vlm(self, rng, i):
        objs = self._scene(rng)
        w, h = self._size(rng)
        turns = [self._qa(rng, objs) for _ in range(int(rng.integers(1, 4)))]
        if rng.random() < 0.5:  # caption turn last (LLaVA's "describe"): dense supervision of the image path
            turns.append((DESCRIBE, describe(objs)[int(rng.integers(2))]))
        conv = []
        for t, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
        return common.record("vlm", {"conversations": conv}, [png(render(objs, w, h))], [f"vlm/{i}.png"])

    def _edit_step(self, rng, objs: list[Obj]) -> tuple[list[Obj], list[str]]:
        free = [c for c in range(9) if c not in {o.cell for o in objs}]
        ops = ["recolor", "move"] + (["add"] if free and len(objs) < 3 else []) + (["remove"] if len(objs) > 1 else [])
        op = ops[rng.integers(len(ops))]
        k = int(rng.integers(len(objs)))
        o = objs[k]
        if op == "recolor":
            color = [c for c in COLORS if c != o.color][rng.integers(len(COLORS) - 1)]
            new = objs[:k] + [Obj(o.shape, color, o.cell)] + objs[k + 1 :]
            return new, [f"make the {o.shape} {color}", f"change the colour of the {o.color} {o.shape} to {color}"]
        if op == "move" and free:
            cell = int(free[rng.integers(len(free))])
            new = objs[:k] + [Obj(o.shape, o.color, cell)] + objs[k + 1 :]
            return new, [f"move the {o.color} {o.shape} to the {PLACES[cell]}", f"put the {o.shape} {_where(cell)}"]
        if op == "add" and free:
            shape, color = SHAPES[rng.integers(3)], list(COLORS)[rng.integers(len(COLORS))]
            add = Obj(shape, color, int(free[rng.integers(len(free))]))
            return objs + [add], [f"add a {color} {shape} {_where(add.cell)}", f"draw a {color} {shape}"]
        new = objs[:k] + objs[k + 1 :]
        return new, [f"remove the {o.color} {o.shape}", f"delete the {o.shape} {_where(o.cell)}"]

    def _edit(self, rng, i):
        objs = self._scene(rng)
        w, h = self._size(rng)
        images, instructions = [png(render(objs, w, h))], []
        for _ in range(int(rng.integers(1, 3))):
            objs, instr = self._edit_step(rng, objs)
            images.append(png(render(objs, w, h)))
            instructions.append(instr)
        names = [f"edit/{i}_{k}.png" for k in range(len(images))]
        return common.record("edit", {"instructions": instructions}, images, names)

    def _video(self, rng, i):
        objs = self._scene(rng)
        w, h = self._size(rng)
        k = int(rng.integers(len(objs)))
        frames, captions = [png(render(objs, w, h))], []
        for _ in range(int(rng.integers(2, 4))):
            o = objs[k]
            r, c = divmod(o.cell, 3)
            taken = {x.cell for x in objs}
            options = [
                (name, (r + dr) * 3 + c + dc)
                for name, (dr, dc) in MOVES.items()
                if 0 <= r + dr < 3 and 0 <= c + dc < 3 and (r + dr) * 3 + c + dc not in taken
            ]
            if not options:
                color = [x for x in COLORS if x != o.color][rng.integers(len(COLORS) - 1)]
                objs = objs[:k] + [Obj(o.shape, color, o.cell)] + objs[k + 1 :]
                captions.append(f"the {o.color} {o.shape} turns {color}")
            else:
                name, cell = options[rng.integers(len(options))]
                objs = objs[:k] + [Obj(o.shape, o.color, cell)] + objs[k + 1 :]
                captions.append(f"the {o.color} {o.shape} moves {name}")
            frames.append(png(render(objs, w, h)))
        names = [f"video/{i}_{f}.png" for f in range(len(frames))]
        return common.record("video", {"captions": captions}, frames, names)

    def _web(self, rng, i):
        objs = self._scene(rng)
        w, h = self._size(rng)
        items = [{"text": "Here is a picture of some shapes."}, {"image": 0}, {"text": describe(objs)[0]}]
        images = [png(render(objs, w, h))]
        for _ in range(int(rng.integers(1, 3))):
            objs, instr = self._edit_step(rng, objs)
            items += [{"text": f"Then we {instr[0]}."}, {"image": len(images)}]
            images.append(png(render(objs, w, h)))
        items.append({"text": "That is all for today."})
        names = [f"web/{i}_{k}.png" for k in range(len(images))]
        return common.record("web", {"items": items}, images, names)


def corpus() -> list[str]:
    """Every phrase the generator can emit (tokenizer training text), independent of seed and sizes."""
    out = ["Here is a picture of some shapes.", "That is all for today.", DESCRIBE]
    for color, shape, cell in itertools.product(COLORS, SHAPES, range(9)):
        o = Obj(shape, color, cell)
        out += describe([o]) + [
            f"What colour is the {shape} {_where(cell)}?",
            f"It is {color}.",
            f"Where is the {color} {shape}?",
            f"It is {_where(cell)}.",
            f"move the {color} {shape} to the {PLACES[cell]}",
            f"put the {shape} {_where(cell)}",
            f"add a {color} {shape} {_where(cell)}",
            f"draw a {color} {shape}",
            f"remove the {color} {shape}",
            f"delete the {shape} {_where(cell)}",
            f"the {color} {shape} moves {list(MOVES)[cell % 4]}",
        ]
        for other in COLORS:
            out += [
                f"make the {shape} {other}",
                f"change the colour of the {color} {shape} to {other}",
                f"the {color} {shape} turns {other}",
                f"Then we make the {shape} {other}.",
            ]
    for shape, n in itertools.product(SHAPES, range(4)):
        out += [f"How many {shape}s are there?", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {_plural(shape, n)}."]
    for a, b in itertools.combinations(list(itertools.product(COLORS, SHAPES)), 2):
        out += describe([Obj(a[1], a[0], 0), Obj(b[1], b[0], 4)])[1:]
    return out


class SyntheticShapes(common.RecordBuilder):
    """Coloured shapes: t2i, vlm, edit, video and web splits (see module docstring)."""

    DESCRIPTION = __doc__

    def __init__(
        self,
        *,
        seed: int = 0,
        num_examples: int = 256,
        min_px: int = 64,
        max_px: int = 96,
        square: bool = False,
        question_weights=None,
        **kwargs,
    ):
        self.params = dict(seed=seed, num_examples=num_examples, min_px=min_px, max_px=max_px, square=square)
        if question_weights is not None:  # only when set: the metadata of uniform data stays as before
            self.params["question_weights"] = list(question_weights)
        super().__init__(**kwargs)

    def _metadata(self):
        return tfds.core.MetadataDict(**self.params)

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
        p = self.params
        gen = Generator(p["seed"], p["min_px"], p["max_px"], p["square"], p.get("question_weights"))
        for i in range(p["num_examples"]):
            yield f"{split}{i:08d}", gen.example(split, i)


def tokenizer_path(data_dir: str) -> str:
    return os.path.join(os.fspath(data_dir), NAME, "tokenizer.model")


def build(
    data_dir: str,
    num_examples: int = 256,
    seed: int = 0,
    min_px: int = 64,
    max_px: int = 96,
    vocab_size: int = 512,
    square: bool = False,
    question_weights=None,
) -> str:
    """Builds the shapes dataset into ``data_dir`` (ArrayRecord, offline) and its tokenizer; returns data_dir.

    ``question_weights``: (count, colour, position) draw weights of the ``vlm`` questions (None or equal: uniform).
    Rebuilding into a ``data_dir`` that already holds shapes made with other parameters raises.
    """
    from bagel_jax.data.tokenizer import train_sentencepiece

    weights = normalise_question_weights(question_weights)
    params = dict(seed=seed, num_examples=num_examples, min_px=min_px, max_px=max_px, square=square)
    params["question_weights"] = None if weights is None else list(weights)
    try:
        existing = common.dataset_dir(data_dir, NAME)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        meta_path = os.path.join(existing, "metadata.json")
        old = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        absent = {"square": False, "question_weights": None}  # keys older builds did not write
        if {k: old.get(k, absent.get(k)) for k in params} != params:
            raise ValueError(f"{existing} holds shapes built with {old}, not {params}; use another data_dir")
    common.build(SyntheticShapes, data_dir, **params)
    tok = tokenizer_path(data_dir)
    if not os.path.exists(tok):
        train_sentencepiece(corpus(), tok, vocab_size)
    return os.fspath(data_dir)


def _weights_arg(text: str) -> tuple[float, ...]:
    """``--question_weights`` "2,1,1" → (2.0, 1.0, 1.0); a bad value is argparse's one-line usage error."""
    try:
        weights = tuple(float(x) for x in text.split(","))
        normalise_question_weights(weights)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--num_examples", type=int, default=256, help="examples per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_px", type=int, default=64)
    p.add_argument("--max_px", type=int, default=96)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--square", action="store_true", help="square images (width = height)")
    p.add_argument(
        "--question_weights",
        type=_weights_arg,
        default=None,
        help="vlm question draw weights count,colour,position (default uniform)",
    )
    a = p.parse_args(argv)
    out = build(a.data_dir, a.num_examples, a.seed, a.min_px, a.max_px, a.vocab_size, a.square, a.question_weights)
    print(f"built {NAME} into {out}; tokenizer {tokenizer_path(out)}")


if __name__ == "__main__":
    main()
