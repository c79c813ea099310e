"""The hourly media sweep removes files no row references, and only old ones."""

from __future__ import annotations

import os
import threading
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


def _in_another_connection(work) -> threading.Thread:
    """Run `work` in a thread with its own database connection (another request, another process)."""
    from django.db import connection

    def run() -> None:
        try:
            work()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _finish(thread: threading.Thread) -> None:
    thread.join(30)
    assert not thread.is_alive(), "the other connection's work did not finish"


def _wait_for_an_advisory_lock_wait(timeout: float = 30) -> None:
    """Return once some backend waits for an advisory lock (seen from this test's own connection)."""
    from django.db import connection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            if cursor.fetchone()[0]:
                return
        time.sleep(0.02)
    raise AssertionError("nobody waited for a file's lock")


def _a_copy_elsewhere(owner, data: bytes):
    """(a second collection, an image of `data` in a first one): the same photo will be added to the second."""
    first = services.collection_create(owner=owner, name="First", visibility="private")
    second = services.collection_create(owner=owner, name="Second", visibility="private")
    return second, services.image_ingest(collection=first, uploaded_by=owner, data=data, name="cat.jpg",
                                         queue=None).image


def _another_request_deletes(image) -> None:
    from webapp.models import Image

    _finish(_in_another_connection(lambda: services.image_delete(image=Image.objects.get(pk=image.pk))))


