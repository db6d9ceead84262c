"""Stored records → ``Sample``s, one rule per data kind, following the reference datasets.

Every builder writes the same record layout (builders/common.py): ``kind``, ``meta`` (JSON), ``images``
(encoded bytes; empty = the file was missing at build time), ``image_names`` and ``source`` (``file:line``).
``record_schema.py`` checks a record's types first (any record: a bad one is a ``RecordError`` with a skip reason);
then per kind, ``meta`` → segments:

* ``t2i``: ``{"captions": [str, ...]}``, 1 image → ``Text(caption, cfg)``, ``Image(noised)``; one random
  caption (``t2i_dataset.py``).
* ``vlm``: ``{"conversations": [{"from": "human"|"gpt", "value": str}]}`` (LLaVA) → human turns ``Text(loss=0)``
  split on ``<image>`` into texts and ``Image(vit)``; gpt turns ``Text(loss=1)``; nothing droppable; a sample
  without loss is skipped (``vlm_dataset.py``).
* ``edit``: ``{"instructions": [[str, ...] per step]}`` → source ``Image(clean, vit, cfg)``; random start/end at
  most 2 steps apart; either one joined instruction + ``Image(noised)``, or per step ``Text(cfg)`` +
  ``Image(noised+clean, vit, cfg)`` and the last ``Image(noised)`` (``edit_dataset.py``).
* ``video``: ``{"captions": [str] * (frames - 1)}`` (frames without timing, e.g. a folder) → frames as an edit
  chain: frame 0 ``Image(clean, vit, cfg)``; per change ``Text(caption, cfg)`` + ``Image(noised+clean, vit, cfg)``,
  the last frame ``Image(noised)``.
  With ``"frame_indexes"`` (frames sampled from a video file; captions optional) → future-frame prediction with the
  reference's ``_add_video`` splits: k ~ U{1..frames-1} context frames as one clean ``Video`` (+ ViT per frame,
  ``cfg``), the captions of the changes from frame k-1 on joined as ``Text(cfg)``, the remaining frames as one
  noised ``Video`` (one shared timestep); RoPE steps by ``frame_delta`` inside each clip split.
  ``future_context_frames=k`` (> 0) instead makes every such sample k context frames → the next frame as the one
  target (the layout future-frame evaluation asks for): a window of k + 1 consecutive frames at a random start, and
  the caption of the change into the target; a clip of n ≤ k frames gives its first n - 1 frames → its last.
* ``web``: ``{"items": [{"text": str} | {"image": i}]}`` → ``Text(loss=1, cfg)``; an image with text before it
  is generated (``noised``) and, unless last, kept as a condition (``clean`` + ``vit``); a leading image is a
  condition only.

The reference registers no video or web dataset; those two rules use its ``_add_text`` / ``_add_image`` building
blocks (``interleave_t2i_dataset.py``) the way the edit dataset does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bagel_jax.data import images as img_lib
from bagel_jax.data.record_schema import KINDS, Record, RecordError, parse_record
from bagel_jax.data.sample import Image, Sample, Text, Video
from bagel_jax.data.skips import SKIP_REASONS

__all__ = ["KINDS", "SKIP_REASONS", "RecordDecoder", "RecordError"]


@dataclasses.dataclass
class RecordDecoder:
    """Callable ``(record, rng, key, where) -> Sample`` for one data kind. Picklable (grain workers).

    Raises only ``RecordError`` or ``images.ImageError`` (both with a ``reason`` in ``skips.SKIP_REASONS``) for
    any record; ``where`` names the record in messages when it has no ``source`` feature.
    """

    kind: str
    tokenizer: object
    vae_rule: img_lib.ResizeRule
    vit_rule: img_lib.ResizeRule
    max_input_pixels: int = img_lib.DEFAULT_MAX_INPUT_PIXELS
    future_context_frames: int = 0  # 0: the reference's random split; k > 0: k context frames → the next one

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; known: {KINDS}")
        if not (isinstance(self.future_context_frames, int) and self.future_context_frames >= 0):
            raise ValueError(f"future_context_frames: must be an int >= 0, got {self.future_context_frames!r}")

    def __call__(self, record, rng: np.random.Generator, key: int = -1, where: str = "") -> Sample:
        rec = parse_record(record, self.kind, where or f"{self.kind} record {key}")
        ctx = _Context(self, rec)
        segments = getattr(self, f"_{rec.kind}")(rec.fields, ctx, rng)
        return Sample(segments=segments, key=key, kind=rec.kind, source=rec.source)

    # --- per kind ----------------------------------------------------------------------------------------------
    def _t2i(self, fields, ctx, rng):
        tokenized = [ids for ids in (self.tokenizer.encode(c) for c in fields["captions"]) if ids]
        if not tokenized:
            raise RecordError(f"{ctx.source}: no non-empty caption", "empty_text")
        caption = tokenized[int(rng.integers(len(tokenized)))]
        return [Text(caption, loss=False, cfg=True), ctx.image(0, vae="noised")]

    def _vlm(self, fields, ctx, rng):
        num_images = ctx.num_images
        segments = []
        for who, value in fields["turns"]:
            if who == "human":
                if "<image>" not in value:
                    pieces = [(value, False)]
                else:
                    parts = value.split("<image>")
                    pieces = []
                    for idx, part in enumerate(parts):
                        if part.strip():
                            pieces.append((part.strip(), False))
                        if idx != len(parts) - 1 and idx < num_images:
                            pieces.append((None, True))
                for text, is_image in pieces:
                    if is_image:
                        segments.append(("image", None))
                    else:
                        segments.append(("text", (text, False)))
            else:  # gpt (record_schema.ROLES)
                segments.append(("text", (value, True)))
        out, image_i = [], 0
        for what, val in segments:
            if what == "image":
                out.append(ctx.image(image_i, vit=True, img_num=num_images))
                image_i += 1
            else:
                ids = self.tokenizer.encode(val[0])
                if ids:
                    out.append(Text(ids, loss=val[1], cfg=False))
        if not any(isinstance(s, Text) for s in out):
            raise RecordError(f"{ctx.source}: conversation has no text", "empty_text")
        if not any(isinstance(s, Text) and s.loss for s in out):
            raise RecordError(f"{ctx.source}: no answer to train on (no loss)", "no_loss")
        return out

    def _instruction(self, alternatives, ctx, rng) -> str:
        return alternatives[int(rng.integers(len(alternatives)))]

    def _encode_nonempty(self, text, ctx):
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RecordError(f"{ctx.source}: empty text {text[:60]!r}", "empty_text")
        return ids

    def _edit(self, fields, ctx, rng):
        n = ctx.num_images
        instructions = fields["instructions"]
        start = int(rng.integers(n - 1))
        end = int(rng.integers(start + 1, min(start + 3, n)))
        out = [ctx.image(start, vae="clean", vit=True, cfg=True)]
        if end - start > 1 and rng.random() < 0.5:  # one concatenated instruction
            if end == n - 1:
                end -= 1
            joined = "".join(self._instruction(instructions[i - 1], ctx, rng) + ". " for i in range(start + 1, end + 1))
            out.append(Text(self._encode_nonempty(joined.rstrip(), ctx), loss=False, cfg=True))
            out.append(ctx.image(end, vae="noised"))
        else:
            for i in range(start + 1, end + 1):
                out.append(
                    Text(
                        self._encode_nonempty(self._instruction(instructions[i - 1], ctx, rng), ctx),
                        loss=False,
                        cfg=True,
                    )
                )
                if i != end:
                    out.append(ctx.image(i, vae="noised+clean", vit=True, cfg=True))
                else:
                    out.append(ctx.image(i, vae="noised"))
        return out

    def _video(self, fields, ctx, rng):
        if fields.get("frame_indexes") is not None:
            return self._future_frames(fields, ctx, rng)
        n = ctx.num_images
        captions = fields["captions"]
        out = [ctx.image(0, vae="clean", vit=True, cfg=True)]
        for i in range(1, n):
            out.append(Text(self._encode_nonempty(captions[i - 1], ctx), loss=False, cfg=True))
            out.append(ctx.image(i, vae="noised+clean" if i < n - 1 else "noised", vit=i < n - 1, cfg=True))
        return out

    def _future_frames(self, fields, ctx, rng):
        n, idx, captions = ctx.num_images, fields["frame_indexes"], fields["captions"]
        if self.future_context_frames:  # a window [s, s + k] of k context frames and the one next frame
            k = min(self.future_context_frames, n - 1)
            s = int(rng.integers(0, n - k))
            idx, captions, n = idx[s : s + k + 1], captions[s : s + k] if captions else captions, k + 1
        else:
            s, k = 0, int(rng.integers(1, n))
        context = [ctx.image(s + i, vae="clean", vit=True) for i in range(k)]
        out = [
            Video(
                [im.vae_pixels for im in context],
                idx[:k],
                vae="clean",
                vit=True,
                cfg=True,
                vit_pixels=[im.vit_pixels for im in context],
                name=f"{ctx.source}: frames {s}-{s + k - 1}",
            )
        ]
        ids = self.tokenizer.encode(" ".join(captions[k - 1 :])) if captions else []
        if ids:
            out.append(Text(ids, loss=False, cfg=True))
        targets = [ctx.image(s + i, vae="noised").vae_pixels for i in range(k, n)]
        out.append(Video(targets, idx[k:], vae="noised", name=f"{ctx.source}: frames {s + k}-{s + n - 1}"))
        return out

    def _web(self, fields, ctx, rng):
        items = fields["items"]
        out, seen_text = [], False
        for pos, (what, value) in enumerate(items):
            last = pos == len(items) - 1
            if what == "text":
                ids = self.tokenizer.encode(value)
                if ids:
                    out.append(Text(ids, loss=True, cfg=True))
                    seen_text = True
            elif not seen_text:
                out.append(ctx.image(value, vae="clean", vit=True, cfg=True))
            else:
                out.append(ctx.image(value, vae="noised" if last else "noised+clean", vit=not last, cfg=True))
        if not seen_text:
            raise RecordError(f"{ctx.source}: web document has no text", "empty_text")
        return out


class _Context:
    """Lazily decodes and resizes the images of one record (each decoded once, resized per role)."""

    def __init__(self, dec: RecordDecoder, rec: Record):
        self.dec, self.rec, self.source = dec, rec, rec.source
        self._decoded = {}

    @property
    def num_images(self) -> int:
        return self.rec.num_images

    def _pil(self, i: int):
        if i not in self._decoded:
            self._decoded[i] = img_lib.decode_image(
                self.rec.images[i], self.rec.image_name(i), self.dec.max_input_pixels
            )
        return self._decoded[i]

    def image(self, i: int, vae: str = "none", vit: bool = False, cfg: bool = False, img_num: int = 1) -> Image:
        pil = self._pil(i)
        name = self.rec.image_name(i)
        vae_px = img_lib.resize(pil, self.dec.vae_rule, 1, name, self.dec.max_input_pixels) if vae != "none" else None
        vit_px = img_lib.resize(pil, self.dec.vit_rule, img_num, name, self.dec.max_input_pixels) if vit else None
        return Image(vae=vae, vit=vit, cfg=cfg, vae_pixels=vae_px, vit_pixels=vit_px, name=name)
