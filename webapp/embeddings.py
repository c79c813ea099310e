"""Writes for vectors: model versions, their HNSW indexes, and the embedding rows themselves."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from django.conf import settings
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connection, transaction

from webapp import vector_index
from webapp.models import Embedding, EmbeddingModel, Image, ImageStatus

logger = logging.getLogger(__name__)

MAX_INDEXED_DIMENSIONS = vector_index.MAX_INDEXED_DIMENSIONS


@dataclass(frozen=True)
class VectorRow:
    """One image's vectors for one model version, with the collection the search filters on."""

    image_id: int
    collection_id: int
    vector: np.ndarray
    augmented: np.ndarray


def embedding_model_ensure(*, key: str, backbone: str, dimensions: int) -> EmbeddingModel:
    """Return the model version row for a recipe key, creating it once.

    The first version becomes active and gets its index once it holds HNSW_INDEX_MIN_ROWS
    vectors, then the graph grows with each upload; a later one gets its index built in one go
    once re-indexing has filled it (embedding_index_build), which is several times faster than
    growing the graph one insert at a time.
    """
    if dimensions > MAX_INDEXED_DIMENSIONS:
        raise ValueError(
            f"{backbone} makes {dimensions}-dimensional vectors; the similarity index takes at most "
            f"{MAX_INDEXED_DIMENSIONS}. Add a projection (EMBEDDING_PROJECTION, from python -m retrieval.train "
            "--method projection) that maps them to fewer dimensions."
        )
    version, _ = EmbeddingModel.objects.get_or_create(
        key=key, defaults={"backbone": backbone, "dimensions": dimensions}
    )
    if not version.is_active and not EmbeddingModel.objects.filter(is_active=True).exists():
        try:
            with transaction.atomic():
                EmbeddingModel.objects.filter(pk=version.pk).update(is_active=True)
                version.is_active = True
        except IntegrityError:
            pass  # another worker activated a version first
    if version.is_active:
        try:
            embedding_index_build(version=version, when_due=True, wait=False)  # another process may build it
        except DatabaseError:  # the caller's batch must not fail for it: searches scan exactly meanwhile
            logger.warning("could not build the HNSW index of %s", version.key, exc_info=True)
    return version


#: First key of the advisory lock a version's index build holds (the second is the version's id).
INDEX_BUILD_LOCK = 5_140_001

#: Versions this process has seen an index for: the worker ensures its version on every batch,
#: and an active version's index is never dropped, so it is looked up once per process.
_INDEXED: set[int] = set()


def embedding_index_build(*, version: EmbeddingModel, when_due: bool = False, wait: bool = True) -> bool:
    """Build the version's HNSW index if it has none (idempotent; quick when it exists); return
    whether it is ready.

    With `when_due`, only once the version holds HNSW_INDEX_MIN_ROWS vectors: until then its
    searches scan exactly (`embedding_index_ready`), and uploads do not grow a graph one insert
    at a time. Outside a transaction the build runs concurrently: uploads, deletions and
    refreshes keep writing to the vector table while it runs (a plain build blocked them all,
    for 10 minutes at a million rows). One build or drop runs at a time (`_index_work`); with
    `wait` False a caller that finds one under way returns False at once.
    """
    if version.pk in _INDEXED:
        return True
    if when_due:
        with connection.cursor() as cursor:
            if not vector_index.rows_reach(cursor, version_id=version.pk, rows=settings.HNSW_INDEX_MIN_ROWS):
                return False
    concurrently = not connection.in_atomic_block  # CONCURRENTLY cannot run in a transaction (a migration's)
    with _index_work(version.pk, wait=wait) as cursor:
        if cursor is None:
            return False
        found = vector_index.state(cursor, version_id=version.pk)
        if found == "invalid":  # left by a build that failed or was killed: none other is running
            logger.warning("dropping the invalid HNSW index of %s left by a failed build", version.key)
            vector_index.drop(cursor, version_id=version.pk, concurrently=concurrently)
        if found != "valid":
            vector_index.build(
                cursor, version_id=version.pk, dimensions=version.dimensions, m=settings.HNSW_M,
                ef_construction=settings.HNSW_EF_CONSTRUCTION, memory=settings.HNSW_BUILD_MEMORY,
                concurrently=concurrently,
            )
            logger.info("built the HNSW index of %s", version.key)
    if version.is_active:
        # Remembered once it is there for every process: after the surrounding transaction, if any.
        transaction.on_commit(functools.partial(_INDEXED.add, version.pk))
    return True


