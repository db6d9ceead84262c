"""Moving shapes: the tiny future-frame task. Clips of 1–2 shapes on the 3×3 grid of ``synthetic_shapes``, every
shape moving one cell per frame in its own direction; the caption says how ("the red circle moves right and the
blue square moves down"). Stored as ``video`` records with ``frame_indexes`` (0, 1, 2, ...), so training makes
future-frame samples from them (records.py: context frames clean, the later frames noised, ``frame_delta`` RoPE
steps); ``eval/future_frame.py`` scores the generated next frame with the shape detector.

A shape moves two cells at most on a 3×3 grid, so a clip has 2 or 3 frames (each at random, or all ``--num_frames``);
shapes never share a cell in any frame. Clip ``i`` depends only on (seed, num_frames, i).

    python -m bagel_jax.data.builders.moving_shapes --data_dir=/tmp/moving --num_examples=512 [--seed=0 --num_frames=3]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from bagel_jax.data.builders import common
from bagel_jax.data.builders.synthetic_shapes import COLORS, MOVES, SHAPES, Obj, png, render

NAME = "moving_shapes"


@dataclasses.dataclass(frozen=True)
class Clip:
    """``frames[t]``: the objects in frame t; ``moves[j]``: the direction of object j; ``caption`` of the motion."""

    frames: tuple[tuple[Obj, ...], ...]
    moves: tuple[str, ...]
    width: int
    height: int

    @property
    def caption(self) -> str:
        return " and ".join(f"the {o.color} {o.shape} moves {m}" for o, m in zip(self.frames[0], self.moves))

    def render(self, t: int, width: int | None = None, height: int | None = None) -> np.ndarray:
        """uint8 [H, W, 3] of frame ``t`` (``t`` may be one past the last frame only if the motion allows it)."""
        return np.asarray(render(list(self.frames[t]), width or self.width, height or self.height))


def _step(cell: int, move: str, k: int) -> int | None:
    r, c = divmod(cell, 3)
    dr, dc = MOVES[move]
    r, c = r + k * dr, c + k * dc
    return r * 3 + c if 0 <= r < 3 and 0 <= c < 3 else None


def draw_clip(rng: np.random.Generator, num_frames: int = 3, min_px: int = 64, max_px: int = 96) -> Clip:
    """A clip of ``num_frames`` (2 or 3) frames of 1–2 shapes, each moving one cell per frame (module doc)."""
    if num_frames not in (2, 3):
        raise ValueError(f"num_frames: a shape moves at most 2 cells on the 3x3 grid, so 2 or 3; got {num_frames}")
    while True:
        n = int(rng.integers(1, 3))
        objs, moves, paths = [], [], []
        for _ in range(n):
            shape, color = SHAPES[rng.integers(3)], list(COLORS)[rng.integers(len(COLORS))]
            if any(o.shape == shape and o.color == color for o in objs):
                break
            move = list(MOVES)[rng.integers(len(MOVES))]
            start = int(rng.integers(9))
            path = [_step(start, move, k) for k in range(num_frames)]
            if None in path or any(set(path) & set(p) for p in paths):
                break
            objs.append(Obj(shape, color, start))
            moves.append(move)
            paths.append(path)
        else:
            frames = tuple(tuple(Obj(o.shape, o.color, p[t]) for o, p in zip(objs, paths)) for t in range(num_frames))
            w = int(rng.integers(min_px, max_px + 1))
            return Clip(frames, tuple(moves), w, w)


def clip_record(clip: Clip, name: str) -> dict:
    """The clip as a ``video`` record: frames (PNG), one caption per change (the same motion), frame indexes."""
    n = len(clip.frames)
    frames = [png(render(list(f), clip.width, clip.height)) for f in clip.frames]
    meta = {"captions": [clip.caption] * (n - 1), "frame_indexes": list(range(n))}
    return common.record("video", meta, frames, [f"{name}/{t}.png" for t in range(n)], name)


class MovingShapes(common.RecordBuilder):
    """Moving-shapes clips (see module docstring), one ``train`` split."""

    DESCRIPTION = __doc__

    def __init__(self, *, seed: int = 0, num_examples: int = 512, num_frames: int = 0, **kwargs):
        if num_frames not in (0, 2, 3):
            raise ValueError(f"num_frames: 2 or 3 (0 = each clip 2 or 3 at random), got {num_frames}")
        self.params = dict(seed=seed, num_examples=num_examples, num_frames=num_frames)
        super().__init__(**kwargs)

    def _metadata(self):
        return tfds.core.MetadataDict(**self.params)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        p = self.params
        for i in range(p["num_examples"]):
            rng = np.random.default_rng([p["seed"], 0x50FE, i])
            frames = int(rng.integers(2, 4))
            clip = draw_clip(rng, p["num_frames"] or frames)
            yield f"clip{i:08d}", clip_record(clip, f"clip{i}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--num_examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_frames", type=int, default=0, choices=(0, 2, 3), help="frames per clip; 0 = 2 or 3 at random")
    a = p.parse_args(argv)
    out = common.build(MovingShapes, a.data_dir, seed=a.seed, num_examples=a.num_examples, num_frames=a.num_frames)
    print(f"built {NAME} into {out}")


if __name__ == "__main__":
    main()
