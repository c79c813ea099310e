"""Hostile and odd files through the real upload and embedding: each one has a stated outcome.

Every file is generated here (Pillow, numpy, raw bytes). Rejected files must leave no row and no
file; accepted ones must go through `image_embed` to a ready image with a correct thumbnail and a
unit-length embedding.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from PIL import Image as PILImage
from skimage import data as skimage_data

from tests.conftest import media_files
from tests.factories import CollectionFactory
from webapp import services, storage
from webapp.models import Embedding, Image, ImageStatus

pytestmark = pytest.mark.django_db

RED = (255, 0, 0)
GREEN = (0, 160, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
#: JPEG, chroma subsampling and the Lanczos thumbnail move colours a little; this is "the same colour".
COLOUR_TOLERANCE = 40


@pytest.fixture
def collection(owner):
    return CollectionFactory(owner=owner)


# --- making files -----------------------------------------------------------------------


def _encode(image: PILImage.Image, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _noise(width: int = 320, height: int = 240) -> PILImage.Image:
    """Incompressible pixels, so that any cut lands in the pixel data."""
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PILImage.fromarray(pixels)


def _halves(
    left: int | tuple[int, ...], right: int | tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (64, 32)
) -> PILImage.Image:
    image = PILImage.new(mode, size, left)
    image.paste(PILImage.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few hundred bytes of IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096, 9)  # the first few rows' worth; a decoder would want gigabytes
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _idat_span(png: bytes) -> tuple[int, int]:
    """Return where the first IDAT chunk's data starts and ends."""
    start = png.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", png[start - 8:start - 4])
    return start, start + length


def _png_with_bad_idat_crc() -> bytes:
    png = _encode(_noise(), "PNG")
    _, end = _idat_span(png)
    return png[:end] + bytes(b ^ 0xFF for b in png[end:end + 4]) + png[end + 4:]


def _png_with_garbage_idat() -> bytes:
    """Deflate data overwritten in the middle, with a CRC that matches the garbage."""
    png = _encode(_noise(), "PNG")
    start, end = _idat_span(png)
    data = bytearray(png[start:end])
    middle = len(data) // 2
    data[middle:middle + 256] = b"\xff" * 256
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)))
    return png[:start] + bytes(data) + crc + png[end + 4:]


