"""The bulk lane's store: a batch marked ready at once."""

from __future__ import annotations

import pytest

from tests.factories import CollectionFactory, ImageFactory
from webapp import ingest
from webapp.models import Image, ImageStatus


@pytest.mark.django_db
def test_a_batch_is_marked_ready_with_each_images_own_thumbnail(owner) -> None:
    collection = CollectionFactory(owner=owner)
    images = [ImageFactory(collection=collection, status=ImageStatus.PROCESSING, error="old") for _ in range(3)]
    other = ImageFactory(collection=collection, status=ImageStatus.PROCESSING)
    ingest.images_mark_ready({image.pk: f"thumbnails/{image.pk}.jpg" for image in images})
    for image in images:
        image.refresh_from_db()
        expected = (ImageStatus.READY, "", f"thumbnails/{image.pk}.jpg")
        assert (image.status, image.error, image.thumbnail_path) == expected
        assert image.processed_at is not None
    assert Image.objects.get(pk=other.pk).status == ImageStatus.PROCESSING
