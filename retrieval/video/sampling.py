"""Sample a video's frames in one decoding pass: the first, a fixed rate, scene changes."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import av
import numpy as np
from PIL import Image, ImageSequence

from retrieval.video.formats import (
    FORMATS,
    CorruptVideo,
    Frame,
    VideoSource,
    delay_seconds,
    detect_format,
    flatten_rgb,
    header_duration,
    open_container,
    rewound,
    video_stream,
)

logger = logging.getLogger(__name__)

#: One frame a second: any moment of the video is then within 0.5 s of a sampled frame, inside the
#: 1 s a "found the right moment" answer is allowed (docs/quality.md, Video).
DEFAULT_EVERY_SECONDS = 1.0
#: Histogram distance (0-1, see `scene_difference`) that counts as a new scene. Measured by
#: bench/video_scenes.py on 20 synthetic videos (Corel photos, 10 fps, a draw apart from the
#: evaluated ones): the 35 cuts differ from the frame before by 0.247 or more (median 0.53), pans
#: and zooms by 0.099 at most from one frame to the next (median 0.016); 0.12 sits between, on
#: the low side because a missed cut costs more than one extra frame. 32x32 luma thumbnails
#: separate them less (cuts from 0.144, motion up to 0.085), since a pan moves every pixel.
DEFAULT_SCENE_THRESHOLD = 0.12
#: Frames kept per video at most: five minutes at one a second, ~5 s of embedding on 2 cores with
#: ONNX Runtime (1,943 frames took 32 s in the evaluation), and 300 x 1280 halfvec = 750 KB a video.
DEFAULT_MAX_FRAMES = 300
#: Long side of the kept frames: the backbone sees the short side at 224 px, and 400 keeps a
#: 16:9 frame's short side at 225, so nothing is upscaled; it is also the web app's thumbnail size.
DEFAULT_MAX_SIDE = 400
#: Bits kept of Y, U and V in the scene histogram: 3 each, so 8 x 8 x 8 = 512 bins.
_HISTOGRAM_BITS = 3
#: Pixels counted into a scene histogram at most (a regular subsample), so the cost does not grow
#: with the frame size.
_HISTOGRAM_SAMPLES = 16_384
# Planar 8-bit YUV formats: their three planes go straight into the histogram.
_PLANAR_YUV = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"})


class _Selector:
    """Choose frames as they are decoded: the first, a fixed rate, scene changes; memory bounded."""

    def __init__(self, *, every_seconds: float | None, scene_threshold: float | None, max_frames: int) -> None:
        self.every_seconds = every_seconds
        self.scene_threshold = scene_threshold
        self.max_frames = max_frames
        self.kept: list[Frame] = []
        self.next_due = 0.0
        self.previous: np.ndarray | None = None
        self.last_kept: np.ndarray | None = None

    def offer(self, timestamp: float, signature: Callable[[], np.ndarray], image: Callable[[], Image.Image]) -> None:
        keep = not self.kept
        if not keep and self.every_seconds is not None and timestamp >= self.next_due - 1e-6:
            keep = True
        current = None
        if self.scene_threshold is not None:
            current = signature()
            if not keep and self.previous is not None and self.last_kept is not None:
                # A cut differs from the frame before it; a slow pan or a fade only from the last kept frame.
                keep = max(scene_difference(current, self.previous),
                           scene_difference(current, self.last_kept)) > self.scene_threshold
            self.previous = current
        if not keep:
            return
        if self.every_seconds is not None:
            self.next_due = (math.floor(timestamp / self.every_seconds + 1e-6) + 1) * self.every_seconds
        self.last_kept = current
        self.kept.append(Frame(timestamp=timestamp, image=image()))
        if len(self.kept) > 2 * self.max_frames:
            self.kept = self.kept[::2]  # keeps at most 2 x max_frames images in memory, spread evenly

    def result(self) -> list[Frame]:
        return evenly(self.kept, self.max_frames)


def evenly(frames: Sequence[Frame], count: int) -> list[Frame]:
    """Return at most `count` of `frames`, spread evenly, the first and last included."""
    if len(frames) <= count:
        return list(frames)
    if count == 1:
        return [frames[0]]
    indices = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int))
    return [frames[i] for i in indices]


def scene_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Return the distance of two scene histograms: half their L1 distance, 0 (same) to 1 (disjoint)."""
    return float(0.5 * np.abs(a - b).sum())


