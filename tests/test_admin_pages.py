"""Admin: lists with counts and thumbnails, moving images between collections, the health page."""

from __future__ import annotations

import numpy as np
import pytest
from django.urls import reverse

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, unit_vector
from webapp.models import Embedding, Image, ImageStatus, ImageTag

pytestmark = pytest.mark.django_db


def test_the_collection_list_shows_counts_and_a_cover(admin_client_, owner) -> None:
    collection = CollectionFactory(owner=owner, name="Birds")
    ready = ImageFactory(collection=collection)
    ImageFactory(collection=collection, status=ImageStatus.FAILED, error="corrupt")
    page = admin_client_.get(reverse("admin:simili_collection_changelist")).content.decode()
    assert "Birds" in page and reverse("media_thumbnail", args=[ready.key]) in page
    assert '<td class="field-images">2</td>' in page and '<td class="field-failed">1</td>' in page


def test_the_image_list_shows_status_error_model_version_and_tags(admin_client_) -> None:
    image = ImageFactory(status=ImageStatus.FAILED, error="The file is truncated")
    embedded = ImageFactory()
    embed(embedded, unit_vector(1))
    ImageTag.objects.create(image=embedded, label="tabby", confidence=0.7)
    page = admin_client_.get(reverse("admin:simili_image_changelist")).content.decode()
    assert "The file is truncated" in page and default_version().key in page and "tabby" in page
    filtered = admin_client_.get(reverse("admin:simili_image_changelist"), {"status__exact": "failed"})
    assert image.original_name in filtered.content.decode()
    assert embedded.original_name not in filtered.content.decode()
    found = admin_client_.get(reverse("admin:simili_image_changelist"), {"q": "tabby"}).content.decode()
    assert embedded.original_name in found and image.original_name not in found


def test_moving_images_asks_for_the_target_then_skips_duplicates(admin_client_, owner) -> None:
    source, target = CollectionFactory(owner=owner, name="Source"), CollectionFactory(owner=owner, name="Target")
    movable = ImageFactory(collection=source)
    duplicate = ImageFactory(collection=source)
    ImageFactory(collection=target, sha256=duplicate.sha256)
    vector = embed(movable, unit_vector(1), augmented=unit_vector(2)).vector
    url = reverse("admin:simili_image_changelist")
    ids = [str(movable.pk), str(duplicate.pk)]

    ask = admin_client_.post(url, {"action": "move", "_selected_action": ids})
    assert ask.status_code == 200 and "Move into" in ask.content.decode()
    assert Image.objects.get(pk=movable.pk).collection == source

    done = admin_client_.post(url, {"action": "move", "_selected_action": ids, "apply": "1", "target": target.pk},
                              follow=True)
    text = done.content.decode()
    assert "1 image(s) moved to Target." in text and "1 image(s) skipped" in text
    assert Image.objects.get(pk=movable.pk).collection == target
    assert Image.objects.get(pk=duplicate.pk).collection == source
    # Its augmented vector carried neighbours from the source: it falls back to its own vector.
    moved = Embedding.objects.get(image=movable)
    np.testing.assert_allclose(moved.augmented, vector, atol=1e-3)  # stored in half precision
    assert moved.collection_id == target.pk


def test_the_change_form_cannot_move_an_image_past_its_vectors(admin_client_, owner) -> None:
    source, target = CollectionFactory(owner=owner, name="Source"), CollectionFactory(owner=owner, name="Target")
    image = ImageFactory(collection=source, original_name="before.jpg")
    embed(image, unit_vector(1))
    url = reverse("admin:simili_image_change", args=[image.pk])
    assert 'name="collection"' not in admin_client_.get(url).content.decode()

    response = admin_client_.post(url, {"original_name": "after.jpg", "collection": target.pk, "status": "failed",
                                        "tags-TOTAL_FORMS": "0", "tags-INITIAL_FORMS": "0"})

    image.refresh_from_db()
    assert response.status_code in (200, 302)
    assert image.collection == source and image.status == ImageStatus.READY
    assert Embedding.objects.get(image=image).collection_id == source.pk


def test_the_health_page_is_for_staff_only(owner_client, anonymous_client) -> None:
    for client in (owner_client, anonymous_client):
        response = client.get(reverse("admin_health"))
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_health_page_counts_statuses_and_lists_failures(admin_client_) -> None:
    ImageFactory.create_batch(2)
    failed = ImageFactory(status=ImageStatus.FAILED, error="cannot identify image file")
    default_version()
    page = admin_client_.get(reverse("admin_health")).content.decode()
    assert '<td data-status="ready">2</td>' in page and '<td data-status="failed">1</td>' in page
    assert 'data-queue="interactive">0 waiting' in page and 'data-queue="bulk">' in page
    assert "cannot identify image file" in page and default_version().key in page
    assert 'id="health-workers">no answer' in page or "@" in page
    assert failed.original_name in page


def test_retry_failed_queues_every_failed_image_again(admin_client_) -> None:
    failed = ImageFactory.create_batch(2, status=ImageStatus.FAILED, error="boom")
    response = admin_client_.post(reverse("admin_health"), follow=True)
    assert "2 failed image(s) queued for embedding again." in response.content.decode()
    assert set(Image.objects.filter(pk__in=[i.pk for i in failed]).values_list("status", flat=True)) == {
        ImageStatus.PENDING
    }
