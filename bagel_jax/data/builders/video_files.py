"""Reading the user's video files at build time: checks with the reason of each skip, and sampled frames as JPEG.

Shards hold the sampled frames (JPEG, quality 95, long side at most ``MAX_FRAME_SIDE``), not the video bytes:
training then reads a video record like any other (docs/DESIGN_NOTES.md, "video: frames or bytes", has the
measurement). A file that cannot be used raises ``VideoError`` with its reason (``skips.VIDEO_SKIP_REASONS``),
naming the file; builders count it and go on.
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np
from PIL import Image

from bagel_jax.data import video as video_lib
from bagel_jax.data.video import VideoError, VideoInfo

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
MAX_VIDEO_BYTES = 4 << 30  # a larger file is an absurd size for one training clip
MAX_FRAME_SIDE = 1024  # stored frames are scaled down to this long side (the VAE rule's maximum)
JPEG_QUALITY = 95


def is_video_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


def rng_for(where: str) -> np.random.Generator:
    """A generator seeded by the line's ``file:line``: the same build gives the same frames."""
    return np.random.default_rng(zlib.crc32(where.encode("utf-8", "backslashreplace")))


def load(path: str, name: str, duration=None, max_bytes: int = MAX_VIDEO_BYTES) -> tuple[str, VideoInfo]:
    """``(path, VideoInfo)`` of a usable video file (the file is streamed, never read whole); ``duration`` (seconds,
    from the jsonl) must match the file within max(0.5 s, 5 %). Raises ``VideoError`` naming ``name``."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise VideoError(f"{name}: {e.strerror or e}", "undecodable_video") from None
    if size > max_bytes:
        raise VideoError(f"{name}: {size} bytes, more than {max_bytes}", "video_too_large")
    info = video_lib.probe(path, name)
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
            raise VideoError(f"{name}: 'duration' is {duration!r}, expected seconds > 0", "wrong_duration")
        if abs(info.duration_s - duration) > max(0.5, 0.05 * duration):
            raise VideoError(
                f"{name}: the index says {duration:g} s, the file has {info.duration_s:.2f} s "
                f"({info.num_frames} frames at {info.fps:g} fps)",
                "wrong_duration",
            )
    return path, info


def scaled_size(info: VideoInfo, max_side: int = MAX_FRAME_SIDE) -> tuple[int, int] | None:
    """(W, H) to scale frames to so the long side is at most ``max_side`` (None: keep the size)."""
    side = max(info.width, info.height)
    if side <= max_side:
        return None
    s = max_side / side
    return max(2, round(info.width * s)), max(2, round(info.height * s))


def frames_as_jpeg(src, indices, info: VideoInfo, name: str, max_side: int = MAX_FRAME_SIDE) -> list[bytes]:
    """Frames ``indices`` of the video ``src`` (a path or the file's bytes), each encoded as JPEG."""
    out = []
    for frame in video_lib.read_frames(src, indices, info, name, size=scaled_size(info, max_side)):
        b = io.BytesIO()
        Image.fromarray(frame).save(b, format="JPEG", quality=JPEG_QUALITY)
        out.append(b.getvalue())
    return out


def frame_names(name: str, indices) -> list[str]:
    return [f"{name}#frame{int(i)}" for i in indices]
