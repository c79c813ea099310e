"""Accepted video formats, the errors that reject a file, and what is learnt about an accepted one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Any

import av
from PIL import Image

from retrieval.errors import UploadRejected

#: A file path, or a binary file object opened for reading and seekable (an upload's temp file).
VideoSource = str | os.PathLike[str] | IO[bytes]

#: Decoders accepted in a container: what browsers play, plus camera formats (MJPEG, ProRes).
#: Anything else (FFmpeg decodes hundreds of formats) is refused, to keep the attack surface small.
ACCEPTED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg", "prores"})
#: Browsers show GIF frames with a delay under 20 ms for 100 ms; so do we, for timestamps.
_MIN_DELAY_MS = 20
_DEFAULT_DELAY_MS = 100
# QuickTime files older than the ftyp box start straight with one of these.
_QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
_EBML = b"\x1a\x45\xdf\xa3"


@dataclass(frozen=True)
class FormatSpec:
    mime: str
    extension: str
    demuxer: str | None  # FFmpeg's; None means Pillow reads it
    label: str


#: Short name -> how it is stored and read.
FORMATS: dict[str, FormatSpec] = {
    "mp4": FormatSpec("video/mp4", "mp4", "mp4", "MP4"),
    "mov": FormatSpec("video/quicktime", "mov", "mov", "MOV"),
    "webm": FormatSpec("video/webm", "webm", "matroska", "WebM"),
    "gif": FormatSpec("image/gif", "gif", None, "animated GIF"),
    "webp": FormatSpec("image/webp", "webp", None, "animated WebP"),
}


class VideoRejected(UploadRejected):
    """The file is not a video we accept; `code` names the reason (see the module docstring)."""

    code = "invalid_video"


class UnsupportedVideo(VideoRejected):
    """The bytes are not in an accepted format, or hold no video we read."""

    code = "unsupported_format"


class CorruptVideo(VideoRejected):
    """The bytes claim an accepted format but do not decode."""

    code = "corrupt_video"


class VideoTooLong(VideoRejected):
    """The video lasts longer than allowed."""

    code = "video_too_long"


class VideoTooLarge(VideoRejected):
    """The video's frames have more pixels than allowed."""

    code = "video_too_large"


@dataclass(frozen=True)
class VideoInfo:
    """What validation learned about an accepted video; width and height as displayed."""

    format: str
    mime: str
    extension: str
    container: str
    codec: str
    width: int
    height: int
    duration: float
    fps: float
    frame_count: int
    is_animated_image: bool
    rotation: int = 0


@dataclass(frozen=True, eq=False)
class Frame:
    """One sampled frame: seconds from the start of the video and an upright RGB image."""

    timestamp: float
    image: Image.Image = field(repr=False)


def accepted_formats_text() -> str:
    """Return the accepted formats as a sentence fragment for error messages."""
    return ", ".join(spec.label for spec in FORMATS.values())


#: ISO BMFF major brands of still images (HEIF, HEIC, AVIF) and their image sequences.
_STILL_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif",
                                 b"avis"})


def sniff_format(head: bytes) -> str | None:
    """Return the short format name ("mp4", "mov", "webm", "gif", "webp") of a file's first bytes.

    Args:
        head: at least the first 64 bytes of the file.

    Returns:
        The name, or None when the bytes start no accepted format (Matroska other than WebM included).
    """
    if head[4:8] == b"ftyp":
        if head[8:12] in _STILL_IMAGE_BRANDS:
            return None  # HEIC/AVIF photos share the ISO box format: they are images
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if head[4:8] in _QUICKTIME_ATOMS:
        return "mov"
    if head.startswith(_EBML):
        return "webm" if b"webm" in head[:64] else None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_head(source: VideoSource) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return handle.read(64)
    position = source.tell()
    head = source.read(64)
    source.seek(position)
    return head


def detect_format(source: VideoSource) -> str:
    head = read_head(source)
    if not head:
        raise CorruptVideo("The file is empty.", code="empty_file")
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedVideo(f"The file is not a video in an accepted format ({accepted_formats_text()}).")
    return fmt


def rewound(source: VideoSource) -> VideoSource:
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    return source


def open_container(source: VideoSource, fmt: str) -> Any:
    try:
        return av.open(source, mode="r", format=FORMATS[fmt].demuxer)
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptVideo(f"The {FORMATS[fmt].label} file could not be read: {exc}") from exc


def video_stream(container: Any, fmt: str) -> Any:
    if not container.streams.video:
        raise UnsupportedVideo(f"The {FORMATS[fmt].label} file holds no video stream.", code="no_video_stream")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in ACCEPTED_CODECS:
        raise UnsupportedVideo(
            f"The video is encoded with {codec!r}; accepted codecs: H.264, HEVC, VP8, VP9, AV1, MPEG-4, MJPEG, ProRes.",
            code="unsupported_codec",
        )
    return stream


def header_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration / av.time_base)
    return None


def delay_seconds(frame: Image.Image) -> float:
    delay = frame.info.get("duration") or 0
    return (_DEFAULT_DELAY_MS if delay < _MIN_DELAY_MS else float(delay)) / 1000.0


def flatten_rgb(frame: Image.Image) -> Image.Image:
    """Return an RGB copy of an animation frame, transparent areas white (as on a white page)."""
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        rgba = frame.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return frame.convert("RGB")
