"""Validate a video by content before anything else reads it: `probe`."""

from __future__ import annotations

from typing import Any

import av
from PIL import Image, ImageSequence

from retrieval.video.formats import (
    FORMATS,
    CorruptVideo,
    UnsupportedVideo,
    VideoInfo,
    VideoRejected,
    VideoSource,
    VideoTooLarge,
    VideoTooLong,
    delay_seconds,
    detect_format,
    header_duration,
    open_container,
    rewound,
    video_stream,
)

#: Default duration limit. On 2 cores sampling a 10 s 640x480 30 fps H.264 video takes 0.2-0.5 s
#: (bench/video_scenes.py) and ONNX Runtime embeds ~60 frames/s, so five minutes at one frame a
#: second costs ~20 s of worker time (eager PyTorch: ~45 s).
DEFAULT_MAX_DURATION = 300.0
#: Default pixel limit per frame: 4K UHD. Larger frames (8K) decode at a few frames/s on 2 cores.
DEFAULT_MAX_PIXELS = 3840 * 2160
#: Packets read while looking for the first decodable frame before calling a video corrupt.
_FIRST_FRAME_PACKETS = 64


def probe(
    source: VideoSource,
    *,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoInfo:
    """Validate a video by content, raising `VideoRejected` (with a `code`) if it is not accepted.

    Reads the container's index and every packet's header (not the pixels: ~1 ms for a 10 s
    MP4), decodes the first frame, and checks that an MP4/MOV holds every frame its index lists
    (a truncated upload does not).

    Args:
        source: a path, or a seekable binary file object (read from its start).
        max_duration: longer videos are rejected (seconds).
        max_pixels: videos whose frames have more pixels are rejected before any is decoded.

    Returns:
        The format, codec, displayed size, duration, frame rate and an estimate of the frames.
    """
    fmt = detect_format(rewound(source))
    if FORMATS[fmt].demuxer is None:
        return _probe_animation(rewound(source), fmt, max_duration=max_duration, max_pixels=max_pixels)
    return _probe_container(rewound(source), fmt, max_duration=max_duration, max_pixels=max_pixels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise CorruptVideo("The video's frames have no pixels.")
    if width * height > max_pixels:
        raise VideoTooLarge(
            f"The video is {width}x{height} pixels; at most {max_pixels:,} pixels a frame are accepted."
        )


def _check_duration(duration: float, max_duration: float) -> None:
    if duration > max_duration:
        raise VideoTooLong(f"The video lasts {duration:.1f} s; at most {max_duration:g} s are accepted.")


def _probe_container(source: VideoSource, fmt: str, *, max_duration: float, max_pixels: int) -> VideoInfo:
    container = open_container(source, fmt)
    try:
        stream = video_stream(container, fmt)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        _check_size(width, height, max_pixels)
        duration = header_duration(container, stream)
        if duration is not None:
            _check_duration(duration, max_duration)
        rotation, packets, last_end = _scan(container, stream, fmt, max_duration=max_duration)
        indexed = int(stream.frames or 0)
        if fmt in ("mp4", "mov") and indexed and packets < indexed:
            raise CorruptVideo(
                f"The video is truncated: {packets} of the {indexed} frames its index lists are in the file."
            )
        if duration is None:
            duration = last_end
            _check_duration(duration, max_duration)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        frame_count = indexed or packets or max(1, round(duration * fps))
        if rotation % 180:
            width, height = height, width
        return VideoInfo(
            format=fmt, mime=FORMATS[fmt].mime, extension=FORMATS[fmt].extension, container=container.format.name,
            codec=stream.codec_context.name, width=width, height=height, duration=duration, fps=fps,
            frame_count=frame_count, is_animated_image=False, rotation=rotation,
        )
    except VideoRejected:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise CorruptVideo(f"The {FORMATS[fmt].label} file could not be decoded: {exc}") from exc
    finally:
        container.close()


def _scan(container: Any, stream: Any, fmt: str, *, max_duration: float) -> tuple[int, int, float]:
    """Demux every video packet, decoding only until the first frame comes out.

    Returns:
        The first frame's display rotation (degrees), the packets in the file, and the end time
        of the last one in seconds.
    """
    start = stream.start_time or 0
    rotation: int | None = None
    packets = 0
    last_end = 0.0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the flush packet at the end
        packets += 1
        if packet.pts is not None and packet.time_base is not None:
            last_end = max(last_end, float((packet.pts - start + (packet.duration or 0)) * packet.time_base))
            _check_duration(last_end, max_duration)  # a header can understate the length
        if rotation is None:
            if packets > _FIRST_FRAME_PACKETS:
                raise CorruptVideo(f"None of the first {_FIRST_FRAME_PACKETS} packets of the video decodes.")
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                raise CorruptVideo(f"The video's first frames do not decode: {exc}") from exc
            if frames:
                rotation = int(frames[0].rotation or 0)
    if rotation is None:
        # Decoders with a delay (frame threads, B-frames) hand out their first frame on flushing.
        try:
            frames = stream.codec_context.decode(None)
        except av.FFmpegError as exc:
            raise CorruptVideo(f"The video's first frames do not decode: {exc}") from exc
        if not frames:
            raise CorruptVideo(f"No frame of the {FORMATS[fmt].label} file decodes.")
        rotation = int(frames[0].rotation or 0)
    return rotation, packets, last_end


def _probe_animation(source: VideoSource, fmt: str, *, max_duration: float, max_pixels: int) -> VideoInfo:
    label = FORMATS[fmt].label
    try:
        image = Image.open(source, formats=[fmt.upper()])
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptVideo(f"The {label} file could not be read: {exc}") from exc
    with image:
        width, height = image.size
        _check_size(width, height, max_pixels)
        if getattr(image, "n_frames", 1) < 2:
            raise UnsupportedVideo(f"The {fmt.upper()} file has a single frame; upload it as an image.",
                                   code="not_animated")
        duration = 0.0
        frames = 0
        try:
            for frame in ImageSequence.Iterator(image):
                frame.load()
                frames += 1
                duration += delay_seconds(frame)
                _check_duration(duration, max_duration)
        except VideoRejected:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
            raise CorruptVideo(f"The {label} file is truncated or corrupt: {exc}") from exc
    return VideoInfo(
        format=fmt, mime=FORMATS[fmt].mime, extension=FORMATS[fmt].extension, container=f"pillow:{fmt}",
        codec=fmt, width=width, height=height, duration=duration, fps=frames / duration if duration else 0.0,
        frame_count=frames, is_animated_image=True,
    )