#: Seconds between tries for the build lock while another process builds an index.
INDEX_LOCK_POLL = 0.5

#: Second key of the table-wide build lock (the per-version locks use the version's id).
_ANY_VERSION = 0


@contextmanager
def _index_work(version_id: int, *, wait: bool) -> Iterator[Any]:
    """Hold the locks for building or dropping a version's index; yield a cursor, or None if
    `wait` is False and another process holds them.

    One such statement on the table at a time (a table-wide lock), and per version for the
    health page to see (`embedding_index_building`). A concurrent build takes a table lock that
    another concurrent build or drop waits for, while the first waits, at its end, for the
    second's snapshot: PostgreSQL then cancels one of them, most likely the build of minutes.
    Two bulk workers building at once also failed on the catalog's unique name. The locks are
    tried and polled (`services.advisory_lock`), never waited on, for the same reason.
    """
    from webapp.services import advisory_lock

    if connection.in_atomic_block:  # released with the transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s) AND pg_try_advisory_xact_lock(%s, %s)",
                           [INDEX_BUILD_LOCK, _ANY_VERSION, INDEX_BUILD_LOCK, int(version_id)])
            yield cursor if cursor.fetchone()[0] else None
        return
    while True:
        with advisory_lock(INDEX_BUILD_LOCK, _ANY_VERSION) as table, \
                advisory_lock(INDEX_BUILD_LOCK, version_id) as this_version:
            if table and this_version:
                with connection.cursor() as cursor:
                    yield cursor
                return
        if not wait:
            yield None
            return
        time.sleep(INDEX_LOCK_POLL)


def embedding_index_building(*, version: EmbeddingModel) -> bool:
    """Whether some process is building (or dropping) the version's index right now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s "
            "AND objid = %s AND objsubid = 2 AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()))", [INDEX_BUILD_LOCK, int(version.pk)])
        return bool(cursor.fetchone()[0])


def embedding_index_drop(*, version: EmbeddingModel, wait: bool = True) -> bool:
    """Drop the version's HNSW index (to rebuild it after a bulk load, or with the version);
    False, with nothing done, if `wait` is False and an index is being built or dropped."""
    _INDEXED.discard(version.pk)
    with _index_work(version.pk, wait=wait) as cursor:
        if cursor is None:
            return False
        # Outside a transaction without the table lock a plain DROP INDEX takes (and queues
        # every search and write behind it while it waits for running ones).
        vector_index.drop(cursor, version_id=version.pk, concurrently=not connection.in_atomic_block)
    return True


def embedding_index_exists(*, version: EmbeddingModel) -> bool:
    with connection.cursor() as cursor:
        return vector_index.exists(cursor, version_id=version.pk)


def embedding_index_ready(*, version: EmbeddingModel) -> bool:
    """Whether searches of this version can walk its HNSW index (remembered once seen for the active one)."""
    if version.pk in _INDEXED:
        return True
    found = embedding_index_exists(version=version)
    if found and version.is_active:
        _INDEXED.add(version.pk)
    return found


def register_vector_types() -> None:
    """Let this connection send numpy vectors in pgvector's binary format (once per connection)."""
    raw = connection.connection
    if not getattr(raw, "_simili_vectors", False):
        from pgvector.psycopg import register_vector

        register_vector(raw)
        raw._simili_vectors = True  # type: ignore[union-attr]


@contextmanager
def binary_cursor() -> Iterator[psycopg.Cursor[Any]]:
    """A server-side-binding cursor on Django's connection (same transaction): Django's own
    cursors bind on the client side, which cannot send or receive pgvector's binary format.

    Its errors come out as django.db's (OperationalError, IntegrityError, ...), as a Django
    cursor's do: the tasks retry those, and Django closes a connection that raised one.
    """
    with connection.wrap_database_errors:
        connection.ensure_connection()
        register_vector_types()
        with psycopg.Cursor(connection.connection) as cursor:
            yield cursor


