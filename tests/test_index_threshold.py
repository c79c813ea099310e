"""A library's first vectors are searched exactly; the HNSW index is built once there are enough.

Growing the graph one insert at a time costs PostgreSQL about 2 ms of CPU per image, and below
HNSW_INDEX_MIN_ROWS vectors an exact scan answers as fast (docs/search.md#the-index).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.urls import reverse

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, half, unit_vector
from webapp import embeddings, vector_index
from webapp import similarity as sim
from webapp.models import Embedding, EmbeddingModel, Image, ImageStatus


@pytest.mark.django_db(transaction=True)  # as a worker does: the build follows committed vectors
def test_searches_scan_exactly_until_the_version_holds_enough_vectors_then_walk_its_index(
    settings, admin_user
) -> None:
    settings.HNSW_INDEX_MIN_ROWS = 5
    version = default_version()  # as a worker registers the first version: active, no vectors yet
    assert version.is_active and not embeddings.embedding_index_exists(version=version)
    collection = CollectionFactory()
    vectors = [unit_vector(seed) for seed in range(5)]
    images = [ImageFactory(collection=collection) for _ in vectors]
    for image, vector in zip(images[:4], vectors[:4], strict=True):
        embed(image, vector, version)
        default_version()  # a worker's next batch ensures its version first
    assert not embeddings.embedding_index_exists(version=version)

    scope = sim.search_scope(version=version, viewer=admin_user)
    assert sim.choose_plan(scope) == "exact"  # no filter, but no graph to walk yet
    query = unit_vector(99)
    results = sim.vector_similar(vector=query, version=version, viewer=admin_user, k=3, expand=0)
    expected = np.argsort(-(half(np.stack(vectors[:4])) @ half(query)))[:3]
    assert [r.image.pk for r in results] == [images[i].pk for i in expected]

    embed(images[4], vectors[4], version)
    default_version()
    assert embeddings.embedding_index_exists(version=version)
    assert sim.choose_plan(scope) == "hnsw"


@pytest.mark.django_db(transaction=True)  # as a worker does: the build follows committed vectors
def test_activating_a_version_builds_its_index_whatever_its_size(settings) -> None:
    settings.HNSW_INDEX_MIN_ROWS = 1000
    first = default_version()
    second = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    image = ImageFactory(status=ImageStatus.READY)
    embed(image, unit_vector(1), first)
    embed(image, unit_vector(2), second)

    embeddings.embedding_model_activate(version=second)

    assert embeddings.embedding_index_exists(version=second)  # a re-indexed version: built in one go
    assert not embeddings.embedding_index_exists(version=first)


@pytest.mark.django_db(transaction=True)  # as a worker does: the build follows committed vectors
def test_the_health_page_says_whether_the_index_is_built(settings, admin_client_) -> None:
    settings.HNSW_INDEX_MIN_ROWS = 2
    version = default_version()
    page = admin_client_.get(reverse("admin_health")).content.decode()
    assert "none yet: searches scan every vector until the version holds 2" in page
    for seed in range(2):
        embed(ImageFactory(), unit_vector(seed), version)
    other = connection.copy()  # a bulk worker building it
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [embeddings.INDEX_BUILD_LOCK, version.pk])
        page = admin_client_.get(reverse("admin_health")).content.decode()
        assert "being built (concurrently: uploads go on)" in page
    finally:
        other.close()
    default_version()
    page = admin_client_.get(reverse("admin_health")).content.decode()
    assert '<td id="health-index">HNSW graph</td>' in page


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_the_worker_builds_the_index_once_uploads_reach_the_threshold(
    celery_worker_process, owner, owner_client, photos
) -> None:
    celery_worker_process.stop()
    # As many as the photos: only the batch that stores the last one can see enough vectors.
    celery_worker_process.start(HNSW_INDEX_MIN_ROWS=str(len(photos)))
    try:
        created = owner_client.post(reverse("collection_create"), {"name": "First import", "visibility": "public"})
        key = created["Location"].strip("/").split("/")[-1]
        names = list(photos)

        def upload_and_wait(chosen: list[str]) -> None:
            uploads = [SimpleUploadedFile(name, photos[name]) for name in chosen]
            response = owner_client.post(reverse("collection_upload", args=[key]), {"files": uploads},
                                         HTTP_ACCEPT="application/json")
            assert response.status_code == 202
            deadline = time.monotonic() + 120
            while Image.objects.filter(status=ImageStatus.READY).count() < Image.objects.count():
                assert time.monotonic() < deadline, "images did not become ready"
                time.sleep(0.2)

        upload_and_wait(names[:3])
        version = EmbeddingModel.objects.get(is_active=True)
        assert not embeddings.embedding_index_exists(version=version)
        assert sim.choose_plan(sim.search_scope(version=version, viewer=owner)) == "exact"
        first = Image.objects.get(original_name=names[0])
        similar = owner_client.get(f"/api/v1/images/{first.key}/similar?k=2").json()["results"]
        assert len(similar) == 2  # answered by an exact scan

        upload_and_wait(names[3:])
        assert Image.objects.filter(status=ImageStatus.READY).count() == len(photos)
        # Built after the last batch was stored (a batch's own check before storing saw one too few).
        assert embeddings.embedding_index_exists(version=version)
        assert sim.choose_plan(sim.search_scope(version=version, viewer=owner)) == "hnsw"
        similar = owner_client.get(f"/api/v1/images/{first.key}/similar?k=4").json()["results"]
        assert len(similar) == 4
    finally:
        celery_worker_process.stop()
        celery_worker_process.start()


@contextmanager
def _writer_mid_transaction(version: EmbeddingModel) -> Iterator[None]:
    """Another session that has written to the vector table and not committed yet (a worker's batch)."""
    other = connection.copy()
    other.ensure_connection()
    raw = other.connection
    try:
        raw.autocommit = False
        raw.execute("UPDATE simili_embedding SET augment_floor = NULL WHERE model_version_id = %s", [version.pk])
        yield
        raw.commit()
    finally:
        other.close()


def _build_in_thread(version: EmbeddingModel, errors: list[Exception]) -> threading.Thread:
    def build() -> None:
        try:
            embeddings.embedding_index_build(version=version)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=build)
    thread.start()
    return thread