def yuv_histogram(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return the normalised joint 8x8x8 histogram of Y, U, V planes (uint8; luma may be larger).

    Colour histograms barely move when the camera pans or zooms and jump at a cut, which is why
    they are the classic shot-boundary signal. Luma is subsampled to the chroma grid, and all
    three to at most `_HISTOGRAM_SAMPLES` pixels.
    """
    height, width = u.shape
    step = max(1, math.isqrt(height * width // _HISTOGRAM_SAMPLES))
    sy, sx = max(1, y.shape[0] // height), max(1, y.shape[1] // width)
    luma = y[: height * sy : sy * step, : width * sx : sx * step]
    u, v = u[::step, ::step], v[::step, ::step]
    rows, cols = min(luma.shape[0], u.shape[0]), min(luma.shape[1], u.shape[1])
    shift = 8 - _HISTOGRAM_BITS
    index = (
        (luma[:rows, :cols] >> shift).astype(np.int32) << (2 * _HISTOGRAM_BITS)
        | (u[:rows, :cols] >> shift).astype(np.int32) << _HISTOGRAM_BITS
        | (v[:rows, :cols] >> shift).astype(np.int32)
    )
    counts = np.bincount(index.ravel(), minlength=1 << (3 * _HISTOGRAM_BITS)).astype(np.float32)
    return counts / max(float(counts.sum()), 1.0)


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Return the size whose long side is at most `max_side`, aspect kept, never upscaled."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def sample_frames(
    source: VideoSource,
    *,
    every_seconds: float | None = DEFAULT_EVERY_SECONDS,
    scene_threshold: float | None = DEFAULT_SCENE_THRESHOLD,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_side: int = DEFAULT_MAX_SIDE,
    max_duration: float | None = None,
) -> list[Frame]:
    """Decode a video once and keep the first frame, one every `every_seconds`, and scene changes.

    A frame is kept when it is the first, when the next multiple of `every_seconds` is reached,
    or when its YUV histogram differs from the previous frame's (a cut) or the last kept frame's
    (a pan, a fade) by more than `scene_threshold`; give either or both. Only kept frames are
    converted to RGB (and scaled by swscale while converting); the others cost their decoding
    and, in scene mode, a histogram of a subsample of their planes. Decoding errors after the first frame end
    the sampling with what was kept (and a warning), as players show what they can.

    Args:
        source: an accepted video (call `probe` first: this does not check limits or formats
            beyond what it needs).
        every_seconds: keep a frame at each multiple of this many seconds; None for scene changes only.
        scene_threshold: keep a frame whose histogram distance (0-1, `scene_difference`) to the
            previous or the last kept frame is larger; None for the fixed rate only.
        max_frames: keep at most this many, spread evenly over the video, the first included.
        max_side: kept images are scaled down so that their long side is at most this.
        max_duration: stop decoding past this many seconds (a guard for lying headers).

    Returns:
        Frames in time order, upright (display rotation applied), RGB.
    """
    if every_seconds is None and scene_threshold is None:
        raise ValueError("expected every_seconds, scene_threshold or both")
    if every_seconds is not None and every_seconds <= 0:
        raise ValueError(f"expected every_seconds > 0, got {every_seconds}")
    if max_frames < 1 or max_side < 1:
        raise ValueError(f"expected max_frames and max_side of at least 1, got {max_frames} and {max_side}")
    fmt = detect_format(rewound(source))
    selector = _Selector(every_seconds=every_seconds, scene_threshold=scene_threshold, max_frames=max_frames)
    if FORMATS[fmt].demuxer is None:
        _sample_animation(rewound(source), fmt, selector, max_side=max_side, max_duration=max_duration)
    else:
        _sample_container(rewound(source), fmt, selector, max_side=max_side, max_duration=max_duration)
    if not selector.kept:
        raise CorruptVideo("No frame of the video decodes.")
    return selector.result()


def _sample_container(
    source: VideoSource, fmt: str, selector: _Selector, *, max_side: int, max_duration: float | None
) -> None:
    container = open_container(source, fmt)
    with container:
        stream = video_stream(container, fmt)
        stream.thread_type = "AUTO"  # frame and slice threads: ~2x on 2 cores for H.264
        duration = header_duration(container, stream)
        if selector.every_seconds is not None and duration:
            # Widen the rate up front rather than convert frames that max_frames would drop.
            selector.every_seconds = max(selector.every_seconds, duration / selector.max_frames)
        start = stream.start_time or 0
        rate = stream.average_rate or stream.guessed_rate
        for index, frame in enumerate(_decode_leniently(container, stream)):
            if frame.pts is not None and frame.time_base is not None:
                timestamp = float((frame.pts - start) * frame.time_base)
            else:
                timestamp = index / float(rate) if rate else float(index)
            if max_duration is not None and timestamp > max_duration:
                break
            selector.offer(
                max(0.0, timestamp),
                functools.partial(frame_histogram, frame),
                functools.partial(_frame_image, frame, max_side),
            )


def _decode_leniently(container: Any, stream: Any) -> Iterator[Any]:
    decoded = 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            yield frame
    except (av.FFmpegError, OSError, ValueError) as exc:
        if not decoded:
            raise CorruptVideo(f"No frame of the video decodes: {exc}") from exc
        logger.warning("video decoding stopped after %s frames: %s", decoded, exc)


def _plane(frame: Any, index: int, width: int, height: int) -> np.ndarray:
    plane = frame.planes[index]
    return np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)[:height, :width]


def frame_histogram(frame: Any) -> np.ndarray:
    """Return the scene histogram (`yuv_histogram`) of a decoded PyAV frame.

    Planar 8-bit YUV is read in place; other pixel formats (10-bit, RGB, NV12) are first
    converted to a small YUV 4:4:4 frame by swscale.
    """
    if frame.format.name not in _PLANAR_YUV:
        scale = min(1.0, 128 / max(frame.width, frame.height))
        frame = frame.reformat(
            width=max(1, round(frame.width * scale)), height=max(1, round(frame.height * scale)), format="yuv444p"
        )
    y = _plane(frame, 0, frame.width, frame.height)
    chroma = frame.planes[1]
    u = _plane(frame, 1, chroma.width, chroma.height)
    return yuv_histogram(y, u, _plane(frame, 2, chroma.width, chroma.height))


def image_histogram(image: Image.Image) -> np.ndarray:
    """Return the scene histogram (`yuv_histogram`) of an RGB image."""
    y, u, v = (np.asarray(channel) for channel in image.convert("YCbCr").split())
    return yuv_histogram(y, u, v)


def _frame_image(frame: Any, max_side: int) -> Image.Image:
    rotation = int(frame.rotation or 0)
    displayed = (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)
    width, height = fit_within(displayed[0], displayed[1], max_side)
    if rotation % 180:
        width, height = height, width
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_image()
    # PyAV's rotation is counter-clockwise, as Pillow's.
    return image.rotate(rotation, expand=True) if rotation else image


def _sample_animation(
    source: VideoSource, fmt: str, selector: _Selector, *, max_side: int, max_duration: float | None
) -> None:
    try:
        image = Image.open(source, formats=[fmt.upper()])
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptVideo(f"The {FORMATS[fmt].label} file could not be read: {exc}") from exc
    with image:
        timestamp = 0.0
        try:
            for frame in ImageSequence.Iterator(image):
                if max_duration is not None and timestamp > max_duration:
                    break
                rgb = flatten_rgb(frame)
                selector.offer(
                    timestamp,
                    functools.partial(image_histogram, rgb),
                    functools.partial(_downscaled, rgb, max_side),
                )
                timestamp += delay_seconds(frame)
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
            if not selector.kept:
                raise CorruptVideo(f"No frame of the {FORMATS[fmt].label} file decodes: {exc}") from exc
            logger.warning("animation decoding stopped at %.2f s: %s", timestamp, exc)


def _downscaled(image: Image.Image, max_side: int) -> Image.Image:
    size = fit_within(image.width, image.height, max_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