def _truncated(fmt: str, **save: object) -> Callable[[], bytes]:
    def make() -> bytes:
        data = _encode(_noise(), fmt, **save)
        return data[: len(data) // 2]

    return make


def _zip_archive() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("payload.txt", "not an image")
    return out.getvalue()


def _jpeg_with_zip_appended() -> bytes:
    return _encode(_noise(), "JPEG", quality=90) + _zip_archive()


def _jpeg_with_script_comment() -> bytes:
    return _encode(_noise(64, 64), "JPEG", comment=b"<script>alert(document.cookie)</script>")


def _pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


# --- going through HTTP and the embedding service ----------------------------------------


def _post(client, collection, files: list[tuple[str, bytes]]):
    uploads = [SimpleUploadedFile(name, data, content_type="image/jpeg") for name, data in files]
    return client.post(reverse("collection_upload", args=[collection.key]), {"files": uploads},
                       HTTP_ACCEPT="application/json")


def _upload_and_embed(client, collection, name: str, data: bytes) -> Image:
    response = _post(client, collection, [(name, data)])
    assert response.status_code == 202, response.content
    assert response.json()["results"][0]["outcome"] == "accepted"
    image = Image.objects.get(collection=collection)
    services.image_embed(image_id=image.pk)
    image.refresh_from_db()
    return image


def _thumbnail(image: Image) -> PILImage.Image:
    path = storage.media_path(image.thumbnail_path)
    assert path.is_file()
    thumb = PILImage.open(path)
    assert thumb.format == "JPEG"
    return thumb.convert("RGB")


def _colour_at(thumb: PILImage.Image, fx: float, fy: float = 0.5) -> tuple[int, int, int]:
    """The thumbnail's colour at a fraction of its width and height."""
    x = min(thumb.width - 1, int(thumb.width * fx))
    y = min(thumb.height - 1, int(thumb.height * fy))
    return thumb.getpixel((x, y))  # type: ignore[return-value]


def _assert_colour(actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= COLOUR_TOLERANCE, (actual, expected)


def _assert_ready_with_unit_embedding(image: Image) -> None:
    assert (image.status, image.error) == (ImageStatus.READY, "")
    assert image.thumbnail_path and storage.media_path(image.thumbnail_path).is_file()
    vectors = [np.asarray(e.vector, dtype=np.float64) for e in Embedding.objects.filter(image=image)]
    assert len(vectors) == 1
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-4)


# --- rejected ------------------------------------------------------------------------------


REJECTED: list[tuple[str, str, Callable[[], bytes], int, str]] = [
    ("zero-byte", "empty.jpg", lambda: b"", 400, "empty_file"),
    ("truncated-jpeg", "cut.jpg", _truncated("JPEG", quality=95), 400, "corrupt_image"),
    ("truncated-png", "cut.png", _truncated("PNG"), 400, "corrupt_image"),
    ("truncated-tiff", "cut.tif", _truncated("TIFF"), 400, "corrupt_image"),
    ("truncated-webp", "cut.webp", _truncated("WEBP", quality=90), 400, "corrupt_image"),
    ("png-bad-idat-crc", "crc.png", _png_with_bad_idat_crc, 400, "corrupt_image"),
    ("png-garbage-idat", "idat.png", _png_with_garbage_idat, 400, "corrupt_image"),
    ("plain-text", "notes.jpg", lambda: b"Dear diary, today I uploaded a text file.\n" * 20, 415, "unsupported_format"),
    ("svg", "vector.svg",
     lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
     415, "unsupported_format"),
    ("html", "page.png", lambda: b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
     415, "unsupported_format"),
    ("pdf", "doc.pdf", _pdf, 415, "unsupported_format"),
    ("zip", "archive.zip", _zip_archive, 415, "unsupported_format"),
    ("zip-named-jpg", "holiday.jpg", _zip_archive, 415, "unsupported_format"),
    ("jpeg-with-zip-appended", "polyglot.jpg", _jpeg_with_zip_appended, 415, "unsupported_format"),
    ("jpeg-with-script-comment", "xss.jpg", _jpeg_with_script_comment, 415, "unsupported_format"),
    ("png-bomb-100000x100000", "bomb.png", lambda: _png_bomb(100_000, 100_000), 413, "image_too_large"),
    ("png-bomb-just-over-the-pixel-limit", "bomb.png", lambda: _png_bomb(8_000, 8_000), 413, "image_too_large"),
]


@pytest.mark.parametrize(
    ("name", "make", "status", "code"),
    [pytest.param(name, make, status, code, id=case) for case, name, make, status, code in REJECTED],
)
def test_a_hostile_file_is_rejected_with_its_code_and_leaves_nothing(
    owner_client, collection, name, make, status, code
) -> None:
    response = _post(owner_client, collection, [(name, make())])
    assert response.status_code == status
    [result] = response.json()["results"]
    assert (result["outcome"], result["code"]) == ("rejected", code)
    assert result["message"]
    assert Image.objects.count() == 0
    assert media_files() == []


@pytest.mark.parametrize("size", [(100_000, 100_000), (8_000, 8_000)], ids=["100000x100000", "8000x8000"])
def test_a_decompression_bomb_is_rejected_without_decoding_it(owner_client, collection, size) -> None:
    bomb = _png_bomb(*size)
    assert len(bomb) < 1000
    started = time.perf_counter()
    response = _post(owner_client, collection, [("bomb.png", bomb)])
    elapsed = time.perf_counter() - started
    assert response.status_code == 413
    assert elapsed < 1.0, f"took {elapsed:.2f} s: the pixels were decoded"


def test_a_file_over_the_byte_limit_is_rejected_before_it_is_read(owner_client, collection, settings) -> None:
    data = _encode(_noise(), "PNG")
    settings.MAX_UPLOAD_BYTES = len(data) - 1
    response = _post(owner_client, collection, [("big.png", data)])
    assert response.status_code == 413
    [result] = response.json()["results"]
    assert (result["outcome"], result["code"]) == ("rejected", "file_too_large")
    assert Image.objects.count() == 0
    assert media_files() == []


def _distinct_pngs(count: int) -> list[tuple[str, bytes]]:
    return [(f"{i}.png", _encode(PILImage.new("RGB", (8, 8), (i, 0, 0)), "PNG")) for i in range(count)]


@pytest.mark.parametrize(
    "parser_limit",
    [pytest.param(True, id="django-parser-limit-too"), pytest.param(False, id="app-limit-only")],
)
def test_more_files_than_allowed_is_a_clean_json_400(owner_client, collection, settings, parser_limit) -> None:
    settings.MAX_FILES_PER_UPLOAD = 2
    if parser_limit:
        settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    response = _post(owner_client, collection, _distinct_pngs(3))
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["code"] == "too_many_files"
    assert Image.objects.count() == 0
    assert media_files() == []


def test_a_browser_upload_with_too_many_files_gets_a_json_400_past_the_csrf_check(
    owner, collection, settings
) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    client.get(collection.get_absolute_url())
    settings.MAX_FILES_PER_UPLOAD = settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    uploads = [SimpleUploadedFile(name, data, content_type="image/png") for name, data in _distinct_pngs(3)]
    response = client.post(reverse("collection_upload", args=[collection.key]), {"files": uploads},
                           HTTP_ACCEPT="application/json", HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["code"] == "too_many_files"


def test_the_upload_form_says_when_there_are_too_many_files(owner_client, collection, settings) -> None:
    settings.MAX_FILES_PER_UPLOAD = 2
    uploads = [SimpleUploadedFile(name, data, content_type="image/png") for name, data in _distinct_pngs(3)]
    response = owner_client.post(reverse("collection_upload", args=[collection.key]), {"files": uploads})
    assert response.status_code == 302
    assert "Upload at most 2 files at a time." in owner_client.get(response["Location"]).content.decode()
    assert Image.objects.count() == 0


def test_exactly_the_allowed_number_of_files_is_accepted(owner_client, collection, settings) -> None:
    settings.MAX_FILES_PER_UPLOAD = settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    response = _post(owner_client, collection, _distinct_pngs(2))
    assert response.status_code == 202
    assert Image.objects.count() == 2


@pytest.mark.parametrize(
    "parser_limit",
    [pytest.param(True, id="django-parser-limit-too"), pytest.param(False, id="app-limit-only")],
)
def test_the_api_answers_too_many_files_with_a_json_400(client, owner, collection, settings, parser_limit) -> None:
    _, token = services.api_token_create(user=owner, name="test")
    settings.MAX_FILES_PER_UPLOAD = 2
    if parser_limit:
        settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    uploads = [SimpleUploadedFile(name, data, content_type="image/png") for name, data in _distinct_pngs(3)]
    response = client.post(f"/api/v1/collections/{collection.key}/images", {"files": uploads},
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 400
    assert response.json()["code"] == "too_many_files"
    assert Image.objects.count() == 0
    assert media_files() == []


# --- accepted and embedded -----------------------------------------------------------------


def _cmyk_jpeg() -> bytes:
    return _encode(PILImage.new("CMYK", (64, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def _palette_png() -> bytes:
    return _encode(_halves(RED, BLUE).convert("P", palette=PILImage.Palette.ADAPTIVE, colors=4), "PNG")


def _palette_png_with_transparency() -> bytes:
    image = PILImage.new("P", (64, 32), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    image.paste(1, (32, 0, 64, 32))
    return _encode(image, "PNG", transparency=0)


def _rgba_png() -> bytes:
    return _encode(_halves((0, 0, 0, 0), (*GREEN, 255), mode="RGBA"), "PNG")


def _la_png() -> bytes:
    return _encode(_halves((0, 0), (0, 255), mode="LA"), "PNG")


def _greyscale_jpeg() -> bytes:
    return _encode(_halves(40, 200, mode="L"), "JPEG", quality=95)


def _multipage_tiff() -> bytes:
    pages = [PILImage.new("RGB", (64, 32), colour) for colour in (RED, BLUE)]
    return _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


ACCEPTED: list[tuple[str, str, Callable[[], bytes], list[tuple[float, tuple[int, int, int]]]]] = [
    ("cmyk-jpeg", "cmyk.jpg", _cmyk_jpeg, [(0.5, RED)]),
    ("palette-png", "palette.png", _palette_png, [(0.2, RED), (0.8, BLUE)]),
    ("palette-png-with-transparency", "ptrans.png", _palette_png_with_transparency, [(0.2, WHITE), (0.8, BLUE)]),
    ("rgba-png", "rgba.png", _rgba_png, [(0.2, WHITE), (0.8, GREEN)]),
    ("la-png", "la.png", _la_png, [(0.2, WHITE), (0.8, BLACK)]),
    ("greyscale-jpeg", "grey.jpg", _greyscale_jpeg, [(0.2, (40, 40, 40)), (0.8, (200, 200, 200))]),
    ("multipage-tiff", "pages.tif", _multipage_tiff, [(0.5, RED)]),
    ("heic", "phone.heic", lambda: _encode(_halves(RED, BLUE), "HEIF", quality=90), [(0.2, RED), (0.8, BLUE)]),
    ("webp", "web.webp", lambda: _encode(_halves(RED, BLUE), "WEBP", lossless=True), [(0.2, RED), (0.8, BLUE)]),
]


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [pytest.param(name, make, expected, id=case) for case, name, make, expected in ACCEPTED],
)
def test_an_odd_but_valid_image_is_embedded_with_a_faithful_thumbnail(
    owner_client, collection, name, make, expected
) -> None:
    image = _upload_and_embed(owner_client, collection, name, make())
    _assert_ready_with_unit_embedding(image)
    thumb = _thumbnail(image)
    assert thumb.size == (64, 32)
    for fx, colour in expected:
        _assert_colour(_colour_at(thumb, fx), colour)


def _served_thumbnail(client, image: Image) -> bytes:
    response = client.get(reverse("media_thumbnail", args=[image.key]))
    assert response.status_code == 200
    return b"".join(response.streaming_content)


def test_a_small_plain_jpeg_is_served_as_its_own_thumbnail(owner_client, collection) -> None:
    photo = _encode(PILImage.fromarray(skimage_data.coffee()).resize((384, 256)), "JPEG", quality=80)
    image = _upload_and_embed(owner_client, collection, "small.jpg", photo)
    _assert_ready_with_unit_embedding(image)
    assert _served_thumbnail(owner_client, image) == photo


def test_a_small_jpeg_with_a_location_gets_a_thumbnail_without_it(owner_client, collection) -> None:
    exif = PILImage.Exif()
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    photo = _encode(PILImage.fromarray(skimage_data.coffee()).resize((384, 256)), "JPEG", exif=exif)
    image = _upload_and_embed(owner_client, collection, "home.jpg", photo)
    served = _served_thumbnail(owner_client, image)
    thumb = PILImage.open(io.BytesIO(served))
    assert thumb.size == (384, 256) and not thumb.getexif()
    assert b"Exif" not in served


def test_a_16_bit_greyscale_gradient_keeps_its_gradient(owner_client, collection) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    data = _encode(PILImage.fromarray(ramp), "PNG")
    assert PILImage.open(io.BytesIO(data)).mode == "I;16"
    image = _upload_and_embed(owner_client, collection, "depth.png", data)
    _assert_ready_with_unit_embedding(image)
    grey = np.asarray(_thumbnail(image).convert("L"), dtype=np.int16)[32]
    assert grey[2] < 20 and grey[-3] > 235
    assert np.all(np.diff(grey[::16]) > 0), "the thumbnail should brighten left to right"


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)], ids=["1x100000", "100000x1"])
def test_an_absurdly_thin_image_is_embedded(owner_client, collection, size) -> None:
    data = _encode(PILImage.new("RGB", size, RED), "PNG")
    image = _upload_and_embed(owner_client, collection, "strip.png", data)
    _assert_ready_with_unit_embedding(image)
    assert sorted(_thumbnail(image).size) == [1, 400]


# EXIF orientation n says how the stored pixels must be turned to be seen upright; a camera
# stores the upright picture turned the other way. These are those inverse turns (PIL's
# ROTATE_90 is counter-clockwise).
STORED_FOR_ORIENTATION: dict[int, Callable[[PILImage.Image], PILImage.Image]] = {
    1: lambda im: im,
    2: lambda im: im.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(PILImage.Transpose.ROTATE_180),
    4: lambda im: im.transpose(PILImage.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(PILImage.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(PILImage.Transpose.ROTATE_90),
    7: lambda im: im.transpose(PILImage.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(PILImage.Transpose.ROTATE_270),
}


def _canonical() -> PILImage.Image:
    """240x80: red left third, blue right third; the middle third green on top, white below."""
    image = PILImage.new("RGB", (240, 80), WHITE)
    image.paste(RED, (0, 0, 80, 80))
    image.paste(GREEN, (80, 0, 160, 40))
    image.paste(BLUE, (160, 0, 240, 80))
    return image


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION), ids=lambda o: f"orientation-{o}")
def test_a_jpeg_is_shown_upright_whatever_its_exif_orientation(owner_client, collection, orientation) -> None:
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    stored = STORED_FOR_ORIENTATION[orientation](_canonical())
    image = _upload_and_embed(owner_client, collection, "camera.jpg", _encode(stored, "JPEG", quality=95, exif=exif))
    _assert_ready_with_unit_embedding(image)
    thumb = _thumbnail(image)
    assert thumb.size == (240, 80)
    _assert_colour(_colour_at(thumb, 1 / 6), RED)
    _assert_colour(_colour_at(thumb, 5 / 6), BLUE)
    _assert_colour(_colour_at(thumb, 0.5, 0.25), GREEN)
    _assert_colour(_colour_at(thumb, 0.5, 0.75), WHITE)

