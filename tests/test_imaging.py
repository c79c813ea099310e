"""Decoding and validating image bytes by content."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from retrieval import imaging
from retrieval.errors import CorruptImage, ImageTooLarge, UnsupportedFormat


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def test_format_is_decided_by_content_not_name() -> None:
    png = _encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG")
    info = imaging.inspect_image(png)
    assert (info.format, info.mime, info.extension, info.width, info.height) == ("PNG", "image/png", "png", 40, 30)


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", CorruptImage, "empty_file"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedFormat, "unsupported_format"),
        (b"%PDF-1.4 hello", UnsupportedFormat, "unsupported_format"),
        (b"GIF89a" + b"\0" * 20, UnsupportedFormat, "unsupported_format"),
    ],
)
def test_non_images_are_rejected_with_a_code(data: bytes, error: type, code: str) -> None:
    with pytest.raises(error) as excinfo:
        imaging.inspect_image(data)
    assert excinfo.value.code == code


def test_a_truncated_jpeg_is_corrupt() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(CorruptImage):
        imaging.inspect_image(data[: len(data) // 2])


@pytest.mark.parametrize("decode", [True, False])
def test_a_truncated_jpeg_is_corrupt_even_when_only_its_structure_is_checked(decode: bool) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(CorruptImage):
        imaging.inspect_image(data[: len(data) - 200], decode=decode)


def test_a_structure_check_trusts_a_whole_jpeg_and_decodes_anything_else() -> None:
    data = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)), "JPEG")
    hollow = data[: data.index(b"\xff\xda") + 12] + b"\xff\xd9"  # headers whole, no image data
    info = imaging.inspect_image(hollow, decode=False)
    assert (info.format, info.width, info.height) == ("JPEG", 400, 300)
    with pytest.raises(CorruptImage):
        imaging.inspect_image(hollow)  # the full check decodes, and fails
    with pytest.raises(CorruptImage):
        imaging.inspect_image(hollow[:-2] + b"\0\0", decode=False)  # no end marker: decoded, fails
    png = _encode(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(CorruptImage):
        imaging.inspect_image(png[:-30], decode=False)  # other formats are always decoded


def test_too_many_pixels_is_rejected_before_decoding() -> None:
    data = _encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageTooLarge):
        imaging.inspect_image(data, max_pixels=1_000_000)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    loaded = imaging.load_image(_encode(image, "JPEG", exif=exif))
    assert loaded.size == (20, 60)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = Image.new("RGB", (32, 24), (10, 200, 30)).convert(mode) if mode != "I;16" else Image.new("I;16", (32, 24))
    loaded = imaging.load_image(_encode(image, "PNG"))
    assert loaded.mode == "RGB" and loaded.size == (32, 24)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    loaded = imaging.load_image(_encode(image, "PNG"))
    assert loaded.getpixel((3, 3)) == (255, 255, 255)


def test_thumbnail_fits_the_box() -> None:
    thumb = imaging.make_thumbnail(Image.new("RGB", (1000, 500)), max_side=200)
    assert Image.open(io.BytesIO(thumb)).size == (200, 100)


def _photo_jpeg(size: tuple[int, int], **save: object) -> bytes:
    return _encode(Image.fromarray(photos.coffee()).resize(size), "JPEG", quality=80, **save)


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"icc_profile": "srgb"}],
                         ids=["baseline", "progressive", "icc"])
def test_a_small_plain_jpeg_is_its_own_thumbnail(save: dict) -> None:
    if save.get("icc_profile") == "srgb":
        save = {"icc_profile": _srgb_profile()}
    source = _photo_jpeg((384, 256), **save)
    assert imaging.make_thumbnail(imaging.load_image(source), max_side=400, source=source) is source


def _exif_with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    return exif


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(_photo_jpeg((384, 256), exif=_exif_with_gps()), id="exif-and-gps"),
        pytest.param(_photo_jpeg((384, 256), comment=b"shot at home"), id="comment"),
        pytest.param(_photo_jpeg((384, 256)) + b"trailing bytes", id="data-after-the-end"),
        pytest.param(_photo_jpeg((384, 256)) + _photo_jpeg((64, 64), exif=_exif_with_gps()), id="a-second-jpeg-after"),
        pytest.param(_photo_jpeg((384, 256)).replace(b"\xff\xdb", b"junk\xff\xdb", 1), id="bytes-between-segments"),
        pytest.param(_encode(Image.fromarray(photos.coffee()).resize((384, 256)).convert("CMYK"), "JPEG"), id="cmyk"),
        pytest.param(_photo_jpeg((640, 427)), id="larger-than-the-box"),
        pytest.param(_encode(Image.fromarray(photos.coffee()).resize((384, 256)), "PNG"), id="png"),
    ],
)
def test_any_other_image_is_re_encoded_without_its_metadata(source: bytes) -> None:
    thumb = imaging.make_thumbnail(imaging.load_image(source), max_side=400, source=source)
    assert thumb != source
    encoded = Image.open(io.BytesIO(thumb))
    assert encoded.format == "JPEG" and encoded.mode == "RGB" and max(encoded.size) <= 400
    assert [marker for marker, _ in encoded.applist] == ["APP0"]  # JFIF only: no EXIF, no comment
    assert "comment" not in encoded.info


def _srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_a_re_encoded_thumbnail_keeps_an_rgb_colour_profile() -> None:
    """A phone photo in Display P3 would look dull without it."""
    profile = _srgb_profile()
    source = _photo_jpeg((800, 533), icc_profile=profile)
    thumb = Image.open(io.BytesIO(imaging.make_thumbnail(imaging.load_image(source, min_side=224), max_side=400,
                                                         source=source)))
    assert thumb.size == (400, 267) and thumb.info.get("icc_profile") == profile


def test_a_thumbnail_made_from_cmyk_does_not_keep_the_cmyk_profile() -> None:
    profile = _srgb_profile()
    cmyk_profile = profile[:16] + b"CMYK" + profile[20:]  # a CMYK profile's header, for Pillow to carry
    cmyk = Image.fromarray(photos.coffee()).resize((800, 533)).convert("CMYK")
    source = _encode(cmyk, "JPEG", icc_profile=cmyk_profile)
    thumb = Image.open(io.BytesIO(imaging.make_thumbnail(imaging.load_image(source), max_side=400, source=source)))
    assert thumb.mode == "RGB" and "icc_profile" not in thumb.info


def test_a_huge_colour_profile_stays_out_of_the_thumbnail() -> None:
    profile = _srgb_profile()
    huge = profile + bytes(imaging.MAX_THUMBNAIL_PROFILE_BYTES)  # a valid header, padded
    huge = len(huge).to_bytes(4, "big") + huge[4:]
    image = Image.fromarray(photos.coffee()).resize((800, 533))
    image.info["icc_profile"] = huge
    thumb = Image.open(io.BytesIO(imaging.make_thumbnail(image, max_side=400)))
    assert "icc_profile" not in thumb.info
    image.info["icc_profile"] = b"\0" * 16 + b"RGB " + b"\0" * 200  # says RGB, is no profile
    assert "icc_profile" not in Image.open(io.BytesIO(imaging.make_thumbnail(image, max_side=400))).info
