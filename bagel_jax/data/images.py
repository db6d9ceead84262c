"""Image preprocessing exactly as the reference (``data/transforms.py``, ``data/data_utils.py``), pure numpy + PIL.

Safe inside grain worker processes (no jax, no torch). Pixels stay ``uint8`` until the packer writes them into
the row, where ``normalize`` maps them to [-1, 1] (mean = std = 0.5, the reference's ``ToTensor`` + ``Normalize``).

* ``ResizeRule(max_size, min_size, stride, max_pixels)``: the reference's ``MaxLongEdgeMinShortEdgeResize`` target
  size (Python ``round`` = banker's rounding), then BICUBIC with antialias (PIL's resize, which is what torchvision
  calls for PIL images).
* ``patchify``: [H, W, C] → [(H/p)(W/p), p·p·C], feature order (ph, pw, c), patches row-major.
* ``flattened_position_ids``: the reference's extrapolate (``row·S + col``) and interpolate (bucketed) ids.

Bad input raises ``ImageError`` with one line naming the image and the limit; ``reason`` is the name the pipeline
counts it under (``skips.SKIP_REASONS``: ``missing_file``, ``undecodable_image``, ``image_too_large``, ``bad_image``,
``too_large``). ``decode_image`` raises nothing else, whatever the bytes: the size in the header is checked against
``max_input_pixels`` before any pixel is decoded, and PIL's own decompression-bomb limit is raised so that it never
fires before ours (if it does fire, e.g. for a header PIL reads differently, it counts as ``image_too_large``).

Decoding goes beyond the reference's ``pil_img2rgb`` where it would give wrong pixels: the EXIF orientation is
applied (a rotated phone photo comes out upright), 16-bit and 32-bit images are scaled to 8 bits (PIL's
``convert`` clips them), every mode with an alpha channel (RGBA, LA, PA, palette or RGB with a transparent colour)
is composited on white, and an animated image gives its first frame.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The reference's default pixel budget for ImageTransform (14·14·9·1024).
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024
# Largest decoded input accepted (the reference sets PIL's MAX_IMAGE_PIXELS to 2e8 for VLM/edit data).
DEFAULT_MAX_INPUT_PIXELS = 200_000_000


class ImageError(ValueError):
    """Bad image input; ``reason`` is a counter key, the message names the image and the limit."""

    def __init__(self, message: str, reason: str = "bad_image"):
        super().__init__(message)
        self.reason = reason


def _make_divisible(value: int, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


@dataclasses.dataclass(frozen=True)
class ResizeRule:
    """The reference's resize rule: long side ≤ max_size, short side ≥ min_size, both multiples of ``stride``,
    at most ``max_pixels / img_num`` pixels (``img_num`` = images sharing the budget, e.g. video frames)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_tuple(cls, spec) -> ResizeRule:
        """``(max_size, min_size, stride[, max_pixels])`` as in config ``data.vit_transform``."""
        if len(spec) not in (3, 4):
            raise ValueError(f"resize spec must be (max_size, min_size, stride[, max_pixels]), got {tuple(spec)}")
        return cls(*(int(v) for v in spec))

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """(new_width, new_height) exactly as ``MaxLongEdgeMinShortEdgeResize.forward``."""
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        new_w, new_h = _apply_scale(width, height, scale, self.stride)
        if new_w * new_h > self.max_pixels / img_num:
            scale = self.max_pixels / img_num / (new_w * new_h)
            new_w, new_h = _apply_scale(new_w, new_h, scale, self.stride)
        if max(new_w, new_h) > self.max_size:
            scale = self.max_size / max(new_w, new_h)
            new_w, new_h = _apply_scale(new_w, new_h, scale, self.stride)
        return new_w, new_h


def decode_image(data: bytes, name: str = "image", max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Encoded bytes → RGB PIL image (see the module doc); raises only ``ImageError``."""
    if not data:
        raise ImageError(
            f"{name}: empty image bytes (the file was missing or unreadable when the data was built)", "missing_file"
        )
    allow_pil_pixels(max_input_pixels)
    with warnings.catch_warnings():  # PIL's warnings (its pixel limit, corrupt EXIF, palette transparency) are noise
        warnings.simplefilter("ignore")
        return _decode(data, name, max_input_pixels)


def _decode(data: bytes, name: str, max_input_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        size = tuple(int(v) for v in img.size)
    except Image.DecompressionBombError as e:  # only above 2x our limit (allow_pil_pixels)
        raise ImageError(
            f"{name}: exceeds the limit max_input_pixels={max_input_pixels} ({e})", "image_too_large"
        ) from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types on hostile bytes; all mean "not an image")
        raise ImageError(f"{name}: undecodable image ({_describe(e)})", "undecodable_image") from None
    check_size(size, name, max_input_pixels)  # from the header, before any pixel is decoded
    try:
        out = to_rgb(_upright(img))
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name}: exceeds the limit max_input_pixels={max_input_pixels} ({e})", "image_too_large"
        ) from None
    except MemoryError:
        raise ImageError(
            f"{name}: {size[0]}x{size[1]} does not fit in memory (lower data.max_input_pixels)", "image_too_large"
        ) from None
    except Exception as e:  # noqa: BLE001  (truncated / corrupt data surfaces on load)
        raise ImageError(f"{name}: undecodable image ({_describe(e)})", "undecodable_image") from None
    check_size(out.size, name, max_input_pixels)
    return out


def allow_pil_pixels(max_input_pixels: int) -> None:
    """Raises PIL's decompression-bomb limit (process-wide) to at least ``max_input_pixels``, so PIL never refuses
    an image our limit accepts (PIL errors above 2x its ``MAX_IMAGE_PIXELS`` and warns above it)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_input_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_input_pixels)


