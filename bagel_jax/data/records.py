"""Stored records → ``Sample``s, one rule per data kind, following the reference datasets.

Every builder writes the same record layout (builders/common.py): ``kind``, ``meta`` (JSON), ``images``
(encoded bytes; empty = the file was missing at build time) and ``image_names``. Per kind, ``meta`` → segments:

* ``t2i``: ``{"captions": [str, ...]}``, 1 image → ``Text(caption, cfg)``, ``Image(noised)``; one random
  caption (``t2i_dataset.py``).
* ``vlm``: ``{"conversations": [{"from": "human"|"gpt", "value": str}]}`` (LLaVA) → human turns ``Text(loss=0)``
  split on ``<image>`` into texts and ``Image(vit)``; gpt turns ``Text(loss=1)``; nothing droppable; a sample
  without loss is skipped (``vlm_dataset.py``).
* ``edit``: ``{"instructions": [[str, ...] per step]}`` → source ``Image(clean, vit, cfg)``; random start/end at
  most 2 steps apart; either one joined instruction + ``Image(noised)``, or per step ``Text(cfg)`` +
  ``Image(noised+clean, vit, cfg)`` and the last ``Image(noised)`` (``edit_dataset.py``).
* ``video``: ``{"captions": [str] * (frames - 1)}`` → frames as an edit chain: frame 0 ``Image(clean, vit, cfg)``;
  per change ``Text(caption, cfg)`` + ``Image(noised+clean, vit, cfg)``, the last frame ``Image(noised)``.
* ``web``: ``{"items": [{"text": str} | {"image": i}]}`` → ``Text(loss=1, cfg)``; an image with text before it
  is generated (``noised``) and, unless last, kept as a condition (``clean`` + ``vit``); a leading image is a
  condition only.

The reference registers no video or web dataset; those two rules use its ``_add_text`` / ``_add_image`` building
blocks (``interleave_t2i_dataset.py``) the way the edit dataset does.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from bagel_jax.data import images as img_lib
from bagel_jax.data.sample import Image, Sample, Text

KINDS = ("t2i", "vlm", "edit", "video", "web")
SKIP_REASONS = ("undecodable_image", "missing_file", "empty_text", "too_large", "no_loss", "bad_image",
                "bad_record")


class RecordError(ValueError):
    """A record that cannot become a sample; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