def embeddings_store(*, version: EmbeddingModel, rows: Sequence[VectorRow]) -> int:
    """Insert or replace the vectors of a batch of images for one version; return the row count.

    Binary parameters through one pipelined statement: formatting 2 x 1280 floats as text
    cost more than the insert itself (bench/search.py loads a million rows this way).
    """
    if not rows:
        return 0
    from pgvector import HalfVector

    dim = int(version.dimensions)
    params = []
    for row in rows:
        if row.vector.shape != (dim,) or row.augmented.shape != (dim,):
            raise ValueError(f"expected vectors of {dim} dimensions for {version.key}, got {row.vector.shape}")
        params.append((row.image_id, version.pk, row.collection_id, np.asarray(row.vector, dtype=np.float32),
                       HalfVector(np.asarray(row.augmented, dtype=np.float32))))
    with binary_cursor() as cursor:
        cursor.executemany(
            """INSERT INTO simili_embedding (image_id, model_version_id, collection_id, vector, augmented, created_at)
               VALUES (%s, %s, %s, %b, %b, now())
               ON CONFLICT (image_id, model_version_id) DO UPDATE
               SET collection_id = EXCLUDED.collection_id, vector = EXCLUDED.vector, augmented = EXCLUDED.augmented,
                   augment_floor = NULL""",
            params,
        )
    return len(params)


def embedding_model_coverage(*, version: EmbeddingModel) -> tuple[int, int]:
    """Return (ready images with a vector of this version, ready images)."""
    ready = Image.objects.filter(status=ImageStatus.READY)
    return ready.filter(embeddings__model_version=version).count(), ready.count()


def embedding_model_activate(*, version: EmbeddingModel) -> None:
    """Make `version` the one searches use, at once for every query, once it covers every image.

    Its index is built first, so the switch never lands on a version without one. Raises
    ValueError while some ready image has no vector of this version, or while another process
    builds its index (minutes at a million rows: not a wait for an admin's request).
    """
    from webapp.models import Collection
    from webapp.services import schedule_augment

    covered, total = embedding_model_coverage(version=version)
    if covered < total:
        raise ValueError(f"version {version.key} covers {covered} of {total} ready images; re-index first")
    if not embedding_index_build(version=version, wait=False):
        raise ValueError(f"the index of version {version.key} is being built; activate it once that is done")
    with transaction.atomic():
        EmbeddingModel.objects.filter(is_active=True).exclude(pk=version.pk).update(is_active=False)
        EmbeddingModel.objects.filter(pk=version.pk).update(is_active=True)
    version.is_active = True
    for collection_id in Collection.objects.values_list("pk", flat=True):
        schedule_augment(collection_id, full=True)  # its floors (if any) date from when it was last active
    from webapp import videos

    videos.videos_refresh_for_version(version=version)


#: Rows deleted per statement when a version is dropped, so no transaction holds a million locks.
DROP_BATCH = 10000


def embedding_model_drop(*, version: EmbeddingModel) -> int:
    """Delete an inactive version: its index, its vectors and its row; return the vectors removed.

    Raises ValueError for the active version (searches use it).
    """
    version.refresh_from_db()
    if version.is_active:
        raise ValueError(f"{version.key} is the active version; activate another one before dropping it")
    if not embedding_index_drop(version=version, wait=False):
        raise ValueError(f"an index is being built; drop {version.key} once that is done")
    removed = 0
    while True:
        ids = list(Embedding.objects.filter(model_version=version).values_list("pk", flat=True)[:DROP_BATCH])
        if not ids:
            break
        removed += Embedding.objects.filter(pk__in=ids).delete()[0]
    from webapp import videos

    videos.videos_drop_version(version=version)
    version.delete()
    logger.info("dropped model version %s (%s vectors)", version.key, removed)
    return removed


def _reindex_in_flight(version_id: int) -> list[int]:
    from django.core.cache import cache

    try:
        return list(cache.get(f"reindex-in-flight:{version_id}") or [])
    except Exception:  # noqa: BLE001 - Redis down: re-index on, without telling a dead batch apart
        logger.warning("could not read the re-index's batch in flight", exc_info=True)
        return []


def _reindex_in_flight_set(version_id: int, image_ids: Sequence[int]) -> None:
    from django.core.cache import cache

    key = f"reindex-in-flight:{version_id}"
    try:
        if image_ids:
            cache.set(key, [int(i) for i in image_ids], timeout=7 * 24 * 3600)
        else:
            cache.delete(key)
    except Exception:  # noqa: BLE001 - as above: the record only helps isolate a killing image
        logger.warning("could not record the re-index's batch in flight", exc_info=True)


