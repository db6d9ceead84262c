"""Samples (documents made of segments) and their token layout: the reference's ``pack_sequence`` for one sample.

A ``Sample`` is a list of segments in reading order:

* ``Text(ids, loss, cfg)``: one causal split ``<|im_start|> ids <|im_end|>``; with ``loss`` the slots of
  ``<|im_start|> ids`` predict ``ids <|im_end|>`` (the ``<|im_end|>`` slot predicts nothing).
* ``Image(vae=..., vit=..., cfg=...)``: up to three splits, in the reference's ``_add_image`` order:
  ``noised`` VAE (``noise`` split, the generation target), ``clean`` VAE (``full`` split, a condition),
  ViT (``full`` split, a condition). ``vae`` is ``"none" | "clean" | "noised" | "noised+clean"``.
  Every image split is ``<|vision_start|> tokens <|vision_end|>`` with one RoPE id for all of them.

* ``Video(vae_frames, frame_indexes, vae=..., vit=..., cfg=...)``: the reference's ``_add_video``: all VAE frames
  in ONE split (``<|vision_start|> tokens <|vision_end|>`` per frame), frame k at RoPE id ``rope + Σ frame_delta``
  (``frame_delta`` = the gap between the frames' indices in the video); after the last frame the id advances by one
  (clean) or not at all (noised). A noised split draws ONE timestep, shared by all its frames, and is a ``noise``
  split (the reference marks multi-frame noised splits ``full`` as a side effect of its ``frame_delta`` check, which
  would let later tokens see noised latents; we keep §5's rule: nothing outside sees them). ``vit``: then each frame
  as its own ViT split, one RoPE step each (the reference ignores ``frame_delta`` there). A dropped clean video
  (``cfg``) drops the whole split and still advances the id by ``Σ frame_delta + 1`` (the reference drops frame by
  frame and leaves a broken split, as a note in its code admits); ViT frames drop one by one like images.

``cfg`` marks a droppable condition (the reference's ``enable_cfg``): with the configured probabilities a text is
dropped (no position advance), a clean VAE or ViT image is dropped but still advances the position by one.
Noised images never drop. RoPE: texts advance by their length; clean VAE / ViT images by one; noised VAE by zero.

``build_document`` turns a ``Sample`` into a ``Document``: compact numpy arrays (pixels still uint8) for the
und tokens (text + ViT, slots [0, U) of a row) and gen tokens (VAE latents, slots [U, L)), each carrying its
natural (reading-order) index within the document, plus the document's splits. The packer places documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bagel_jax.batch import KIND_CLEAN_VAE, KIND_NOISED_VAE, KIND_TEXT, KIND_VIT
from bagel_jax.data import images as img_lib
from bagel_jax.splits import CAUSAL, FULL, NOISE

VAE_ROLES = ("none", "clean", "noised", "noised+clean")


@dataclasses.dataclass
class Text:
    """Token ids (no special tokens); ``loss``: train next-token CE on it; ``cfg``: droppable condition."""

    ids: Sequence[int]
    loss: bool = False
    cfg: bool = False


@dataclasses.dataclass
class Image:
    """One image in its roles. ``vae_pixels`` uint8 [H, W, 3] (multiples of 16) when ``vae != "none"``;
    ``vit_pixels`` uint8 [h, w, 3] (multiples of the ViT patch) when ``vit``."""

    vae: str = "none"
    vit: bool = False
    cfg: bool = False
    vae_pixels: np.ndarray | None = None
    vit_pixels: np.ndarray | None = None
    name: str = "image"

    def __post_init__(self):
        if self.vae not in VAE_ROLES:
            raise ValueError(f"{self.name}: Image.vae must be one of {VAE_ROLES}, got {self.vae!r}")
        if self.vae == "none" and not self.vit:
            raise ValueError(f"{self.name}: an Image needs a VAE role or vit=True")
        if self.vae != "none" and self.vae_pixels is None:
            raise ValueError(f"{self.name}: vae={self.vae!r} needs vae_pixels")
        if self.vit and self.vit_pixels is None:
            raise ValueError(f"{self.name}: vit=True needs vit_pixels")


@dataclasses.dataclass
class Video:
    """Frames of one clip in one split (module doc). ``vae_pixels``: uint8 [H, W, 3] per frame (multiples of 16);
    ``frame_indexes``: strictly increasing frame numbers in the video; ``vit_pixels`` per frame when ``vit``."""

    vae_pixels: list
    frame_indexes: Sequence[int]
    vae: str = "clean"  # "clean" | "noised"
    vit: bool = False
    cfg: bool = False
    vit_pixels: list | None = None
    name: str = "video"

    def __post_init__(self):
        if self.vae not in ("clean", "noised"):
            raise ValueError(f"{self.name}: Video.vae must be 'clean' or 'noised', got {self.vae!r}")
        if not self.vae_pixels or len(self.frame_indexes) != len(self.vae_pixels):
            raise ValueError(f"{self.name}: Video needs >= 1 frame and one frame index per frame")
        if np.any(np.diff(np.asarray(self.frame_indexes)) <= 0):
            raise ValueError(f"{self.name}: frame indexes must increase, got {list(self.frame_indexes)}")
        if self.vit and (self.vit_pixels is None or len(self.vit_pixels) != len(self.vae_pixels)):
            raise ValueError(f"{self.name}: vit=True needs vit_pixels for every frame")

    @property
    def deltas(self) -> list[int]:
        """RoPE step after each frame but the last (the reference's ``frame_delta``)."""
        f = [int(i) for i in self.frame_indexes]
        return [b - a for a, b in zip(f[:-1], f[1:])]


Segment = Text | Image | Video


@dataclasses.dataclass
class Sample:
    segments: list
    key: int = -1  # record id (source, index) for tracing; see pipeline.record_key
    kind: str = ""
    source: str = ""  # where the record came from (file:line), for messages


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Everything ``build_document`` needs besides the sample (static per run)."""

    bos_id: int
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    vit_patch_size: int = 14
    vit_max_patches_per_side: int = 70
    vae_downsample: int = 16  # pixels per latent token (VAE 8 × latent patch 2)
    max_latent_size: int = 64
    vae_pad_hw: tuple[int, int] = (1024, 1024)  # the row's static VAE image size (H, W)
    interpolate_pos: bool = False
    text_cond_dropout_prob: float = 0.0
    vit_cond_dropout_prob: float = 0.0
    vae_cond_dropout_prob: float = 0.0
    ce_loss_reweighting: bool = False

    @property
    def latent_tokens_per_image(self) -> int:
        h, w = self.vae_pad_hw
        return (h // self.vae_downsample) * (w // self.vae_downsample)


def len2weight(n: int) -> float:
    """The reference's CE weight per token of a text split with ``n`` loss tokens ('square': 1/√n)."""
    return 0.0 if n == 0 else 1.0 / (n**0.5)


@dataclasses.dataclass
class Document:
    """One sample laid out as tokens. Arrays are in natural (reading) order within their group.

    und (text + ViT), length nu: ``und_nat`` natural index in the document, ``und_kind``, ``und_pos`` RoPE id,
    ``und_text`` token id (0 for ViT), ``und_label`` / ``und_ce`` next-token target / weight at this slot.
    gen (VAE latents), length ng: ``gen_nat``, ``gen_kind``, ``gen_pos``, ``gen_src`` (local image k·T + r·W/16 + c),
    ``gen_latent_pos`` (latent position id).
    ViT patches, length nv: ``vit_patches`` uint8 [nv, p·p·3], ``vit_pos``, ``vit_img`` (local image id, 0-based),
    ``vit_und`` (index into the und arrays). VAE images: ``vae_pixels`` (uint8 [h, w, 3] each), ``vae_timestep``.
    Splits: ``split_lens``, ``split_modes`` in natural order.
    """

    key: int
    und_nat: np.ndarray
    und_kind: np.ndarray
    und_pos: np.ndarray
    und_text: np.ndarray
    und_label: np.ndarray
    und_ce: np.ndarray
    gen_nat: np.ndarray
    gen_kind: np.ndarray
    gen_pos: np.ndarray
    gen_src: np.ndarray
    gen_latent_pos: np.ndarray
    vit_patches: np.ndarray
    vit_pos: np.ndarray
    vit_img: np.ndarray
    vit_und: np.ndarray
    num_vit_images: int
    vae_pixels: list
    vae_timestep: np.ndarray
    split_lens: np.ndarray
    split_modes: tuple
    source: str = ""  # the sample's source (file:line), for messages

    @property
    def num_tokens(self) -> int:
        return len(self.und_nat) + len(self.gen_nat)

    @property
    def cost(self) -> tuple[int, int, int, int]:
        """(und tokens, gen tokens, ViT patches, VAE images): what the document takes from each row budget."""
        return len(self.und_nat), len(self.gen_nat), len(self.vit_pos), len(self.vae_pixels)

    def positions(self) -> np.ndarray:
        """RoPE ids of all tokens in natural order (for tests and debugging)."""
        out = np.empty(self.num_tokens, np.int32)
        out[self.und_nat] = self.und_pos
        out[self.gen_nat] = self.gen_pos
        return out

    def kinds(self) -> np.ndarray:
        """Token kinds (batch.KIND_*) in natural order."""
        out = np.empty(self.num_tokens, np.int32)
        out[self.und_nat] = self.und_kind
        out[self.gen_nat] = self.gen_kind
        return out


class _Builder:
    """Accumulates token chunks while walking the segments (the reference's ``pack_sequence`` loop)."""

    def __init__(self, cfg: LayoutConfig):
        self.cfg = cfg
        self.curr = 0  # natural index of the next token
        self.rope = 0
        self.n_und = 0
        self._u = {k: [] for k in ("nat", "kind", "pos", "text", "label", "ce")}
        self._g = {k: [] for k in ("nat", "kind", "pos", "src", "lpos")}
        self._v = {k: [] for k in ("patches", "pos", "img", "und")}
        self.vae_pixels, self.timesteps = [], []
        self.split_lens, self.split_modes = [], []
        self.num_vit_images = 0

    def _und(self, nat, kind, pos, text, label=None, ce=None):
        n = len(nat)
        self._u["nat"].append(np.asarray(nat, np.int32))
        self._u["kind"].append(np.full(n, kind, np.int32))
        self._u["pos"].append(np.asarray(pos, np.int32))
        self._u["text"].append(np.asarray(text, np.int32))
        self._u["label"].append(np.zeros(n, np.int32) if label is None else np.asarray(label, np.int32))
        self._u["ce"].append(np.zeros(n, np.float32) if ce is None else np.asarray(ce, np.float32))
        self.n_und += n

    def text(self, seg: Text):
        c = self.cfg
        ids = np.asarray(seg.ids, np.int32)
        shifted = np.concatenate([[c.bos_id], ids, [c.eos_id]]).astype(np.int32)
        n = len(shifted)
        label = ce = None
        if seg.loss:
            label = np.concatenate([ids, [c.eos_id, 0]]).astype(np.int32)
            w = len2weight(n - 1) if c.ce_loss_reweighting else 1.0
            ce = np.concatenate([np.full(n - 1, w, np.float32), [0.0]]).astype(np.float32)
        self._und(self.curr + np.arange(n), KIND_TEXT, self.rope + np.arange(n), shifted, label, ce)
        self._split(CAUSAL, n)
        self.rope += n

    def _markers(self, inner: int):
        """und tokens <|vision_start|>, <|vision_end|> around ``inner`` image tokens (one RoPE id)."""
        c = self.cfg
        self._und(
            [self.curr, self.curr + 1 + inner], KIND_TEXT, [self.rope, self.rope], [c.vision_start_id, c.vision_end_id]
        )

    def _vae_tokens(self, pixels: np.ndarray, noised: bool, name: str, timestep: float) -> int:
        """Markers + latent tokens of one VAE image at ``self.curr`` / ``self.rope``; advances ``curr`` only."""
        c = self.cfg
        h, w = pixels.shape[:2]
        d = c.vae_downsample
        ph, pw = c.vae_pad_hw
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or h % d or w % d:
            raise img_lib.ImageError(
                f"{name}: VAE pixels must be uint8 [H, W, 3] with H, W multiples of {d}, "
                f"got {pixels.dtype} {pixels.shape}",
                "bad_image",
            )
        if h > ph or w > pw:
            raise img_lib.ImageError(
                f"{name}: VAE image {h}x{w} exceeds the limit data.vae_image_size={ph}x{pw}", "too_large"
            )
        hl, wl = h // d, w // d
        n = hl * wl
        k = len(self.vae_pixels)
        self._markers(n)
        r, col = np.divmod(np.arange(n, dtype=np.int32), wl)
        self._g["nat"].append((self.curr + 1 + np.arange(n)).astype(np.int32))
        self._g["kind"].append(np.full(n, KIND_NOISED_VAE if noised else KIND_CLEAN_VAE, np.int32))
        self._g["pos"].append(np.full(n, self.rope, np.int32))
        self._g["src"].append((k * c.latent_tokens_per_image + r * (pw // d) + col).astype(np.int32))
        self._g["lpos"].append(img_lib.flattened_position_ids(h, w, d, c.max_latent_size, c.interpolate_pos))
        self.vae_pixels.append(pixels)
        self.timesteps.append(timestep if noised else -np.inf)
        self.curr += n + 2
        return n + 2

    def vae(self, pixels: np.ndarray, noised: bool, name: str, rng: np.random.Generator):
        timestep = float(rng.standard_normal()) if noised else -np.inf
        n = self._vae_tokens(pixels, noised, name, timestep)
        self._close_split(NOISE if noised else FULL, n)
        if not noised:
            self.rope += 1

    def video(self, seg: Video, rng: np.random.Generator):
        """One split holding every frame (module doc: ``Video``)."""
        noised = seg.vae == "noised"
        timestep = float(rng.standard_normal()) if noised else -np.inf
        deltas = seg.deltas + [0 if noised else 1]
        total = 0
        for k, (pixels, delta) in enumerate(zip(seg.vae_pixels, deltas)):
            total += self._vae_tokens(pixels, noised, f"{seg.name} frame {k}", timestep)
            self.rope += delta
        self._close_split(NOISE if noised else FULL, total)

    def vit(self, pixels: np.ndarray, name: str):
        c = self.cfg
        p = c.vit_patch_size
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise img_lib.ImageError(
                f"{name}: ViT pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}", "bad_image"
            )
        h, w = pixels.shape[:2]
        patches = img_lib.patchify(pixels, p)
        n = len(patches)
        self._v["patches"].append(patches)
        self._v["pos"].append(img_lib.flattened_position_ids(h, w, p, c.vit_max_patches_per_side, c.interpolate_pos))
        self._v["img"].append(np.full(n, self.num_vit_images, np.int32))
        self._v["und"].append((self.n_und + 1 + np.arange(n)).astype(np.int32))
        self.num_vit_images += 1
        start = self.curr
        # und order within the split: start marker, patches, end marker (natural order too).
        self._und([start], KIND_TEXT, [self.rope], [c.vision_start_id])
        self._und(start + 1 + np.arange(n), KIND_VIT, np.full(n, self.rope), np.zeros(n))
        self._und([start + 1 + n], KIND_TEXT, [self.rope], [c.vision_end_id])
        self._split(FULL, n + 2)
        self.rope += 1

    def _split(self, mode: str, n: int):
        self._close_split(mode, n)
        self.curr += n

    def _close_split(self, mode: str, n: int):
        """Records a split of the last ``n`` tokens (already counted in ``curr``)."""
        self.split_lens.append(n)
        self.split_modes.append(mode)

    def finish(self, key: int, source: str = "") -> Document:
        def cat(chunks, dtype, shape=(0,)):
            return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(shape, dtype)

        u, g, v = self._u, self._g, self._v
        order = np.argsort(cat(u["nat"], np.int32), kind="stable")  # markers were appended out of order
        und = {k: cat(u[k], np.float32 if k == "ce" else np.int32)[order] for k in u}
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order), dtype=order.dtype)
        pdim = 3 * self.cfg.vit_patch_size**2
        vit_und = cat(v["und"], np.int32)
        return Document(
            key=key,
            und_nat=und["nat"],
            und_kind=und["kind"],
            und_pos=und["pos"],
            und_text=und["text"],
            und_label=und["label"],
            und_ce=und["ce"],
            gen_nat=cat(g["nat"], np.int32),
            gen_kind=cat(g["kind"], np.int32),
            gen_pos=cat(g["pos"], np.int32),
            gen_src=cat(g["src"], np.int32),
            gen_latent_pos=cat(g["lpos"], np.int32),
            vit_patches=cat(v["patches"], np.uint8, (0, pdim)),
            vit_pos=cat(v["pos"], np.int32),
            vit_img=cat(v["img"], np.int32),
            vit_und=inv[vit_und].astype(np.int32) if len(vit_und) else vit_und,
            num_vit_images=self.num_vit_images,
            vae_pixels=self.vae_pixels,
            vae_timestep=np.asarray(self.timesteps, np.float32),
            split_lens=np.asarray(self.split_lens, np.int32),
            split_modes=tuple(self.split_modes),
            source=source,
        )


def build_document(sample: Sample, cfg: LayoutConfig, rng: np.random.Generator) -> Document:
    """Lays out ``sample`` as the reference does, drawing CFG dropout and noised-image timesteps from ``rng``."""
    b = _Builder(cfg)
    for seg in sample.segments:
        if isinstance(seg, Text):
            if seg.cfg and rng.random() < cfg.text_cond_dropout_prob:
                continue
            b.text(seg)
        elif isinstance(seg, Image):
            if seg.vae in ("noised", "noised+clean"):
                b.vae(seg.vae_pixels, True, seg.name, rng)
            if seg.vae in ("clean", "noised+clean"):
                if seg.cfg and rng.random() < cfg.vae_cond_dropout_prob:
                    b.rope += 1
                else:
                    b.vae(seg.vae_pixels, False, seg.name, rng)
            if seg.vit:
                if seg.cfg and rng.random() < cfg.vit_cond_dropout_prob:
                    b.rope += 1
                else:
                    b.vit(seg.vit_pixels, seg.name)
        elif isinstance(seg, Video):
            if seg.vae == "clean" and seg.cfg and rng.random() < cfg.vae_cond_dropout_prob:
                b.rope += sum(seg.deltas) + 1
            else:
                b.video(seg, rng)
            for k, px in enumerate(seg.vit_pixels if seg.vit else ()):
                if seg.cfg and rng.random() < cfg.vit_cond_dropout_prob:
                    b.rope += 1
                else:
                    b.vit(px, f"{seg.name} frame {k}")
        else:
            raise TypeError(f"sample {sample.key}: unknown segment type {type(seg).__name__}")
    return b.finish(sample.key, sample.source)