@dataclasses.dataclass
class RecordDecoder:
    """Callable ``(record, rng, key) -> Sample`` for one data kind. Picklable (grain workers)."""

    kind: str
    tokenizer: object
    vae_rule: img_lib.ResizeRule
    vit_rule: img_lib.ResizeRule
    max_input_pixels: int = img_lib.DEFAULT_MAX_INPUT_PIXELS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; known: {KINDS}")

    def __call__(self, record: dict, rng: np.random.Generator, key: int = -1) -> Sample:
        kind = _text(record.get("kind", self.kind))
        if kind != self.kind:
            raise RecordError(f"record {key}: kind {kind!r} read from a {self.kind!r} source", "bad_record")
        try:
            meta = json.loads(_text(record["meta"]))
        except (KeyError, ValueError) as e:
            raise RecordError(f"record {key}: bad meta JSON ({e})", "bad_record") from None
        names = [_text(n) for n in record.get("image_names", [])]
        raw = list(record.get("images", []))
        names += [f"image{i}" for i in range(len(names), len(raw))]
        ctx = _Context(self, raw, names, key)
        segments = getattr(self, f"_{kind}")(meta, ctx, rng)
        return Sample(segments=segments, key=key, kind=kind)

    # --- per kind ----------------------------------------------------------------------------------------------
    def _t2i(self, meta, ctx, rng):
        captions = meta.get("captions", [])
        if isinstance(captions, dict):  # the reference's parquet stores a JSON dict of captions
            captions = list(captions.values())
        tokenized = [ids for ids in (self.tokenizer.encode(c) for c in captions) if ids]
        if not tokenized:
            raise RecordError(f"record {ctx.key}: no non-empty caption", "empty_text")
        caption = tokenized[int(rng.integers(len(tokenized)))]
        return [Text(caption, loss=False, cfg=True), ctx.image(0, vae="noised")]

    def _vlm(self, meta, ctx, rng):
        conv = meta.get("conversations", [])
        num_images = ctx.num_images
        segments = []
        for turn in conv:
            who, value = turn.get("from"), turn.get("value", "")
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
            elif who == "gpt":
                segments.append(("text", (value, True)))
            else:
                raise RecordError(f"record {ctx.key}: conversation role {who!r} (expected human/gpt)", "bad_record")
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
            raise RecordError(f"record {ctx.key}: conversation has no text", "empty_text")
        if not any(isinstance(s, Text) and s.loss for s in out):
            raise RecordError(f"record {ctx.key}: no answer to train on (no loss)", "no_loss")
        return out

    def _instruction(self, alternatives, ctx, rng) -> str:
        if isinstance(alternatives, str):
            alternatives = [alternatives]
        if not alternatives:
            raise RecordError(f"record {ctx.key}: empty instruction list", "empty_text")
        return alternatives[int(rng.integers(len(alternatives)))]

    def _encode_nonempty(self, text, ctx):
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RecordError(f"record {ctx.key}: empty text {text!r}", "empty_text")
        return ids

    def _edit(self, meta, ctx, rng):
        n = ctx.num_images
        instructions = meta.get("instructions", [])
        if n < 2 or len(instructions) < n - 1:
            raise RecordError(f"record {ctx.key}: edit needs >= 2 images and one instruction list per step, got "
                              f"{n} images, {len(instructions)} instruction lists", "bad_record")
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
                out.append(Text(self._encode_nonempty(self._instruction(instructions[i - 1], ctx, rng), ctx),
                                loss=False, cfg=True))
                if i != end:
                    out.append(ctx.image(i, vae="noised+clean", vit=True, cfg=True))
                else:
                    out.append(ctx.image(i, vae="noised"))
        return out

    def _video(self, meta, ctx, rng):
        n = ctx.num_images
        captions = meta.get("captions", [])
        if n < 2 or len(captions) != n - 1:
            raise RecordError(f"record {ctx.key}: video needs >= 2 frames and frames-1 captions, got {n} frames, "
                              f"{len(captions)} captions", "bad_record")
        out = [ctx.image(0, vae="clean", vit=True, cfg=True)]
        for i in range(1, n):
            out.append(Text(self._encode_nonempty(captions[i - 1], ctx), loss=False, cfg=True))
            out.append(ctx.image(i, vae="noised+clean" if i < n - 1 else "noised", vit=i < n - 1, cfg=True))
        return out

    def _web(self, meta, ctx, rng):
        items = meta.get("items", [])
        out, seen_text = [], False
        for pos, item in enumerate(items):
            last = pos == len(items) - 1
            if "text" in item:
                ids = self.tokenizer.encode(item["text"])
                if ids:
                    out.append(Text(ids, loss=True, cfg=True))
                    seen_text = True
            elif "image" in item:
                i = int(item["image"])
                if not seen_text:
                    out.append(ctx.image(i, vae="clean", vit=True, cfg=True))
                else:
                    out.append(ctx.image(i, vae="noised" if last else "noised+clean", vit=not last, cfg=True))
            else:
                raise RecordError(f"record {ctx.key}: web item {item!r} has neither 'text' nor 'image'", "bad_record")
        if not seen_text:
            raise RecordError(f"record {ctx.key}: web document has no text", "empty_text")
        return out


class _Context:
    """Lazily decodes and resizes the images of one record (each decoded once, resized per role)."""

    def __init__(self, dec: RecordDecoder, raw: list, names: list, key: int):
        self.dec, self.raw, self.names, self.key = dec, raw, names, key
        self._decoded = {}

    @property
    def num_images(self) -> int:
        return len(self.raw)

    def _pil(self, i: int):
        if i >= len(self.raw):
            raise RecordError(f"record {self.key}: image index {i} out of range ({len(self.raw)} images)", "bad_record")
        if i not in self._decoded:
            self._decoded[i] = img_lib.decode_image(bytes(self.raw[i]), self.names[i], self.dec.max_input_pixels)
        return self._decoded[i]

    def image(self, i: int, vae: str = "none", vit: bool = False, cfg: bool = False, img_num: int = 1) -> Image:
        pil = self._pil(i)
        name = self.names[i]
        vae_px = img_lib.resize(pil, self.dec.vae_rule, 1, name, self.dec.max_input_pixels) if vae != "none" else None
        vit_px = img_lib.resize(pil, self.dec.vit_rule, img_num, name, self.dec.max_input_pixels) if vit else None
        return Image(vae=vae, vit=vit, cfg=cfg, vae_pixels=vae_px, vit_pixels=vit_px, name=name)