def _describe(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO object
        return "not an image format PIL knows"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _upright(img: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation (unchanged if it has none, or if the EXIF data is unreadable)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (corrupt EXIF: keep the pixels as stored)
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except (ValueError, TypeError, KeyError, SyntaxError):  # an orientation value PIL cannot apply
        return img


def check_size(size: tuple[int, int], name: str, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> None:
    """Raises ``ImageError`` for a zero-size image or one with more than ``max_input_pixels`` pixels."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: zero-size image {w}x{h}", "bad_image")
    if w * h > max_input_pixels:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit max_input_pixels={max_input_pixels}", "image_too_large"
        )


_ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, as the reference's ``pil_img2rgb`` (alpha / transparency composited on white) for 8-bit images; also
    alpha modes other than RGBA (LA, PA, ...), and 16/32-bit integer or float images scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Mode I;16* / I / F → L: 16-bit values (or any integer image whose maximum exceeds 255) scaled by 255/65535,
    wider integers by their maximum; floats in [0, 1] scaled by 255, other floats clipped to [0, 255]."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
    else:
        a = a.astype(np.float64)
        top = a.max() if a.size else 0.0
        if img.mode.startswith("I;16") or 255 < top <= 65535:
            a = a * (255.0 / 65535.0)
        elif top > 65535:
            a = a * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def resize(
    img: Image.Image | np.ndarray,
    rule: ResizeRule,
    img_num: int = 1,
    name: str = "image",
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
) -> np.ndarray:
    """RGB image → uint8 [H', W', 3] resized by ``rule`` (BICUBIC, antialias), H', W' multiples of the stride."""
    if isinstance(img, np.ndarray):
        arr = img
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageError(f"{name}: expected an RGB uint8 array [H, W, 3], got {arr.dtype} {arr.shape}", "bad_image")
        check_size((arr.shape[1], arr.shape[0]), name, max_input_pixels)
        img = Image.fromarray(arr)
    else:
        if img.mode != "RGB":
            raise ImageError(f"{name}: expected an RGB image, got mode {img.mode!r} (convert with to_rgb)", "bad_image")
        check_size(img.size, name, max_input_pixels)
    new_w, new_h = rule.target_size(*img.size, img_num=img_num)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 → float32 in [-1, 1], bit-exactly the reference's ``(x / 255 - 0.5) / 0.5`` in f32.

    Two passes: ``x / 127.5 − 1``. Scaling by 2 commutes with rounding, so RN(x/127.5) = 2·RN(x/255) and
    RN(2·RN(x/255) − 1) = 2·RN(RN(x/255) − 0.5).
    """
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    np.divide(pixels, np.float32(127.5), out=out, dtype=np.float32)
    out -= np.float32(1.0)
    return out


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] → [(H/p)·(W/p), p·p·C] with feature order (ph, pw, c), patches in row-major order."""
    h, w, c = image.shape
    p = patch_size
    if h % p or w % p:
        raise ImageError(f"image {h}x{w} is not a multiple of the patch size {p}", "bad_image")
    x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, grid_hw: tuple[int, int], patch_size: int) -> np.ndarray:
    """Inverse of ``patchify``: [h·w, p·p·C] → [h·p, w·p, C]."""
    gh, gw = grid_hw
    p = patch_size
    c = patches.shape[-1] // (p * p)
    return patches.reshape(gh, gw, p, p, c).transpose(0, 2, 1, 3, 4).reshape(gh * p, gw * p, c)


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """``torch.arange(start, end, step)`` with float32 output (computed in double, then cast, as ATen does)."""
    n = int(math.ceil((end - start) / step))
    return (start + step * np.arange(max(n, 0), dtype=np.float64)).astype(np.float32)


def flattened_position_ids(
    img_h: int, img_w: int, patch_size: int, max_num_patches_per_side: int, interpolate: bool = False
) -> np.ndarray:
    """Position id of each patch (row-major), int32[(H/p)·(W/p)].

    extrapolate (default): ``row·S + col``; interpolate: each axis bucketed into S bins as the reference's
    ``get_flattened_position_ids_interpolate`` (``bucketize(arange(0, 1-1e-6, 1/n), arange(1/S, 1, 1/S), right)``).
    """
    nh, nw = img_h // patch_size, img_w // patch_size
    s = max_num_patches_per_side
    if not interpolate:
        if nh > s or nw > s:
            raise ImageError(
                f"image {img_h}x{img_w} has {nh}x{nw} patches, more than max_num_patches_per_side={s}", "too_large"
            )
        rows, cols = np.arange(nh, dtype=np.int32), np.arange(nw, dtype=np.int32)
    else:
        boundaries = _torch_arange_f32(1.0 / s, 1.0, 1.0 / s)
        rows = np.searchsorted(boundaries, _torch_arange_f32(0.0, 1 - 1e-6, 1.0 / nh), side="right").astype(np.int32)
        cols = np.searchsorted(boundaries, _torch_arange_f32(0.0, 1 - 1e-6, 1.0 / nw), side="right").astype(np.int32)
    return (rows[:, None] * s + cols[None, :]).reshape(-1).astype(np.int32)
