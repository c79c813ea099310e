"""Fault tests with real processes: a worker killed mid-task, Redis restarted during uploads.

Each ends with every image ready and embedded exactly once, with no manual action.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from tests.conftest import near_copy
from webapp.models import Embedding, Image, ImageStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

#: The reconciler runs every second in these tests and re-queues work stuck for 3 s.
FAST_RECONCILE = {
    "RECONCILE_INTERVAL": "1",
    "RECONCILE_PENDING_AFTER": "3",
    "RECONCILE_PROCESSING_AFTER": "3",
}


@pytest.fixture
def fast_worker(celery_worker_process):
    """The session's worker, restarted with a fast reconciler; restored afterwards."""
    celery_worker_process.stop()
    celery_worker_process.start(**FAST_RECONCILE)
    yield celery_worker_process
    celery_worker_process.stop()
    celery_worker_process.start()


def _collection(client) -> str:
    response = client.post(reverse("collection_create"), {"name": "Faults", "visibility": "public"})
    return response["Location"].strip("/").split("/")[-1]


def _upload(client, key: str, files: dict[str, bytes]):
    uploads = [SimpleUploadedFile(name, data) for name, data in files.items()]
    return client.post(reverse("collection_upload", args=[key]), {"files": uploads}, HTTP_ACCEPT="application/json")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _assert_all_ready_exactly_once(count: int) -> None:
    images = list(Image.objects.all())
    assert len(images) == count
    assert {image.status for image in images} == {ImageStatus.READY}, [(i.pk, i.status, i.error) for i in images]
    assert Embedding.objects.count() == count
    for image in images:
        assert image.embeddings.count() == 1


def _photo_set(photos) -> dict[str, bytes]:
    files = dict(photos)
    files.update({f"copy-{name}": near_copy(data) for name, data in photos.items()})
    return files


@contextmanager
def _workers_stall_before_storing(files: Iterable[bytes]) -> Iterator[None]:
    """Hold the files' thumbnail locks: a worker claims images, embeds them, then waits to store.

    A worker used to finish a handful of photos in 0.3 s, before the test saw one in progress.
    """
    from django.db import transaction

    from webapp import services, storage

    paths = [storage.content_path("thumbnails", hashlib.sha256(data).hexdigest(), "jpg") for data in files]
    with transaction.atomic():
        services.files_lock(paths)
        yield


def test_a_worker_killed_mid_task_loses_no_image(fast_worker, owner_client, photos) -> None:
    files = _photo_set(photos)
    key = _collection(owner_client)
    fast_worker.kill()  # no worker while uploading: the queue fills up
    assert _upload(owner_client, key, files).status_code == 202
    with _workers_stall_before_storing(files.values()):
        # Not waiting for a ping: a solo worker busy with the backlog answers none until it is done.
        fast_worker.start(wait=False, **FAST_RECONCILE)
        _wait(lambda: Image.objects.filter(status=ImageStatus.PROCESSING).exists(), 60, "a task in progress")
        fast_worker.kill()
    # One upload's own task, or, when the worker took longer than RECONCILE_PENDING_AFTER (3 s
    # here) to start, a batch the reconciler queued for the whole backlog: either way some
    # images are claimed by a process that is now dead, and none was stored.
    assert Image.objects.filter(status=ImageStatus.PROCESSING).count() >= 1
    assert Image.objects.filter(status=ImageStatus.READY).count() == 0

    fast_worker.start(wait=False, **FAST_RECONCILE)
    _wait(lambda: Image.objects.filter(status=ImageStatus.READY).count() == len(files), 120, "all images ready")
    _assert_all_ready_exactly_once(len(files))


def test_a_worker_killed_mid_batch_loses_no_image(fast_worker, owner, photos, tmp_path) -> None:
    """The bulk lane: rows claimed by a batch stay 'processing' when its worker dies; none is lost."""
    import io

    from django.core.management import call_command

    for name, data in _photo_set(photos).items():
        (tmp_path / name).write_bytes(data)
    fast_worker.kill()  # the import queues its batch tasks with no worker running
    call_command("import_folder", str(tmp_path), "--owner", owner.username, "--no-progress", stdout=io.StringIO())
    total = Image.objects.count()
    assert total == len(photos) * 2
    with _workers_stall_before_storing(_photo_set(photos).values()):
        fast_worker.start(wait=False, **FAST_RECONCILE)
        _wait(lambda: Image.objects.filter(status=ImageStatus.PROCESSING).exists(), 60, "a batch in progress")
        fast_worker.kill()
    assert Image.objects.filter(status=ImageStatus.PROCESSING).count() > 1  # a whole batch was claimed
    assert Image.objects.filter(status=ImageStatus.READY).count() == 0

    fast_worker.start(wait=False, **FAST_RECONCILE)
    _wait(lambda: Image.objects.filter(status=ImageStatus.READY).count() == total, 120, "all images ready")
    _assert_all_ready_exactly_once(total)


