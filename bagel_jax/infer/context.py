"""Inference contexts as packed rows (reference ``InterleaveInferencer``, bagel.md §8.1), without a KV cache.

A context is a list of segments (``bagel_jax.data.sample.Text`` / ``Image``), laid out by the data
pipeline's own ``build_document`` and ``pack.assemble``, so inference rows are built exactly like
training rows (same positions, splits, mask). Every call recomputes the whole context: this is the
oracle a cached path is tested against.

Reference semantics reproduced here:

* a text item is ``<|im_start|> ids <|im_end|>`` (one causal split);
* an image item in a generation context goes in as a clean VAE image then its ViT image (``vae=True,
  vit=True``; each advances RoPE by one); in an understanding context as a ViT image only; the ViT
  sees the VAE-resized image (``vae_transform.resize_transform`` first);
* three contexts for image generation: ``gen`` (everything), ``cfg_text`` (``gen`` as it was before the
  last text that follows every image; i.e. a deep copy taken before each text and after each image),
  ``cfg_img`` (all texts, no images);
* the generated image is the query ``<|vision_start|> h·w noised latents <|vision_end|>`` at the
  context's next RoPE id; generated text is ``<|im_start|> t1 … tk`` (+ an ``<|im_end|>`` that causal
  attention hides from the predicting slot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bagel_jax.batch import KIND_NOISED_VAE, PackedBatch
from bagel_jax.data import images as img_lib
from bagel_jax.data.pack import Budgets, assemble, split_extras
from bagel_jax.data.sample import Document, Image, LayoutConfig, Sample, Text, build_document

Item = str | np.ndarray  # a text or an RGB uint8 [H, W, 3] image


@dataclasses.dataclass(frozen=True)
class Contexts:
    """Segments of the three contexts and the size (H, W) of the image to generate (last input image's)."""

    gen: list
    cfg_text: list
    cfg_img: list
    image_hw: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Tokenizer + resize rules (``data.vae_transform`` / ``data.vit_transform``) for context items."""

    tokenizer: object
    vae_rule: img_lib.ResizeRule
    vit_rule: img_lib.ResizeRule

    def text(self, text: str) -> Text:
        return Text(list(self.tokenizer.encode(text)))

    def image(self, pixels: np.ndarray, *, vae: bool, vit: bool, name: str = "image") -> tuple[Image, tuple[int, int]]:
        """(segment, VAE-resized (H, W)). The ViT input is the VAE-resized image, resized by the ViT rule."""
        vae_px = img_lib.resize(np.asarray(pixels, np.uint8), self.vae_rule, name=name)
        vit_px = img_lib.resize(vae_px, self.vit_rule, name=name) if vit else None
        seg = Image(
            vae="clean" if vae else "none", vit=vit, vae_pixels=vae_px if vae else None, vit_pixels=vit_px, name=name
        )
        return seg, vae_px.shape[:2]


def interleave_contexts(
    items: Sequence[Item], pre: Preprocess, *, understanding: bool = False, system_prompt: str | None = None
) -> Contexts:
    """The reference's ``interleave_inference`` context building (``think`` → pass its system prompt)."""
    gen, cfg_text, cfg_img = [], [], []
    image_hw = None
    if system_prompt:
        gen.append(pre.text(system_prompt))
        cfg_img.append(pre.text(system_prompt))
    for n, item in enumerate(items):
        if isinstance(item, str):
            cfg_text = list(gen)
            seg = pre.text(item)
            gen.append(seg)
            cfg_img.append(seg)
        elif isinstance(item, np.ndarray):
            seg, image_hw = pre.image(item, vae=not understanding, vit=True, name=f"input image {n}")
            gen.append(seg)
            cfg_text = list(gen)
        else:
            raise TypeError(f"input item {n}: expected str or uint8 image array, got {type(item).__name__}")
    return Contexts(gen, cfg_text, cfg_img, image_hw)


def query_image(hw: tuple[int, int]) -> Image:
    """The image to generate: a noised VAE image of size (H, W) (its pixels are never used)."""
    return Image(vae="noised", vae_pixels=np.zeros((hw[0], hw[1], 3), np.uint8), name="generated image")


def query_text(generated: Sequence[int]) -> Text:
    """The text being generated: ``<|im_start|> t1 … tk <|im_end|>`` (the end marker is after every predicting slot)."""
    return Text(list(generated))


def layout_for(model_cfg, tokenizer, vae_pad_hw: tuple[int, int]) -> LayoutConfig:
    """Row layout for inference (no CFG dropout), with the VAE canvas ``vae_pad_hw``."""
    return LayoutConfig(
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        vision_start_id=tokenizer.vision_start_id,
        vision_end_id=tokenizer.vision_end_id,
        vit_patch_size=model_cfg.vit.patch_size,
        vit_max_patches_per_side=model_cfg.vit_max_num_patch_per_side,
        vae_downsample=8 * model_cfg.latent_patch_size,
        max_latent_size=model_cfg.max_latent_size,
        vae_pad_hw=tuple(vae_pad_hw),
        interpolate_pos=model_cfg.interpolate_pos,
    )


def vae_canvas(segment_lists: Sequence[Sequence], stride: int = 16) -> tuple[int, int]:
    """The smallest (H, W) holding every VAE image of the segment lists (at least one latent token)."""
    h = w = stride
    for segs in segment_lists:
        for s in segs:
            if isinstance(s, Image) and s.vae != "none":
                h, w = max(h, s.vae_pixels.shape[0]), max(w, s.vae_pixels.shape[1])
    return h, w


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


@dataclasses.dataclass
class Rows:
    """Documents packed one per row (``batch`` numpy PackedBatch, leading dim = len(docs))."""

    batch: PackedBatch
    docs: list
    budgets: Budgets

    def und_slot(self, row: int, natural_index: int) -> int:
        """The und slot of the token at ``natural_index`` of row ``row``'s document."""
        hits = np.nonzero(self.docs[row].und_nat == natural_index)[0]
        if len(hits) != 1:
            raise ValueError(f"row {row}: natural index {natural_index} is not an und token")
        return int(hits[0])

    def noised_slots(self, row: int) -> np.ndarray:
        """Gen-slot offsets (into [0, G)) of the row's noised image, in the image's row-major token order."""
        doc = self.docs[row]
        return np.nonzero(doc.gen_kind == KIND_NOISED_VAE)[0].astype(np.int32)


def pack_rows(
    segment_lists: Sequence[Sequence],
    layout: LayoutConfig,
    *,
    und_len: int | None = None,
    gen_len: int | None = None,
    max_vit_patches: int | None = None,
    max_vae_images: int | None = None,
    multiple: int = 16,
) -> Rows:
    """One document per row, all rows with common (rounded-up, or given) static budgets."""
    rng = np.random.default_rng(0)  # only draws noised-image timesteps, which the samplers override
    docs: list[Document] = [build_document(Sample(list(segs)), layout, rng) for segs in segment_lists]
    costs = np.array([d.cost for d in docs]).reshape(len(docs), 4)
    u = und_len or _round_up(int(costs[:, 0].max()), multiple)
    need_g = int(costs[:, 1].max())
    g = (_round_up(need_g, multiple) if need_g else 0) if gen_len is None else gen_len
    for what, need, have in (("und_len", costs[:, 0].max(), u), ("gen_len", costs[:, 1].max(), g)):
        if need > have:
            raise ValueError(f"context needs {need} {what} slots, the row has {have}")
    b = Budgets(
        seq_len=u + g,
        und_len=u,
        max_vit_patches=max_vit_patches or _round_up(int(costs[:, 2].max()), 8),
        max_vae_images=max_vae_images or max(1, int(costs[:, 3].max())),
        vae_hw=layout.vae_pad_hw,
        vit_patch_dim=3 * layout.vit_patch_size**2,
        max_docs=1,
        latent_stride=layout.vae_downsample,
    )
    fields, _ = split_extras(assemble([[d] for d in docs], b))
    return Rows(PackedBatch(**fields), docs, b)
