"""Video files → sampled frames, with PyAV (FFmpeg): probe, frame sampling, seek-and-decode, shot boundaries.

* ``probe(src)``: one pass over the container's packets (demux, no decoding) → ``VideoInfo``: the exact frame count,
  each frame's presentation time stamp and the key frames. Raises ``VideoError`` (with a build skip reason,
  ``VIDEO_SKIP_REASONS``) for a file that is not a video or is truncated, has no frames, a codec this FFmpeg
  cannot decode, or absurd dimensions / frame count.
* ``frame_indices`` / ``FrameSampler``: the reference's frame sampling (``data/video_utils.py``): ``rand``
  (8–12 frames, one drawn from each of equal intervals), ``middle``, ``fix_start`` and ``fps<x>`` (frames at
  ``x`` per second, centred in their slot, capped at ``max_num_frames``).
* ``read_frames(src, indices)``: decodes only what the sampled frames need: seek to the key frame at or before a
  frame, decode forward to it; a later frame in the same group of pictures continues without seeking.
* ``shot_starts(src)``: cuts between shots by a content rule (below).

Shot rule (the content detector of PySceneDetect, re-implemented here so the package does not need OpenCV,
~290 MB installed): every frame is decoded at ``SHOT_WIDTH`` pixels wide and converted to HSV (hue rescaled to
OpenCV's 0–179, saturation and value 0–255); the score of frame i is the mean over pixels and the three channels
of ``|HSV_i − HSV_{i−1}|``; a shot starts at i when the score is ≥ ``threshold`` (27, PySceneDetect's default)
and at least ``min_shot_frames`` (15) frames have passed since the previous start.

All pixels are uint8 RGB [H, W, 3]. Sources are a path or the file's bytes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np

from bagel_jax.data.skips import VIDEO_SKIP_REASONS

__all__ = ["VIDEO_SKIP_REASONS", "FrameSampler", "VideoError", "VideoInfo", "frame_indices", "probe", "read_frames"]
MAX_SIDE = 8192  # pixels; a larger frame is an absurd size (or a corrupt header)
MAX_FRAMES = 1_000_000  # ~9 h at 30 fps
SHOT_WIDTH = 64
SHOT_THRESHOLD = 27.0
MIN_SHOT_FRAMES = 15


class VideoError(ValueError):
    """A video file that cannot be used; ``reason`` is one of ``VIDEO_SKIP_REASONS``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """``pts`` int64[num_frames]: presentation time stamps (stream time base) in display order; ``keyframes``:
    the key-frame pts, sorted. ``fps`` = frames per second (the stream's average rate)."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    time_base: float
    pts: np.ndarray
    keyframes: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def _open(src, name: str):
    import av

    try:
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(
            f"{name}: not a readable video ({type(e).__name__}: {str(e)[:120]})", "undecodable_video"
        ) from None


def probe(src, name: str = "video") -> VideoInfo:
    """Checks ``src`` and lists its frames by demuxing (no decoding); raises ``VideoError``."""
    import av

    container = _open(src, name)
    try:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream", "no_frames")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name if ctx is not None else "unknown"
        try:
            av.codec.Codec(codec, "r")
        except Exception:  # noqa: BLE001  (unknown name or no decoder in this FFmpeg build)
            raise VideoError(f"{name}: codec {codec!r} cannot be decoded by this FFmpeg", "unsupported_codec") from None
        w, h = int(ctx.width or 0), int(ctx.height or 0)
        if w > MAX_SIDE or h > MAX_SIDE:
            raise VideoError(f"{name}: frame size {w}x{h} exceeds {MAX_SIDE} pixels a side", "video_too_large")
        if (stream.frames or 0) > MAX_FRAMES:
            raise VideoError(f"{name}: {stream.frames} frames, more than {MAX_FRAMES}", "video_too_large")
        pts, keys = [], []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
                if len(pts) > MAX_FRAMES:
                    raise VideoError(f"{name}: more than {MAX_FRAMES} frames", "video_too_large")
        except av.FFmpegError as e:
            raise VideoError(
                f"{name}: truncated or corrupt ({type(e).__name__}: {str(e)[:120]})", "undecodable_video"
            ) from None
        if stream.frames and len(pts) < stream.frames:
            raise VideoError(
                f"{name}: truncated: header says {stream.frames} frames, found {len(pts)}", "undecodable_video"
            )
        declared = container.duration / 1e6 if container.duration else 0.0  # seconds, from the header
        if not pts and declared > 0:
            raise VideoError(f"{name}: truncated: the header says {declared:.2f} s, no frames", "undecodable_video")
        if not pts:
            raise VideoError(f"{name}: no frames", "no_frames")
        rate = stream.average_rate or stream.guessed_rate
        tb = float(stream.time_base) if stream.time_base else 0.0
        if declared and rate and tb:
            found = (max(pts) - min(pts)) * tb + 1 / float(rate)
            if found < declared - max(2 / float(rate), 0.05 * declared):
                raise VideoError(
                    f"{name}: truncated: the header says {declared:.2f} s, the frames cover {found:.2f} s",
                    "undecodable_video",
                )
        if w < 1 or h < 1:
            raise VideoError(f"{name}: frame size {w}x{h}", "no_frames")
        pts_arr = np.sort(np.asarray(pts, np.int64))
        if rate:
            fps = float(rate)
        elif len(pts_arr) > 1 and tb > 0 and pts_arr[-1] > pts_arr[0]:
            fps = (len(pts_arr) - 1) / ((pts_arr[-1] - pts_arr[0]) * tb)
        else:
            fps = 1.0
        return VideoInfo(
            num_frames=len(pts_arr),
            fps=fps,
            width=w,
            height=h,
            codec=codec,
            time_base=tb,
            pts=pts_arr,
            keyframes=np.sort(np.asarray(keys or pts[:1], np.int64)),
        )
    finally:
        container.close()


def frame_indices(
    num_frames: int,
    vlen: int,
    rng: np.random.Generator,
    sample: str = "rand",
    fix_start: int | None = None,
    input_fps: float = 1.0,
    max_num_frames: int = -1,
) -> list[int]:
    """The reference's ``get_frame_indices``: which of ``vlen`` frames to read.

    ``rand`` / ``middle``: [0, vlen) cut into ``min(num_frames, vlen)`` intervals ``[a, b)`` (``linspace``, floored);
    ``rand`` draws from ``[a, b − 1)`` per interval (the reference's ``range(a, b - 1)``; when an interval is too
    short for that, ``min(num_frames, vlen)`` distinct frames drawn at random, sorted); ``fix_start`` takes
    ``a + fix_start``; ``middle`` takes ``(a + b − 1) // 2``. Fewer than ``num_frames`` → padded with the last.
    ``fps<x>`` (e.g. ``fps0.5``): one frame per ``1/x`` s, at the centre of its slot, frames past the end dropped,
    at most ``max_num_frames`` (> 0).
    """
    if vlen < 1:
        raise ValueError(f"frame_indices: vlen {vlen} < 1")
    if sample in ("rand", "middle"):
        n = min(num_frames, vlen)
        edges = np.linspace(0, vlen, n + 1).astype(int)
        ranges = list(zip(edges[:-1].tolist(), (edges[1:] - 1).tolist()))
        if sample == "rand":
            if all(b > a for a, b in ranges):
                out = [int(rng.integers(a, b)) for a, b in ranges]
            else:
                out = sorted(int(i) for i in rng.permutation(vlen)[:n])
        elif fix_start is not None:
            out = [a + fix_start for a, _ in ranges]
        else:
            out = [(a + b) // 2 for a, b in ranges]
        if len(out) < num_frames:
            out = out + [out[-1]] * (num_frames - len(out))
        return out
    if sample.startswith("fps"):
        try:
            output_fps = float(sample[3:])
        except ValueError:
            raise ValueError(f"frame sampling {sample!r}: expected fps<frames per second>, e.g. fps0.5") from None
        if output_fps <= 0:
            raise ValueError(f"frame sampling {sample!r}: the rate must be > 0")
        delta = 1.0 / output_fps
        seconds = np.arange(delta / 2, vlen / input_fps + delta / 2, delta)
        out = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        return out[:max_num_frames] if max_num_frames > 0 else out
    raise ValueError(f"frame sampling {sample!r}: expected rand, middle or fps<x>")


@dataclasses.dataclass(frozen=True)
class FrameSampler:
    """The reference's ``FrameSampler`` for video files: draw ``min_num_frames``–``max_num_frames`` frames
    (uniformly many), then ``frame_indices``. The vlm_sft yaml uses 8–12 with ``rand``; ``sample="fps1"`` takes one
    frame per second instead (at most ``max_num_frames``)."""

    max_num_frames: int = 12
    min_num_frames: int = 8
    sample: str = "rand"

    def __call__(self, vlen: int, rng: np.random.Generator, fps: float = 1.0) -> list[int]:
        if self.sample.startswith("fps"):
            return frame_indices(0, vlen, rng, self.sample, input_fps=fps, max_num_frames=self.max_num_frames)
        n = int(rng.integers(self.min_num_frames, self.max_num_frames + 1))
        return frame_indices(n, vlen, rng, self.sample, input_fps=fps)


@dataclasses.dataclass
class DecodeStats:
    seeks: int = 0
    decoded: int = 0


def read_frames(
    src,
    indices: Sequence[int],
    info: VideoInfo | None = None,
    name: str = "video",
    size: tuple[int, int] | None = None,
    stats: DecodeStats | None = None,
) -> list[np.ndarray]:
    """Frames ``indices`` (display order, repeats allowed) as uint8 RGB [H, W, 3] (``size`` = (W, H) to scale
    while converting); decodes from the key frame before each wanted frame, never the whole file."""
    import av

    info = info or probe(src, name)
    stats = stats if stats is not None else DecodeStats()
    want = sorted(set(int(i) for i in indices))
    if want and (want[0] < 0 or want[-1] >= info.num_frames):
        bad = want[0] if want[0] < 0 else want[-1]
        raise VideoError(f"{name}: frame {bad} not in [0, {info.num_frames})", "no_frames")
    targets = {int(info.pts[i]): i for i in want}
    got: dict[int, np.ndarray] = {}
    container = _open(src, name)
    kw = {"format": "rgb24"} if size is None else {"format": "rgb24", "width": size[0], "height": size[1]}
    try:
        stream = container.streams.video[0]
        frames = None
        last = None  # pts of the last decoded frame
        for i in want:
            t = int(info.pts[i])
            if i in got:
                continue
            key = int(info.keyframes[max(0, np.searchsorted(info.keyframes, t, side="right") - 1)])
            if frames is None or last is None or last > t or last < key:
                container.seek(key, backward=True, any_frame=False, stream=stream)
                frames = container.decode(stream)
                stats.seeks += 1
            for frame in frames:
                stats.decoded += 1
                last = frame.pts if frame.pts is not None else last
                if frame.pts in targets and targets[frame.pts] not in got:
                    got[targets[frame.pts]] = frame.to_ndarray(**kw)
                if last is not None and last >= t:
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{name}: decoding failed ({type(e).__name__}: {str(e)[:120]})", "undecodable_video") from None
    finally:
        container.close()
    missing = [i for i in want if i not in got]
    if missing:
        raise VideoError(f"{name}: frames {missing[:5]} could not be decoded (truncated?)", "undecodable_video")
    return [got[int(i)] for i in indices]


def hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] → float32 HSV with OpenCV's ranges (H 0–179, S and V 0–255)."""
    from PIL import Image

    out = np.asarray(Image.fromarray(rgb).convert("HSV"), np.float32)
    out[..., 0] *= 180.0 / 256.0
    return out


def shot_scores(src, name: str = "video", width: int = SHOT_WIDTH) -> np.ndarray:
    """float32[num_frames]: the content score of each frame against the previous one (frame 0: 0)."""
    import av

    container = _open(src, name)
    scores, prev = [], None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            h = max(1, round(frame.height * width / max(frame.width, 1)))
            cur = hsv(frame.to_ndarray(format="rgb24", width=width, height=h))
            scores.append(0.0 if prev is None else float(np.abs(cur - prev).mean()))
            prev = cur
    except av.FFmpegError as e:
        raise VideoError(f"{name}: decoding failed ({type(e).__name__}: {str(e)[:120]})", "undecodable_video") from None
    finally:
        container.close()
    return np.asarray(scores, np.float32)


def shot_starts(
    scores: np.ndarray, threshold: float = SHOT_THRESHOLD, min_shot_frames: int = MIN_SHOT_FRAMES
) -> list[int]:
    """First frame of each shot (always 0) from ``shot_scores`` by the rule in the module doc."""
    starts = [0]
    for i in range(1, len(scores)):
        if scores[i] >= threshold and i - starts[-1] >= min_shot_frames:
            starts.append(i)
    return starts