@pytest.mark.django_db(transaction=True)
def test_an_upload_whose_shared_file_a_deletion_removes_before_its_row_commits_stores_it_again(
    monkeypatch, owner, owner_client, photos
) -> None:
    """Files are shared by content: deleting another copy of the photo must not take the new one's file."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse

    from webapp.models import Image

    data = photos["chelsea.jpg"]
    second, old = _a_copy_elsewhere(owner, data)
    prepare = services.image_prepare

    def prepare_then_another_request_deletes(*args, **kwargs):
        prepared = prepare(*args, **kwargs)  # the upload has stored (here: reused) the file
        _another_request_deletes(old)
        assert not storage.media_path(prepared.file_path).exists()  # no committed row used it
        return prepared

    monkeypatch.setattr(services, "image_prepare", prepare_then_another_request_deletes)
    response = owner_client.post(reverse("collection_upload", args=[second.key]),
                                 {"files": [SimpleUploadedFile("cat.jpg", data, content_type="image/jpeg")]},
                                 HTTP_ACCEPT="application/json")
    assert response.status_code == 202, response.content
    assert not Image.objects.filter(pk=old.pk).exists()
    new = Image.objects.get(collection=second)
    served = owner_client.get(reverse("media_original", args=[new.key]))
    assert served.status_code == 200 and b"".join(served.streaming_content) == data


@pytest.mark.django_db(transaction=True)
def test_an_upload_waits_for_a_deletion_checking_its_shared_file_then_stores_it_again(
    monkeypatch, owner, photos
) -> None:
    data = photos["chelsea.jpg"]
    second, old = _a_copy_elsewhere(owner, data)
    checked, resume = threading.Event(), threading.Event()
    in_use = services.paths_in_use

    def check_then_pause(paths):
        used = in_use(paths)
        checked.set()  # the deletion has seen no row using the file and is about to unlink it
        assert resume.wait(10)
        return used

    monkeypatch.setattr(services, "paths_in_use", check_then_pause)
    deletion = _in_another_connection(lambda: services.image_delete(image=old))
    assert checked.wait(10)
    uploaded = []
    upload = _in_another_connection(lambda: uploaded.append(services.image_ingest(
        collection=second, uploaded_by=owner, data=data, name="cat.jpg", queue=None).image))
    _wait_for_an_advisory_lock_wait()  # the upload, its row inserted, waits for the file's lock
    assert upload.is_alive()
    resume.set()
    _finish(deletion)
    _finish(upload)
    assert len(uploaded) == 1
    assert storage.media_path(uploaded[0].file_path).read_bytes() == data


@pytest.mark.django_db(transaction=True)
def test_a_worker_stores_again_a_shared_thumbnail_a_deletion_removed_while_it_embedded(
    monkeypatch, owner, owner_client, photos
) -> None:
    from django.urls import reverse

    from webapp import ingest

    data = photos["chelsea.jpg"]
    second, old = _a_copy_elsewhere(owner, data)
    services.image_embed(image_id=old.pk)
    old.refresh_from_db()
    new = services.image_ingest(collection=second, uploaded_by=owner, data=data, name="cat.jpg", queue=None).image
    mark_ready = ingest.images_mark_ready
    write_atomic = storage.write_atomic
    thumbnails_written: list[bytes] = []

    def write_and_keep(relative, data):
        if relative.startswith("thumbnails/"):
            thumbnails_written.append(data)
        write_atomic(relative, data)

    monkeypatch.setattr(storage, "write_atomic", write_and_keep)

    def another_request_deletes_first(thumbnails):
        # The worker has written the shared thumbnail; its row does not use it until it commits.
        _another_request_deletes(old)
        assert not storage.media_path(old.thumbnail_path).exists()
        mark_ready(thumbnails)

    monkeypatch.setattr(ingest, "images_mark_ready", another_request_deletes_first)
    services.image_embed(image_id=new.pk)
    new.refresh_from_db()
    assert new.status == "ready" and new.thumbnail_path == old.thumbnail_path
    served = owner_client.get(reverse("media_thumbnail", args=[new.key]))
    assert served.status_code == 200 and b"".join(served.streaming_content) == thumbnails_written[0]


@pytest.mark.django_db(transaction=True)
def test_a_folder_import_reads_a_file_again_when_a_deletion_removed_its_stored_copy(
    monkeypatch, tmp_path, owner, photos
) -> None:
    from webapp import imports
    from webapp.models import Image

    data = photos["chelsea.jpg"]
    second, old = _a_copy_elsewhere(owner, data)
    source = tmp_path / "cat.jpg"
    source.write_bytes(data)
    bulk_create = Image.objects.bulk_create

    def another_request_deletes_first(objs, *args, **kwargs):
        _another_request_deletes(old)
        assert not storage.media_path(old.file_path).exists()
        return bulk_create(objs, *args, **kwargs)

    monkeypatch.setattr(Image.objects, "bulk_create", another_request_deletes_first)
    summary = imports.import_files([("cat.jpg", source, second)], owner=owner)
    assert summary.accepted == 1
    assert storage.media_path(Image.objects.get(collection=second).file_path).read_bytes() == data


@pytest.mark.django_db(transaction=True)
def test_a_folder_import_rejects_only_the_file_it_cannot_store_again(monkeypatch, tmp_path, owner, photos) -> None:
    """The stored copy was deleted and the source changed since it was read: that file alone is refused."""
    from webapp import imports
    from webapp.models import Image

    second, old = _a_copy_elsewhere(owner, photos["chelsea.jpg"])
    cat, coffee = tmp_path / "cat.jpg", tmp_path / "coffee.png"
    cat.write_bytes(photos["chelsea.jpg"])
    coffee.write_bytes(photos["coffee.png"])
    bulk_create = Image.objects.bulk_create

    def delete_first_and_edit_the_source(objs, *args, **kwargs):
        _another_request_deletes(old)
        cat.write_bytes(photos["coffee.png"])  # edited in place since the import read it
        return bulk_create(objs, *args, **kwargs)

    monkeypatch.setattr(Image.objects, "bulk_create", delete_first_and_edit_the_source)
    summary = imports.import_files([("cat.jpg", cat, second), ("coffee.png", coffee, second)], owner=owner)
    assert summary.accepted == 1
    assert [name for name, _ in summary.rejected] == ["cat.jpg"] and "add it again" in summary.rejected[0][1]
    kept = Image.objects.get(collection=second)
    assert kept.original_name == "coffee.png"
    assert storage.media_path(kept.file_path).read_bytes() == photos["coffee.png"]
    assert not storage.media_path(old.file_path).exists()
