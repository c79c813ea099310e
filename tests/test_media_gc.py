"""The hourly media sweep removes files no row references, and only old ones."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import media_files
from tests.factories import ImageFactory
from webapp import services, storage

pytestmark = pytest.mark.django_db


def _write(relative: str, *, age: float) -> None:
    storage.write_atomic(relative, b"bytes")
    then = time.time() - age
    os.utime(storage.media_path(relative), (then, then))


def test_the_sweep_removes_old_orphans_and_keeps_everything_else() -> None:
    image = ImageFactory()
    small = "thumbnails-small/" + image.thumbnail_path.split("/", 1)[1]
    for kept in (image.file_path, image.thumbnail_path, small):
        _write(kept, age=7200)
    orphan = storage.content_path("originals", "a" * 64, "jpg")
    _write(orphan, age=7200)
    _write(storage.content_path("thumbnails", "b" * 64, "jpg"), age=7200)
    _write(storage.content_path("originals", "c" * 64, "jpg"), age=10)  # may be an upload in flight
    _write("queries/old.jpg", age=7200)

    assert services.media_collect_garbage(older_than_seconds=3600) == 3

    left = {str(path).split("/media/", 1)[1] for path in media_files()}
    assert left == {image.file_path, image.thumbnail_path, small, storage.content_path("originals", "c" * 64, "jpg")}


def test_an_upload_that_reuses_an_old_orphan_file_saves_it_from_the_sweep(owner, photos) -> None:
    """The same bytes were stored before and their row is gone: the new upload reuses the file."""
    import hashlib

    data = photos["chelsea.jpg"]
    relative = storage.content_path("originals", hashlib.sha256(data).hexdigest(), "jpg")
    storage.write_atomic(relative, data)
    then = time.time() - 7200
    os.utime(storage.media_path(relative), (then, then))
    collection = services.collection_create(owner=owner, name="Cats", visibility="public")
    # The sweep runs between the upload's file check and its commit: it must not take the file.
    services.image_ingest(collection=collection, uploaded_by=owner, data=data, name="cat.jpg", queue=None)
    assert time.time() - storage.media_path(relative).stat().st_mtime < 60
    from webapp.models import Image

    Image.objects.all().delete()  # as if the sweep ran before the row was committed
    services.media_collect_garbage()
    assert storage.media_path(relative).exists()
