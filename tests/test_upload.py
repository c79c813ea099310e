"""Uploading through HTTP: accepted images are stored once; bad input is rejected and leaves nothing."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from tests.conftest import media_files
from tests.factories import CollectionFactory
from webapp.models import Image, ImageStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def collection(owner):
    return CollectionFactory(owner=owner)


def _post(client, collection, files, json=True):
    uploads = [SimpleUploadedFile(name, data, content_type="image/jpeg") for name, data in files]
    headers = {"HTTP_ACCEPT": "application/json"} if json else {}
    return client.post(reverse("collection_upload", args=[collection.key]), {"files": uploads}, **headers)


def test_several_images_are_stored_pending_with_hash_derived_paths(owner_client, collection, photos) -> None:
    files = [("../../etc/passwd.jpg", photos["chelsea.jpg"]), ("coffee.png", photos["coffee.png"]),
             ("rocket.webp", photos["rocket.webp"])]
    response = _post(owner_client, collection, files)
    assert response.status_code == 202
    assert [r["outcome"] for r in response.json()["results"]] == ["accepted"] * 3
    images = list(collection.images.order_by("id"))
    assert [i.mime_type for i in images] == ["image/jpeg", "image/png", "image/webp"]
    assert all(i.status == ImageStatus.PENDING for i in images)
    assert images[0].original_name == "passwd.jpg"
    for image in images:
        assert image.file_path.startswith(f"originals/{image.sha256[:2]}/")
        assert image.file_path.endswith(f"{image.sha256}.{image.file_path.rsplit('.', 1)[1]}")
    assert len(media_files()) == 3


def test_the_same_file_twice_is_stored_once(owner_client, collection, photos) -> None:
    _post(owner_client, collection, [("a.jpg", photos["chelsea.jpg"])])
    response = _post(owner_client, collection, [("b.jpg", photos["chelsea.jpg"])])
    assert response.json()["results"][0]["outcome"] == "duplicate"
    assert collection.images.count() == 1
    assert len(media_files()) == 1


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("notes.jpg", b"this is plain text, not a picture", 415, "unsupported_format"),
        ("empty.jpg", b"", 400, "empty_file"),
        ("page.png", b"<html><script>alert(1)</script></html>", 415, "unsupported_format"),
    ],
)
def test_non_images_are_rejected_and_leave_nothing(owner_client, collection, name, data, status, code) -> None:
    response = _post(owner_client, collection, [(name, data)])
    assert response.status_code == status
    result = response.json()["results"][0]
    assert result["outcome"] == "rejected" and result["code"] == code
    assert result["message"]
    assert Image.objects.count() == 0
    assert media_files() == []


def test_a_truncated_jpeg_is_rejected_and_leaves_nothing(owner_client, collection, photos) -> None:
    data = photos["astronaut.jpg"]
    response = _post(owner_client, collection, [("cut.jpg", data[: len(data) // 2])])
    assert response.status_code == 400
    assert "truncated" in response.json()["results"][0]["message"]
    assert Image.objects.count() == 0
    assert media_files() == []


def test_a_file_over_the_byte_limit_is_rejected(owner_client, collection, photos, settings) -> None:
    settings.MAX_UPLOAD_BYTES = 1000
    response = _post(owner_client, collection, [("big.jpg", photos["chelsea.jpg"])])
    assert response.status_code == 413
    assert Image.objects.count() == 0


def test_the_form_upload_shows_the_reason_on_the_page(owner_client, collection, photos) -> None:
    files = [("notes.txt", b"hello"), ("cat.jpg", photos["chelsea.jpg"])]
    response = _post(owner_client, collection, files, json=False)
    assert response.status_code == 302
    page = owner_client.get(response["Location"]).content.decode()
    assert "notes.txt: The file is not an image in an accepted format (JPEG, PNG, WebP, GIF, TIFF, HEIC/HEIF)." in page
    assert "1 image(s) uploaded" in page
    assert collection.images.count() == 1


def test_anonymous_visitors_cannot_upload(anonymous_client, collection, photos) -> None:
    response = _post(anonymous_client, collection, [("cat.jpg", photos["chelsea.jpg"])])
    assert response.status_code == 403
    assert Image.objects.count() == 0
