"""Images of every awkward kind, as encoded bytes, for the data robustness tests (decoder, fuzz, integration).

``good_images()``: unusual but valid images that must decode to RGB; ``bad_images()``: bytes that must be skipped,
with the skip reason each must get (``skips.SKIP_REASONS``).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kwargs)
    return b.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid header claiming ``width`` x ``height`` RGB pixels and no pixel data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    """A GIF claiming ``width`` x ``height`` pixels, with one tiny frame of data."""
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00"
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + descriptor + b"\x02\x02\x44\x01\x00;"


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8))


def exif_rotated_jpeg(w: int = 40, h: int = 24) -> bytes:
    """A ``w`` x ``h`` JPEG (left half red, right half blue) whose EXIF says: rotate 90° clockwise to view."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


@functools.cache
def good_images() -> dict[str, bytes]:
    """Valid images in unusual encodings, each at least 16x16 (decodable, usable)."""
    rgb = _gradient(48, 40)
    gray16 = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16))
    la = Image.new("LA", (32, 32), (128, 0))
    la.paste((20, 255), (8, 8, 24, 24))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    bad_exif = encode(rgb, "JPEG")
    bad_exif = bad_exif[:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\xff" + bad_exif[2:]  # garbage IFD
    return {
        "rgb_png": encode(rgb),
        "jpeg": encode(rgb, "JPEG"),
        "gray16_png": encode(gray16),
        "la_png": encode(la),
        "palette_transparent_png": encode(pal, transparency=0),
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "exif_rotated_jpeg": exif_rotated_jpeg(),
        "corrupt_exif_jpeg": bad_exif,
        "animated_gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "animated_png": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "webp": encode(rgb, "WEBP"),
        "bilevel_png": encode(rgb.convert("1")),
        "float_tiff": encode(Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)), "TIFF"),
        "rgba_webp": encode(rgb.convert("RGBA"), "WEBP"),
        "thin_16x300": encode(_gradient(16, 300)),
    }


@functools.cache
def bad_images() -> dict[str, tuple[bytes, str]]:
    """Bytes that cannot be used, and the skip reason each gets (with the default ``max_input_pixels``)."""
    png = encode(_gradient(48, 40))
    jpeg = encode(_gradient(48, 40), "JPEG")
    return {
        "empty": (b"", "missing_file"),
        "text": (b"this is not an image", "undecodable_image"),
        "truncated_png": (png[: len(png) // 2], "undecodable_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "undecodable_image"),
        "zero_width_png": (png_header(0, 10), "undecodable_image"),
        "bomb_225mpx_png": (png_header(15000, 15000), "image_too_large"),  # PIL alone refuses at 179 Mpx
        "bomb_4gpx_gif": (gif_header(65535, 65535), "image_too_large"),
        "html": (b"<html><body>404 not found</body></html>", "undecodable_image"),
    }
