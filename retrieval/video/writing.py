"""Write frames as an MP4 (the synthetic evaluation set and the tests make their videos with it)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

#: FFmpeg's quantiser-to-lambda factor, for a fixed MPEG-4 quantiser.
_FF_QP2LAMBDA = 118


def mp4_codec() -> str:
    """Return the MP4 video encoder the installed PyAV ships: libx264, else FFmpeg's own MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(
    frames: Iterable[Image.Image | np.ndarray],
    path: str | os.PathLike[str],
    *,
    fps: float,
    crf: int = 23,
    codec: str | None = None,
) -> Path:
    """Encode RGB frames (PIL images or HxWx3 uint8 arrays, one size) as an H.264 MP4, lossy.

    Odd widths or heights lose their last column or row (4:2:0 chroma needs even sizes). With
    libx264 the bytes are the same on every run when both sides are multiples of 16.

    Args:
        frames: the frames, in order; at least one.
        path: the file to write.
        fps: frames per second (a fraction such as 30000/1001 is kept as one).
        crf: libx264's constant rate factor: 23 is its default, 28 visibly lossy, 18 nearly
            transparent. The MPEG-4 fallback maps it to a quantiser (crf - 18, within 2-31).
        codec: "libx264" or "mpeg4"; default `mp4_codec()`.

    Returns:
        The path written.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    codec = codec or mp4_codec()
    count = 0
    with av.open(str(path), mode="w", format="mp4") as container:
        stream: Any = None
        for item in frames:
            array = np.asarray(item.convert("RGB") if isinstance(item, Image.Image) else item, dtype=np.uint8)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"expected HxWx3 RGB frames, got shape {array.shape}")
            array = array[: array.shape[0] // 2 * 2, : array.shape[1] // 2 * 2]
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = array.shape[1], array.shape[0]
                stream.pix_fmt = "yuv420p"
                if codec == "libx264":
                    # Repeatable bytes need one thread and sides in multiples of 16: otherwise the first
                    # video a process encodes differs in its first B-frames from the next ones (x264
                    # reads macroblock padding that is not initialised); measured, not documented.
                    stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
                else:
                    stream.codec_context.qscale = True
                    stream.codec_context.global_quality = max(2, min(31, crf - 18)) * _FF_QP2LAMBDA
            elif (array.shape[1], array.shape[0]) != (stream.width, stream.height):
                raise ValueError(
                    f"expected every frame {stream.width}x{stream.height}, got {array.shape[1]}x{array.shape[0]}"
                )
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = count
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
            count += 1
        if stream is None:
            raise ValueError("expected at least one frame")
        container.mux(stream.encode(None))
    return path