def _building_backend() -> int:
    """The pid of the session building an index, once it waits for the writer to finish."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%%' "
                           "AND wait_event_type = 'Lock'")
            row = cursor.fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError("no index build waited for the open transaction")


@pytest.mark.django_db(transaction=True)  # the build runs in its own session, as a worker's does
def test_uploads_keep_writing_vectors_while_a_new_versions_index_is_built() -> None:
    """A re-indexed version's build (10 minutes at a million rows) must not hold up uploads."""
    active = default_version()
    new = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    image, upload = ImageFactory(status=ImageStatus.READY), ImageFactory(status=ImageStatus.PROCESSING)
    embed(image, unit_vector(1), new)
    errors: list[Exception] = []
    with _writer_mid_transaction(new):
        builder = _build_in_thread(new, errors)
        _building_backend()
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '3s'")  # a blocked write fails here instead of hanging
        try:
            started = time.monotonic()
            embed(upload, unit_vector(2), active)  # the worker storing a fresh upload's vector
            waited = time.monotonic() - started
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
    builder.join(60)
    assert errors == []
    assert waited < 1.0
    assert Embedding.objects.filter(image=upload, model_version=active).exists()
    assert embeddings.embedding_index_exists(version=new)


@pytest.mark.django_db(transaction=True)
def test_an_index_left_invalid_by_a_failed_build_is_not_searched_and_is_built_again(admin_user) -> None:
    default_version()
    version = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    images = [ImageFactory(status=ImageStatus.READY) for _ in range(3)]
    for seed, image in enumerate(images):
        embed(image, unit_vector(seed), version)
    errors: list[Exception] = []
    with _writer_mid_transaction(version):
        builder = _build_in_thread(version, errors)
        with connection.cursor() as cursor:  # as an admin's pg_cancel_backend or a killed worker would
            cursor.execute("SELECT pg_cancel_backend(%s)", [_building_backend()])
        builder.join(30)
    assert len(errors) == 1  # the build's error reaches its caller

    with connection.cursor() as cursor:
        assert vector_index.state(cursor, version_id=version.pk) == "invalid"
    assert not embeddings.embedding_index_ready(version=version)
    scope = sim.search_scope(version=version, viewer=admin_user)
    assert sim.choose_plan(scope) == "exact"  # PostgreSQL would not walk an invalid index anyway

    assert embeddings.embedding_index_build(version=version)
    assert embeddings.embedding_index_exists(version=version)
    assert sim.choose_plan(scope) == "hnsw"
    results = sim.vector_similar(vector=unit_vector(0), version=version, viewer=admin_user, k=1, expand=0)
    assert [r.image.pk for r in results] == [images[0].pk]


