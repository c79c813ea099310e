"""Decode and validate image bytes: content sniffing, EXIF orientation, RGB, thumbnails."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from retrieval.errors import CorruptImage, ImageRejected, ImageTooLarge, UnsupportedFormat

#: Pillow format name -> MIME type, for every format Simili accepts.
ACCEPTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
}
EXTENSIONS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

#: Default pixel budget: 50 MP covers every phone and most DSLR photos, and stops
#: a 64k x 64k PNG bomb (a few KB on disk, 16 GB decoded) before it is decoded.
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about an accepted image."""

    format: str
    mime: str
    extension: str
    width: int
    height: int


def accepted_formats_text() -> str:
    """Return the accepted formats as a sentence fragment for error messages."""
    return ", ".join(sorted(ACCEPTED_FORMATS))


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    if not data:
        raise CorruptImage("The file is empty.", code="empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"The image has too many pixels: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageTooLarge(f"The image has too many pixels: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedFormat(
            f"The file is not an image in an accepted format ({accepted_formats_text()})."
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"The image could not be read: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage("The image has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted."
        )
    return image


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Validate image bytes by content and decode them fully, raising `ImageRejected` if bad.

    Args:
        data: the raw bytes of the upload.
        max_pixels: images with more pixels are rejected before they are decoded.

    Returns:
        The detected format and the size, as stored (before EXIF orientation).
    """
    image = _open(data, max_pixels=max_pixels)
    fmt = image.format or ""
    size = image.size
    try:
        if fmt == "JPEG":
            # DCT scaling decodes the whole stream (so truncation still raises) at 1/8 the cost.
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    except ImageRejected:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImage(f"The image is truncated or corrupt: {exc}") from exc
    return ImageInfo(
        format=fmt,
        mime=ACCEPTED_FORMATS[fmt],
        extension=EXTENSIONS[fmt],
        width=size[0],
        height=size[1],
    )


def load_image(
    data: bytes,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode image bytes to an upright RGB image, raising `ImageRejected` if bad.

    Args:
        data: the raw bytes of an image file.
        min_side: when given, JPEGs are decoded in draft mode to the smallest scale whose
            short side is still at least this many pixels (5x faster on 12 MP photos).
        max_pixels: images with more pixels are rejected before they are decoded.

    Returns:
        An RGB image with its EXIF orientation applied.
    """
    image = _open(data, max_pixels=max_pixels)
    try:
        if min_side is not None and image.format == "JPEG":
            width, height = image.size
            scale = min_side / min(width, height)
            if scale < 1:
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent areas become white, as a browser shows them on a white page.
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"The image is truncated or corrupt: {exc}") from exc


def make_thumbnail(image: Image.Image, *, max_side: int) -> bytes:
    """Return a JPEG thumbnail of an RGB image that fits in `max_side` x `max_side`."""
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