def test_uploads_during_a_redis_outage_are_embedded_once_it_returns(
    fast_worker, redis_server, owner_client, photos
) -> None:
    key = _collection(owner_client)
    redis_server.stop()
    try:
        started = time.monotonic()
        response = _upload(owner_client, key, photos)
        assert response.status_code == 202
        assert time.monotonic() - started < 15, "an upload must not hang while the broker is down"
        assert {r["outcome"] for r in response.json()["results"]} == {"accepted"}
        assert set(Image.objects.values_list("status", flat=True)) == {ImageStatus.PENDING}
        assert not Image.objects.filter(enqueued_at__isnull=False).exists()
        assert owner_client.get(reverse("collection", args=[key])).status_code == 200
    finally:
        redis_server.start()
    _wait(lambda: Image.objects.filter(status=ImageStatus.READY).count() == len(photos), 120, "all images ready")
    _assert_all_ready_exactly_once(len(photos))


@pytest.mark.skipif(not settings.EMBEDDED_POSTGRES, reason="needs the embedded PostgreSQL to restart it")
def test_workers_reconnect_after_the_database_restarts(celery_worker_process, owner_client, photos) -> None:
    from django.db import connection

    from webapp import embedded

    key = _collection(owner_client)
    assert _upload(owner_client, key, {"coffee.png": photos["coffee.png"]}).status_code == 202
    _wait(lambda: Image.objects.filter(status=ImageStatus.READY).count() == 1, 120, "the first image")
    connection.close()
    embedded.stop_postgres(settings.EMBEDDED)  # every connection, the worker's included, is cut
    assert embedded.start_postgres(settings.EMBEDDED)
    assert _upload(owner_client, key, {"rocket.webp": photos["rocket.webp"]}).status_code == 202
    _wait(lambda: Image.objects.filter(status=ImageStatus.READY).count() == 2, 120, "the image after the restart")
    _assert_all_ready_exactly_once(2)


@pytest.mark.django_db
def test_the_reconciler_gives_up_on_an_image_whose_worker_died_every_time(owner, settings) -> None:
    """An image that kills its worker is failed after EMBED_MAX_ATTEMPTS, with the reason; others go again."""
    from datetime import timedelta

    from django.utils import timezone

    from tests.factories import CollectionFactory, ImageFactory
    from webapp import services

    collection = CollectionFactory(owner=owner)
    long_ago = timezone.now() - timedelta(seconds=settings.RECONCILE_PROCESSING_AFTER + 60)
    doomed, again = ImageFactory(collection=collection), ImageFactory(collection=collection)
    Image.objects.filter(pk=doomed.pk).update(status=ImageStatus.PROCESSING, attempts=settings.EMBED_MAX_ATTEMPTS,
                                              updated_at=long_ago)
    Image.objects.filter(pk=again.pk).update(status=ImageStatus.PROCESSING, attempts=1, updated_at=long_ago)
    assert services.images_requeue_stale() == 1
    doomed.refresh_from_db()
    again.refresh_from_db()
    assert doomed.status == ImageStatus.FAILED and doomed.processed_at is not None
    assert doomed.error.startswith(f"Gave up after {settings.EMBED_MAX_ATTEMPTS} attempts")
    assert again.status == ImageStatus.PENDING


@pytest.mark.django_db
def test_the_reconciler_leaves_alone_an_image_a_worker_finished_after_it_looked(owner, settings, monkeypatch) -> None:
    """The reconciler reads stale rows, then updates them: a worker may finish one in between."""
    from datetime import timedelta

    from django.utils import timezone

    from tests.factories import CollectionFactory, ImageFactory
    from webapp import services

    collection = CollectionFactory(owner=owner)
    long_ago = timezone.now() - timedelta(seconds=settings.RECONCILE_PROCESSING_AFTER + 60)
    slow, stuck = ImageFactory(collection=collection), ImageFactory(collection=collection)
    Image.objects.filter(pk__in=[slow.pk, stuck.pk]).update(status=ImageStatus.PROCESSING, attempts=1,
                                                            updated_at=long_ago)
    read = services._stale_ids

    def read_then_the_worker_finishes(stale):
        ids = read(stale)
        Image.objects.filter(pk=slow.pk).update(status=ImageStatus.READY, updated_at=timezone.now())
        return ids

    monkeypatch.setattr(services, "_stale_ids", read_then_the_worker_finishes)
    assert services.images_requeue_stale() == 1
    slow.refresh_from_db()
    stuck.refresh_from_db()
    assert slow.status == ImageStatus.READY  # not pending again: it stays searchable, embedded once
    assert stuck.status == ImageStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_vector_write_on_a_lost_connection_raises_an_error_the_tasks_retry(owner) -> None:
    """Vector writes use psycopg's own cursor; its errors must still come out as django.db's."""
    from django.db import connection

    from tests.factories import CollectionFactory, ImageFactory, default_version, unit_vector
    from webapp.embeddings import VectorRow, embeddings_store
    from webapp.tasks import TRANSIENT_ERRORS

    version = default_version()
    image = ImageFactory(collection=CollectionFactory(owner=owner), uploaded_by=owner, status=ImageStatus.PROCESSING)
    row = VectorRow(image_id=image.pk, collection_id=image.collection_id, vector=unit_vector(1),
                    augmented=unit_vector(1))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    other = connection.copy()
    try:
        with other.cursor() as cursor:  # as a database restart or an idle timeout would
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()

    with pytest.raises(TRANSIENT_ERRORS):
        embeddings_store(version=version, rows=[row])
    connection.close_if_unusable_or_obsolete()  # what Django does after each request and task

    assert embeddings_store(version=version, rows=[row]) == 1  # on a fresh connection
    assert Embedding.objects.filter(image=image, model_version=version).count() == 1
