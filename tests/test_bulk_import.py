"""Bulk import from a folder tree: batched embedding on the bulk lane, resumable, duplicates skipped."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from tests.conftest import near_copy
from tests.factories import CollectionFactory, ImageFactory
from webapp import ingest
from webapp.models import Collection, Embedding, Image, ImageStatus


@pytest.fixture
def tree(tmp_path: Path, photos) -> Path:
    for name, data in photos.items():
        folder = tmp_path / ("animals" if name.startswith(("chelsea", "motorcycle")) else "things")
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        (folder / f"copy-{name}.jpg").write_bytes(near_copy(data))
    (tmp_path / "things" / "notes.txt").write_text("not an image")
    return tmp_path


def _reencoded(data: bytes, *, quality: int) -> bytes:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _published_tasks(monkeypatch) -> list[tuple[str, str]]:
    """Record (task name, queue) of every embedding task published from now on; each is still sent."""
    from webapp.tasks import embed_image, embed_pending

    published: list[tuple[str, str]] = []
    for task in (embed_image, embed_pending):
        def spy(*args, _publish=task.apply_async, _name=task.name, **kwargs):
            published.append((_name, kwargs.get("queue", "")))
            return _publish(*args, **kwargs)

        monkeypatch.setattr(task, "apply_async", spy)
    return published


def _wait_all_settled(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while Image.objects.exclude(status__in=[ImageStatus.READY, ImageStatus.FAILED]).exists():
        assert time.monotonic() < deadline, list(Image.objects.values_list("status", flat=True))
        time.sleep(0.3)


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_folder_tree_becomes_collections_embedded_in_batches(celery_worker_process, owner, tree) -> None:
    out = io.StringIO()
    call_command("import_folder", str(tree), "--owner", owner.username, "--visibility", "public",
                 "--no-progress", stdout=out)
    assert "10 accepted, 0 duplicate(s), 1 rejected, into 2 collection(s)" in out.getvalue()
    assert "notes.txt" in out.getvalue()
    assert set(Collection.objects.values_list("name", flat=True)) == {"animals", "things"}
    _wait_all_settled()
    assert set(Image.objects.values_list("status", flat=True)) == {ImageStatus.READY}
    assert Embedding.objects.count() == 10

    # Running it again (after an interruption, say) adds nothing and embeds nothing twice.
    again = io.StringIO()
    call_command("import_folder", str(tree), "--owner", owner.username, "--no-progress", stdout=again)
    assert "0 accepted, 10 duplicate(s), 1 rejected" in again.getvalue()
    assert Image.objects.count() == 10 and Embedding.objects.count() == 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_an_admin_re_embeds_a_collection_through_batch_tasks(
    celery_worker_process, owner, tree, admin_client_, monkeypatch
) -> None:
    from django.conf import settings
    from django.urls import reverse

    from webapp.tasks import embed_pending

    call_command("import_folder", str(tree), "--owner", owner.username, "--no-progress", stdout=io.StringIO())
    _wait_all_settled()
    published = _published_tasks(monkeypatch)
    ids = list(Image.objects.values_list("pk", flat=True))

    response = admin_client_.post(reverse("admin:simili_image_changelist"),
                                  {"action": "reembed", "_selected_action": ids})

    assert response.status_code == 302
    assert [name for name, _ in published] == [embed_pending.name] * -(-len(ids) // (settings.EMBED_BATCH_SIZE or 32))
    _wait_all_settled()
    assert set(Image.objects.values_list("status", flat=True)) == {ImageStatus.READY}
    assert Embedding.objects.count() == len(ids) == 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_many_file_upload_sends_its_first_files_interactive_and_batches_the_rest(
    celery_worker_process, owner, owner_client, photos, settings, monkeypatch
) -> None:
    """A 100-photo upload must not queue ahead of other users' single uploads on the one
    interactive worker: past the first few, its files are embedded in batches on the bulk lane."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse

    from webapp.tasks import embed_image, embed_pending

    settings.INTERACTIVE_FILES_PER_UPLOAD = 2
    published = _published_tasks(monkeypatch)
    collection = CollectionFactory(owner=owner)
    files = [SimpleUploadedFile(f"{i}.jpg", _reencoded(photos["chelsea.jpg"], quality=70 + i)) for i in range(6)]

    response = owner_client.post(reverse("collection_upload", args=[collection.key]), {"files": files},
                                 HTTP_ACCEPT="application/json")

    assert response.status_code == 202
    assert [r["outcome"] for r in response.json()["results"]] == ["accepted"] * 6
    assert all("queued" not in r for r in response.json()["results"])
    lanes = dict(Image.objects.values_list("original_name", "lane"))
    assert lanes == {"0.jpg": "interactive", "1.jpg": "interactive", **{f"{i}.jpg": "bulk" for i in range(2, 6)}}
    assert published == [(embed_image.name, "interactive")] * 2 + [(embed_pending.name, "bulk")]
    _wait_all_settled()
    assert set(Image.objects.values_list("status", flat=True)) == {ImageStatus.READY}


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_broken_file_is_refused_at_import_or_failed_by_the_worker_never_lost(celery_worker_process, owner,
                                                                              tmp_path, photos) -> None:
    """The import checks a JPEG's structure and leaves the one decode to the worker.

    A truncated file (no end marker) is rejected at once and nothing is stored; a file whose
    structure is whole but whose data cannot be decoded is imported and fails in the worker,
    with its reason on the row and in --wait's report.
    """
    good = photos["chelsea.jpg"]
    folder = tmp_path / "pets"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(good)
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    sos = good.index(b"\xff\xda")
    (folder / "hollow.jpg").write_bytes(good[: sos + 12] + b"\xff\xd9")  # scan header, then the end marker
    out = io.StringIO()
    call_command("import_folder", str(tmp_path), "--owner", owner.username, "--wait", "--no-progress", stdout=out)
    report = out.getvalue()
    assert "3 file(s): 2 accepted, 0 duplicate(s), 1 rejected" in report
    assert "rejected pets/truncated.jpg: The image is truncated or corrupt" in report
    assert "1 image(s) ready, 1 failed." in report and "failed hollow.jpg: The image is truncated or corrupt" in report
    rows = dict(Image.objects.values_list("original_name", "status"))
    assert rows == {"good.jpg": ImageStatus.READY, "hollow.jpg": ImageStatus.FAILED}


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_take_the_same_image(owner) -> None:
    collection = CollectionFactory(owner=owner)
    ids = {ImageFactory(collection=collection, status=ImageStatus.PENDING).pk for _ in range(40)}
    claimed: list[list[int]] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        try:
            barrier.wait()
            claimed.append([job.image_id for job in ingest.images_claim(limit=15)])
        finally:
            connection.close()

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [image_id for batch in claimed for image_id in batch]
    assert len(flat) == len(set(flat)) == 40
    assert set(flat) == ids
    assert set(Image.objects.values_list("status", flat=True)) == {ImageStatus.PROCESSING}
    assert ingest.images_claim(limit=15) == []