@pytest.mark.django_db(transaction=True)
def test_activation_is_refused_while_another_process_builds_the_versions_index() -> None:
    default_version()
    new = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    embed(ImageFactory(status=ImageStatus.READY), unit_vector(1), new)
    other = connection.copy()  # a bulk worker finishing the re-index holds the build lock
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [embeddings.INDEX_BUILD_LOCK, new.pk])
        with pytest.raises(ValueError, match="is being built"):
            embeddings.embedding_model_activate(version=new)
        new.refresh_from_db()
        assert not new.is_active
    finally:
        other.close()
    embeddings.embedding_model_activate(version=new)  # once the build is over
    new.refresh_from_db()
    assert new.is_active and embeddings.embedding_index_exists(version=new)


@pytest.mark.django_db(transaction=True)
def test_one_index_build_or_drop_runs_at_a_time_on_the_vector_table() -> None:
    """Two concurrent builds (or a build and a drop) on one table: PostgreSQL cancels one of them."""
    default_version()
    new = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    old = EmbeddingModel.objects.create(key="older@1", backbone="older", dimensions=1280)
    embed(ImageFactory(status=ImageStatus.READY), unit_vector(1), new)
    other = connection.copy()  # a bulk worker building another version's index
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, 0)", [embeddings.INDEX_BUILD_LOCK])
        assert not embeddings.embedding_index_build(version=new, wait=False)
        assert not embeddings.embedding_index_exists(version=new)
        with pytest.raises(ValueError, match="an index is being built"):
            embeddings.embedding_model_drop(version=old)
        assert EmbeddingModel.objects.filter(pk=old.pk).exists()
    finally:
        other.close()
    assert embeddings.embedding_index_build(version=new, wait=False)
    assert embeddings.embedding_index_exists(version=new)
    embeddings.embedding_model_drop(version=old)
    assert not EmbeddingModel.objects.filter(pk=old.pk).exists()
    with connection.cursor() as cursor:  # every lock released
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s",
                       [embeddings.INDEX_BUILD_LOCK])
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db(transaction=True)
def test_an_imports_statistics_refresh_does_not_wait_for_an_index_build() -> None:
    """`import_folder` ends with ANALYZE; waiting on the build's table lock would get the build cancelled."""
    from webapp import services

    default_version()
    new = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    embed(ImageFactory(status=ImageStatus.READY), unit_vector(1), new)
    errors: list[Exception] = []
    with _writer_mid_transaction(new):
        builder = _build_in_thread(new, errors)
        _building_backend()
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '3s'")
        try:
            started = time.monotonic()
            services.images_analyze()
            waited = time.monotonic() - started
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
    builder.join(60)
    assert errors == [] and waited < 1.0
    assert embeddings.embedding_index_exists(version=new)


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_an_upload_becomes_searchable_while_a_new_versions_index_is_built(
    celery_worker_process, owner_client, photos
) -> None:
    """The user's view of the concurrent build: the worker stores the upload's vector meanwhile."""
    created = owner_client.post(reverse("collection_create"), {"name": "During a switch", "visibility": "public"})
    key = created["Location"].strip("/").split("/")[-1]
    active = default_version()
    new = EmbeddingModel.objects.create(key="other@1", backbone="other", dimensions=1280)
    embed(ImageFactory(status=ImageStatus.READY), unit_vector(1), new)  # the re-index's vectors
    errors: list[Exception] = []
    with _writer_mid_transaction(new):  # the build waits for it: it stays under way while we upload
        builder = _build_in_thread(new, errors)
        _building_backend()
        name = "chelsea.jpg"
        response = owner_client.post(reverse("collection_upload", args=[key]),
                                     {"files": [SimpleUploadedFile(name, photos[name])]},
                                     HTTP_ACCEPT="application/json")
        assert response.status_code == 202
        image = Image.objects.get(original_name=name)
        deadline = time.monotonic() + 60
        while not Embedding.objects.filter(image=image, model_version=active).exists():
            assert time.monotonic() < deadline, "the upload's vector waited for the index build"
            time.sleep(0.1)
        image.refresh_from_db()
        assert image.status == ImageStatus.READY
        assert builder.is_alive()  # the build was still under way the whole time
    builder.join(60)
    assert errors == [] and embeddings.embedding_index_exists(version=new)