def _reindex_state(version: EmbeddingModel, state: str) -> None:
    from django.utils import timezone

    EmbeddingModel.objects.filter(pk=version.pk).update(reindex_state=state[:500], reindex_updated_at=timezone.now())


def embedding_model_reindex_start(*, version: EmbeddingModel) -> None:
    """Queue the background re-index of a version on the bulk lane (the admin's button)."""
    from webapp.services import BULK_QUEUE
    from webapp.tasks import reindex_version

    _reindex_state(version, "queued")
    transaction.on_commit(lambda: reindex_version.apply_async(args=[version.pk, []], queue=BULK_QUEUE))


#: Images embedded per round of a background re-index: one batch through the CNN.
REINDEX_BATCH = 32


def embedding_model_reindex_step(*, version_id: int, skip: Sequence[int] = ()) -> list[int] | None:
    """Re-index for up to EMBED_TIME_BUDGET seconds; return the ids to skip next time, or None when done.

    The worker embeds with its configured recipe, so it refuses a version that is not that
    recipe, and says so on the version's row.
    """
    from webapp import pipeline

    version = EmbeddingModel.objects.filter(pk=version_id).first()
    if version is None:
        return None
    key = pipeline.recipe().key
    if key != version.key:
        _reindex_state(version, f"failed: the bulk workers embed as {key}; configure EMBEDDING_* for this "
                                "version's recipe and restart them, then start again")
        return None
    from webapp.services import advisory_lock

    # One step of a version at a time: two chains (a re-index started twice, a redelivery beside
    # its continuation) would each take the other's batch in flight for one whose worker died.
    with advisory_lock(REINDEX_LOCK, version.pk) as held:
        if not held:
            raise ReindexBusy(f"another re-index step of {version.key} is running")
        try:
            return _reindex_steps(version, skip)
        except (OperationalError, InterfaceError):
            raise  # the task retries these; the state stays "running"
        except Exception as exc:
            # Not retried: without this the state said "running" for ever, with nothing running.
            _reindex_state(version, f"failed: {type(exc).__name__}: {exc}; see the workers' log, then start it again")
            raise


#: First key of the advisory lock a version's re-index step holds (the second is the version's id);
#: services.AUGMENT_LOCK is 5_140_002.
REINDEX_LOCK = 5_140_003


class ReindexBusy(Exception):
    """Another step of the same version's re-index is running: come back later."""


def _reindex_steps(version: EmbeddingModel, skip: Sequence[int]) -> list[int] | None:
    from webapp import ingest

    _reindex_state(version, "running")
    tried = set(skip)  # an image that fails to decode is tried once, then left out
    # A batch whose worker died (killed, out of memory) is still recorded as in flight, and its
    # task comes back (acks_late). The same batch again would kill the next worker the same way,
    # for ever: its images go one at a time instead, and one that was alone when its worker died
    # is left out like an image that fails to decode.
    died_on = _reindex_in_flight(version.pk)
    suspects = [] if len(died_on) == 1 else died_on
    if len(died_on) == 1:
        logger.error("re-index of %s leaves out image %s: its worker died embedding it", version.key, died_on[0])
        tried.update(died_on)
    started = time.monotonic()
    while time.monotonic() - started < settings.EMBED_TIME_BUDGET:
        only = [suspects.pop(0)] if suspects else None
        try:
            batch = ingest.reindex_batch(version_key=version.key, limit=REINDEX_BATCH, skip=tried, only=only,
                                         on_rows=functools.partial(_reindex_in_flight_set, version.pk))
        except Exception:  # an error the task may retry (a database blip): no image to blame
            _reindex_in_flight_set(version.pk, [])
            raise
        _reindex_in_flight_set(version.pk, [])
        if only is not None:
            tried.update(batch)
            continue
        if not batch:
            embedding_index_build(version=version)
            covered, total = embedding_model_coverage(version=version)
            left_out = f"; {total - covered} could not be embedded (see the workers' log)" if covered < total else ""
            _reindex_state(version, f"done: {covered} of {total} ready images have a vector{left_out}")
            return None
        tried.update(batch)
    covered = Embedding.objects.filter(model_version=version, image_id__in=tried).values_list("image_id", flat=True)
    return sorted(tried.difference(covered))
