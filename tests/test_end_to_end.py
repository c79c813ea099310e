"""The whole path with real processes: HTTP upload -> Redis -> Celery worker -> pgvector -> page."""

from __future__ import annotations

import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from tests.conftest import media_files, near_copy, shown_similar
from webapp.models import Embedding, Image, ImageStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

READY_TIMEOUT = 180  # the first task loads the CNN in the worker


def _create_collection(client, name: str, visibility: str = "public") -> str:
    response = client.post(reverse("collection_create"), {"name": name, "visibility": visibility})
    assert response.status_code == 302
    return response["Location"].strip("/").split("/")[-1]


def _upload(client, key: str, files: dict[str, bytes]) -> list[dict]:
    uploads = [SimpleUploadedFile(name, data) for name, data in files.items()]
    response = client.post(reverse("collection_upload", args=[key]), {"files": uploads}, HTTP_ACCEPT="application/json")
    assert response.status_code == 202, response.content
    return response.json()["results"]


def _wait_until_settled(client, key: str, image_keys: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        response = client.get(reverse("collection_status", args=[key]), {"keys": ",".join(image_keys)})
        statuses = {img["key"]: img["status"] for img in response.json()["images"]}
        if all(statuses.get(k) in (ImageStatus.READY, ImageStatus.FAILED) for k in image_keys):
            return statuses
        assert time.monotonic() < deadline, f"images still processing: {statuses}"
        time.sleep(0.3)


def test_uploaded_photos_become_ready_and_a_near_copy_ranks_first(
    celery_worker_process, owner_client, outsider_client, photos
) -> None:
    key = _create_collection(owner_client, "Scikit-image photos")
    files = dict(photos)
    files["chelsea-copy.jpg"] = near_copy(photos["chelsea.jpg"])
    results = _upload(owner_client, key, files)
    image_keys = [r["image"]["key"] for r in results]
    by_name = {r["name"]: r["image"]["key"] for r in results}

    page = owner_client.get(reverse("collection", args=[key])).content.decode()
    assert "Pending" in page or "Processing" in page or "Ready" in page

    statuses = _wait_until_settled(owner_client, key, image_keys)
    assert set(statuses.values()) == {ImageStatus.READY}
    assert Embedding.objects.count() == len(files)
    # The worker stored the classifier's confident ImageNet labels as tags: the cat is a cat.
    cat_tags = set(Image.objects.get(key=by_name["chelsea.jpg"]).tags.values_list("label", flat=True))
    assert cat_tags & {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}, cat_tags
    for image in Image.objects.all():
        assert image.thumbnail_path and (image.thumbnail_path in {str(p).split("media/", 1)[1] for p in media_files()})

    response = outsider_client.get(reverse("image", args=[by_name["chelsea.jpg"]]))
    assert response.status_code == 200
    similar = shown_similar(response)
    assert similar[0].key == by_name["chelsea-copy.jpg"]
    assert similar[0].similarity > 0.85
    assert len(similar) == len(files) - 1
    assert [s.similarity for s in similar] == sorted((s.similarity for s in similar), reverse=True)
    html = response.content.decode()
    assert reverse("image", args=[by_name["chelsea-copy.jpg"]]) in html
    assert "% similar" in html

    # Clicking the first result opens that image's page, whose best match is the original.
    follow = outsider_client.get(reverse("image", args=[by_name["chelsea-copy.jpg"]]))
    assert shown_similar(follow)[0].key == by_name["chelsea.jpg"]

    # Search by an image that is not stored: a mirrored crop of the coffee photo.
    query = SimpleUploadedFile("query.jpg", near_copy(photos["coffee.png"]))
    response = outsider_client.post(reverse("search"), {"image": query, "collection": key})
    assert response.status_code == 200
    assert response.context["results"][0].image.key == by_name["coffee.png"]
    assert not any("queries/" in str(p) for p in media_files())

    # The admin re-embeds an image: it goes back through the queue and ends ready again.
    from django.contrib.auth import get_user_model
    from django.test import Client

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", password="pw-root-1"))
    target = Image.objects.get(key=by_name["rocket.webp"])
    response = admin.post(
        reverse("admin:simili_image_changelist"),
        {"action": "reembed", "_selected_action": [target.pk]},
    )
    assert response.status_code == 302
    assert Image.objects.get(pk=target.pk).status in (ImageStatus.PENDING, ImageStatus.PROCESSING, ImageStatus.READY)
    assert _wait_until_settled(owner_client, key, [target.key])[target.key] == ImageStatus.READY
    changelist = admin.get(reverse("admin:simili_image_changelist")).content.decode()
    assert reverse("media_thumbnail", args=[target.key]) in changelist


def test_a_private_collection_never_appears_in_search_by_image(
    celery_worker_process, owner_client, outsider_client, photos
) -> None:
    key = _create_collection(owner_client, "Secret cats", visibility="private")
    results = _upload(owner_client, key, {"chelsea.jpg": photos["chelsea.jpg"]})
    _wait_until_settled(owner_client, key, [results[0]["image"]["key"]])

    query = near_copy(photos["chelsea.jpg"])
    mine = owner_client.post(reverse("search"), {"image": SimpleUploadedFile("q.jpg", query)})
    assert [r.image.key for r in mine.context["results"]] == [results[0]["image"]["key"]]
    theirs = outsider_client.post(reverse("search"), {"image": SimpleUploadedFile("q.jpg", query)})
    assert theirs.status_code == 200
    assert theirs.context["results"] == []