@pytest.mark.django_db
def test_a_claimed_image_is_not_claimed_again_by_its_own_task(owner) -> None:
    image = ImageFactory(collection=CollectionFactory(owner=owner), status=ImageStatus.PENDING)
    assert [job.image_id for job in ingest.images_claim(ids=[image.pk])] == [image.pk]
    assert ingest.images_claim(ids=[image.pk]) == []
    image.refresh_from_db()
    assert (image.status, image.attempts) == (ImageStatus.PROCESSING, 1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("write_every", [1, 3, 32])
def test_rows_written_in_batches_are_those_one_by_one_would_write(monkeypatch, owner, tmp_path, photos,
                                                                 write_every: int) -> None:
    """Same content twice in a folder, or already in the collection: one row, counted as a duplicate."""
    from webapp import imports, services

    monkeypatch.setattr(imports, "WRITE_EVERY", write_every)
    # Rows only: no batch tasks. The session's worker (started by an earlier test) would embed
    # them during this test's teardown, and its batch transaction once deadlocked with the flush.
    monkeypatch.setattr(services, "enqueue_bulk_batches", lambda count: 0)
    folder = tmp_path / "pets"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (folder / name).write_bytes(photos[{"a.jpg": "chelsea.jpg", "b.png": "coffee.png"}.get(name, "rocket.webp")])
    (folder / "d-again.jpg").write_bytes(photos["chelsea.jpg"])
    out = io.StringIO()
    call_command("import_folder", str(tmp_path), "--owner", owner.username, "--no-progress", stdout=out)
    assert "4 file(s): 3 accepted, 1 duplicate(s), 0 rejected" in out.getvalue()
    rows = sorted(Image.objects.values_list("original_name", "collection__name", "uploaded_by", "mime_type",
                                            "byte_size"))
    assert rows == [("a.jpg", "pets", owner.pk, "image/jpeg", len(photos["chelsea.jpg"])),
                    ("b.png", "pets", owner.pk, "image/png", len(photos["coffee.png"])),
                    ("c.webp", "pets", owner.pk, "image/webp", len(photos["rocket.webp"]))]

    (folder / "e.jpg").write_bytes(photos["astronaut.jpg"])
    again = io.StringIO()
    call_command("import_folder", str(tmp_path), "--owner", owner.username, "--no-progress", stdout=again)
    assert "5 file(s): 1 accepted, 4 duplicate(s), 0 rejected" in again.getvalue()
    assert Image.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_loses_a_race_to_an_upload_keeps_the_uploaded_row(monkeypatch, owner, photos) -> None:
    from webapp import services

    collection = CollectionFactory(owner=owner)
    items = [(collection, name, services.image_prepare(photos[name])) for name in ("chelsea.jpg", "coffee.png")]
    real_bulk_create = Image.objects.bulk_create
    uploaded: list[Image] = []

    def upload_first(objs, *args, **kwargs):
        # Another request uploads the same photo and commits between the lookup and the insert.
        def other_request() -> None:
            try:
                uploaded.append(services.image_ingest(collection=collection, uploaded_by=owner,
                                                      data=photos["coffee.png"], name="upload.png", queue=None).image)
            finally:
                connection.close()

        thread = threading.Thread(target=other_request)
        thread.start()
        thread.join()
        return real_bulk_create(objs, *args, **kwargs)

    monkeypatch.setattr(Image.objects, "bulk_create", upload_first)
    results = services.images_ingest_prepared(items=items, uploaded_by=owner)
    assert [(r.image.original_name, r.created) for r in results] == [("chelsea.jpg", True), ("upload.png", False)]
    assert results[1].image.pk == uploaded[0].pk
    assert sorted(Image.objects.values_list("original_name", flat=True)) == ["chelsea.jpg", "upload.png"]


@pytest.mark.django_db
def test_a_batch_never_claims_a_single_upload_until_the_reconciler_hands_it_over(owner, owner_client, photos,
                                                                                settings) -> None:
    """A bulk batch took the newest pending rows once it caught up with an import, uploads included,
    and a single upload then waited seconds for that batch (bench/ingest.py's probe, 2.4-5 s)."""
    from datetime import timedelta

    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse
    from django.utils import timezone

    from webapp import services

    collection = CollectionFactory(owner=owner)
    bulk = {ImageFactory(collection=collection, status=ImageStatus.PENDING).pk for _ in range(5)}
    response = owner_client.post(reverse("collection_upload", args=[collection.key]),
                                 {"files": [SimpleUploadedFile("one.jpg", photos["chelsea.jpg"])]},
                                 HTTP_ACCEPT="application/json")
    assert response.status_code == 202
    upload = Image.objects.get(original_name="one.jpg")
    assert (upload.status, upload.lane) == (ImageStatus.PENDING, "interactive")

    assert {job.image_id for job in ingest.images_claim(limit=50)} == bulk
    assert ingest.images_claim(limit=50) == []

    # Its message lost: after RECONCILE_PENDING_AFTER the reconciler puts it on the bulk lane.
    Image.objects.filter(pk=upload.pk).update(
        enqueued_at=timezone.now() - timedelta(seconds=settings.RECONCILE_PENDING_AFTER + 1))
    assert services.images_requeue_stale() == 1
    assert Image.objects.get(pk=upload.pk).lane == "bulk"
    assert [job.image_id for job in ingest.images_claim(limit=50)] == [upload.pk]


@pytest.mark.django_db
def test_a_row_whose_worker_died_is_embedded_alone_after_the_fresh_rows(owner) -> None:
    """An image that kills its worker must not take the rows batched with it down each time."""
    from datetime import timedelta

    from django.utils import timezone

    from webapp import services

    collection = CollectionFactory(owner=owner)
    fresh = [ImageFactory(collection=collection, status=ImageStatus.PENDING).pk for _ in range(3)]
    crashed = [ImageFactory(collection=collection, status=ImageStatus.PROCESSING).pk for _ in range(2)]
    # Their worker died mid-batch: stale rows go back to pending with the attempt counted.
    Image.objects.filter(pk__in=crashed).update(attempts=1, updated_at=timezone.now() - timedelta(days=1),
                                                enqueued_at=timezone.now() - timedelta(days=1))
    services.images_requeue_stale()
    assert set(Image.objects.filter(pk__in=crashed).values_list("status", flat=True)) == {ImageStatus.PENDING}

    assert [job.image_id for job in ingest.images_claim(limit=32)] == fresh
    assert [job.image_id for job in ingest.images_claim(limit=32)] == [crashed[0]]
    assert [job.image_id for job in ingest.images_claim(limit=32)] == [crashed[1]]
    assert ingest.images_claim(limit=32) == []


@pytest.mark.django_db(transaction=True)
def test_an_images_own_task_waits_for_a_row_being_written_instead_of_dropping_it(owner) -> None:
    image = ImageFactory(collection=CollectionFactory(owner=owner), status=ImageStatus.PENDING,
                         lane="interactive")
    locked, release = threading.Event(), threading.Event()

    def writer() -> None:  # another transaction holds the row (the uploader stamping it, say)
        from django.db import transaction

        try:
            with transaction.atomic():
                Image.objects.select_for_update().get(pk=image.pk)
                locked.set()
                release.wait(5)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert locked.wait(5)
    threading.Timer(0.3, release.set).start()
    claimed = ingest.images_claim(ids=[image.pk])
    thread.join()
    assert [job.image_id for job in claimed] == [image.pk]


@pytest.mark.django_db(transaction=True)
def test_an_upload_is_stamped_queued_before_its_message_exists(monkeypatch, owner, photos) -> None:
    from webapp import services
    from webapp.tasks import embed_image

    seen: list[object] = []
    publish = embed_image.apply_async

    def spy(*args, **kwargs):
        seen.append(Image.objects.get(pk=kwargs["args"][0]).enqueued_at)
        return publish(*args, **kwargs)

    monkeypatch.setattr(embed_image, "apply_async", spy)
    image = services.image_ingest(collection=CollectionFactory(owner=owner), uploaded_by=owner,
                                  data=photos["chelsea.jpg"], name="one.jpg").image
    assert len(seen) == 1 and seen[0] is not None
    image.refresh_from_db()
    assert image.enqueued_at == seen[0]


@pytest.mark.django_db(transaction=True)
def test_a_batch_whose_write_fails_leaves_no_file_behind(monkeypatch, owner, photos) -> None:
    from django.db import OperationalError

    from webapp import services, storage

    collection = CollectionFactory(owner=owner)
    items = [(collection, name, services.image_prepare(photos[name])) for name in ("chelsea.jpg", "coffee.png")]
    paths = [storage.media_path(prepared.file_path) for _, _, prepared in items]
    assert all(path.is_file() for path in paths)

    def connection_lost(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(Image.objects, "bulk_create", connection_lost)
    with pytest.raises(OperationalError):
        services.images_ingest_prepared(items=items, uploaded_by=owner)
    assert not any(path.exists() for path in paths) and not Image.objects.exists()
