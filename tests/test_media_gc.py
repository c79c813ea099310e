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


def _stored_image(owner, photos, name: str = "Cats"):
    collection = services.collection_create(owner=owner, name=name, visibility="private")
    image = services.image_ingest(collection=collection, uploaded_by=owner, data=photos["chelsea.jpg"],
                                  name="cat.jpg", queue=None).image
    image.thumbnail_path = storage.content_path("thumbnails", image.sha256, "jpg")
    image.save()
    _write(image.thumbnail_path, age=7200)
    old = time.time() - 7200
    os.utime(storage.media_path(image.file_path), (old, old))  # uploaded long ago
    return image


def test_a_deleted_image_takes_its_files_once_the_deletion_commits(
    owner, photos, django_capture_on_commit_callbacks
) -> None:
    image = _stored_image(owner, photos)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.image_delete(image=image)
    assert storage.media_path(image.file_path).exists()  # not before the commit
    for callback in callbacks:
        callback()
    assert not storage.media_path(image.file_path).exists()
    assert not storage.media_path(image.thumbnail_path).exists()


def test_a_rolled_back_deletion_keeps_the_image_and_its_files(owner, photos) -> None:
    """The admin deletes in a transaction: should anything after the delete fail, nothing is lost."""
    from django.db import transaction

    from webapp.models import Image

    image = _stored_image(owner, photos)
    pk = image.pk
    with pytest.raises(RuntimeError), transaction.atomic():
        services.image_delete(image=image)
        raise RuntimeError("the admin's next step failed")
    assert Image.objects.filter(pk=pk).exists()
    assert storage.media_path(image.file_path).exists() and storage.media_path(image.thumbnail_path).exists()


def test_an_admin_deleting_images_takes_their_files_after_the_commit(
    admin_client, owner, photos, django_capture_on_commit_callbacks
) -> None:
    from django.urls import reverse

    from webapp.models import Image

    image = _stored_image(owner, photos)
    pk, original = image.pk, image.file_path
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(reverse("admin:simili_image_changelist"),
                                     {"action": "delete_selected", "_selected_action": [pk], "post": "yes"})
    assert response.status_code == 302
    assert not Image.objects.filter(pk=pk).exists()
    assert storage.media_path(original).exists()  # until the deletion commits
    for callback in callbacks:
        callback()
    assert not storage.media_path(original).exists()
