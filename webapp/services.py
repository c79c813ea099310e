"""Writes: every change to Simili's data goes through one of these functions."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from retrieval import imaging
from retrieval.errors import ImageRejected, UploadRejected
from retrieval.reranking import expand_queries, expand_query
from webapp import storage, videos
from webapp.models import ApiToken, Collection, Embedding, EmbeddingModel, Image, ImageStatus, Lane

logger = logging.getLogger(__name__)

INTERACTIVE_QUEUE = "interactive"
BULK_QUEUE = "bulk"


class UploadTooLarge(ImageRejected):
    code = "file_too_large"


#: HTTP status for each rejection code, so every interface answers a bad upload the same way.
REJECTION_STATUS = {
    "file_too_large": 413,
    "image_too_large": 413,
    "unsupported_format": 415,
    "empty_file": 400,
    "corrupt_image": 400,
    "invalid_image": 400,
    "video_too_long": 413,
    "video_too_large": 413,
    "unsupported_codec": 415,
    "no_video_stream": 415,
    "not_animated": 415,
    "corrupt_video": 400,
}


def rejection_status(exc: UploadRejected) -> int:
    """Return the HTTP status that answers a rejected upload (an image or a video)."""
    return REJECTION_STATUS.get(exc.code, 400)


def upload_check_size(*, size: int) -> None:
    """Raise `UploadTooLarge` before reading a file that is over the byte limit."""
    if size > settings.MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"The file is {size:,} bytes; at most {settings.MAX_UPLOAD_BYTES:,} bytes are accepted.")


def upload_read(upload: object, *, size: int) -> bytes:
    """Read an uploaded file after checking its size against the limit for what it starts as.

    Video containers (MP4, MOV, WebM) have their own, larger limit. Animated GIF and WebP keep
    the photos' limit: the upload's validation decodes every frame of them (a few megabytes of
    GIF can hold thousands of full frames), so they must stay small.
    """
    from retrieval import video as rv

    head = upload.read(64)  # type: ignore[attr-defined]
    upload.seek(0)  # type: ignore[attr-defined]
    if rv.sniff_format(head) in videos.VIDEO_CONTAINERS:
        if size > settings.MAX_VIDEO_BYTES:
            raise UploadTooLarge(f"The file is {size:,} bytes; at most {settings.MAX_VIDEO_BYTES:,} bytes "
                                 "are accepted for a video.")
    else:
        upload_check_size(size=size)
    return bytes(upload.read())  # type: ignore[attr-defined]


class SearchUnavailable(Exception):
    """No worker answered a search-by-image request in time."""


@dataclass(frozen=True)
class IngestResult:
    image: Image
    created: bool


def collection_create(
    *, owner: AbstractBaseUser, name: str, description: str = "", visibility: str = "private"
) -> Collection:
    """Create a collection owned by `owner`."""
    return Collection.objects.create(
        owner=owner, name=name.strip(), description=description.strip(), visibility=visibility
    )


def collection_update(*, collection: Collection, **fields: str) -> Collection:
    """Change a collection's name, description, visibility or embed origins."""
    allowed = {"name", "description", "visibility", "embed_origins"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"expected fields among {sorted(allowed)}, got {sorted(unknown)}")
    for name, value in fields.items():
        setattr(collection, name, value.strip() if isinstance(value, str) else value)
    collection.save()
    return collection


def collection_delete(*, collection: Collection) -> None:
    """Delete a collection with its images, videos and vectors; once that commits, every file no
    other row uses."""
    paths = [path for pair in collection.images.values_list("file_path", "thumbnail_path") for path in pair]
    for video in collection.videos.all():
        videos.video_delete(video=video)
    collection.delete()
    delete_unreferenced_on_commit(paths)


def api_token_create(*, user: AbstractBaseUser, name: str) -> tuple[ApiToken, str]:
    """Create an API token; return the row and the token, which is never shown again."""
    token = "sim_" + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(
        user=user,
        name=name.strip() or "API token",
        prefix=token[:10],
        digest=hashlib.sha256(token.encode()).hexdigest(),
    )
    return row, token


def api_token_revoke(*, token: ApiToken) -> None:
    """Revoke a token: requests that present it are refused from now on."""
    if token.revoked_at is None:
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
        token.revoked_at = timezone.now()


def api_token_touch(*, token: ApiToken) -> None:
    """Record that a token was used (at most once a minute, to spare writes)."""
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)


def _enqueue_embed(image_id: int, *, queue: str) -> None:
    from webapp.tasks import embed_image

    # Stamped before the message exists, never after: an UPDATE right after publishing held the
    # row's lock just as an idle worker claimed it, the claim skipped the locked row, and the
    # message was spent on nothing (bench/ingest.py's single uploads, 2.4-5 s late or lost).
    # If the broker is down this raises; on_commit(robust=True) logs it, the row stays pending
    # with enqueued_at NULL again, and the reconciler queues it once the broker is back.
    Image.objects.filter(pk=image_id).update(enqueued_at=timezone.now())
    try:
        embed_image.apply_async(args=[image_id], queue=queue)
    except BaseException:
        Image.objects.filter(pk=image_id).update(enqueued_at=None)
        raise


def _enqueue_on_commit(image_id: int, *, queue: str) -> None:
    def enqueue() -> None:
        _enqueue_embed(image_id, queue=queue)

    # robust: a broker outage is logged, never turned into a failed upload.
    transaction.on_commit(enqueue, robust=True)


def images_requeue_stale() -> int:
    """Queue again what PostgreSQL says still needs embedding; return how many were queued.

    That is: pending images never handed to the broker or waiting longer than
    RECONCILE_PENDING_AFTER, and images "processing" for longer than RECONCILE_PROCESSING_AFTER
    (their worker died). An image that has used up EMBED_MAX_ATTEMPTS is marked failed instead.
    """
    from datetime import timedelta

    from django.db.models import Q

    now = timezone.now()
    pending_before = now - timedelta(seconds=settings.RECONCILE_PENDING_AFTER)
    processing_before = now - timedelta(seconds=settings.RECONCILE_PROCESSING_AFTER)
    stale = Image.objects.filter(
        Q(status=ImageStatus.PENDING, enqueued_at__isnull=True)
        | Q(status=ImageStatus.PENDING, enqueued_at__lt=pending_before)
        | Q(status=ImageStatus.PROCESSING, updated_at__lt=processing_before)
    )
    stale.filter(attempts__gte=settings.EMBED_MAX_ATTEMPTS).update(
        status=ImageStatus.FAILED, processed_at=now,
        error=f"Gave up after {settings.EMBED_MAX_ATTEMPTS} attempts: the worker died each time "
        "(the image may be too large for its memory).",
    )
    retry = _stale_ids(stale.filter(attempts__lt=settings.EMBED_MAX_ATTEMPTS))
    if not retry:
        return 0
    # Pending again, stamped and on the bulk lane: batch tasks claim any pending bulk image, so
    # one task per batch, and an upload whose interactive message was lost is picked up too.
    # The UPDATE repeats the conditions: a row a worker claimed or finished since the read above
    # is left alone (by id alone, a ready image went back to pending, hidden from searches, and
    # was embedded again).
    queued = stale.filter(pk__in=retry, attempts__lt=settings.EMBED_MAX_ATTEMPTS).update(
        status=ImageStatus.PENDING, enqueued_at=now, lane=Lane.BULK)
    if not queued:
        return 0
    try:
        enqueue_bulk_batches(count=queued)
    except Exception as exc:  # noqa: BLE001 - the broker is still down; try on the next round
        logger.warning("reconciler could not queue %s stale image(s): %s", queued, exc)
        Image.objects.filter(pk__in=retry, status=ImageStatus.PENDING, enqueued_at=now).update(enqueued_at=None)
        return 0
    logger.info("reconciler queued %s stale image(s) again", queued)
    return queued


def _stale_ids(stale: QuerySet[Image]) -> list[int]:
    return list(stale.values_list("pk", flat=True)[:10_000])


#: Stored files checked against the database per transaction by the media sweeper and by
#: deletions, each holding its file's lock (`files_lock`) in PostgreSQL's bounded lock table.
GC_BATCH = 200


def media_collect_garbage(*, older_than_seconds: float = 3600) -> int:
    """Delete stored files that no row references (left by a crash between write and insert)."""
    import time
    from pathlib import Path


    root = Path(settings.MEDIA_ROOT)
    cutoff = time.time() - older_than_seconds
    candidates: list[tuple[Path, str]] = []  # (file, the stored path that keeps it alive, or "")
    for kind in ("originals", "thumbnails", "thumbnails-small", "queries", "videos", "frames", "strips"):
        for path in (root / kind).rglob("*") if (root / kind).exists() else []:
            if not path.is_file() or path.stat().st_mtime > cutoff:
                continue
            relative = str(path.relative_to(root))
            if kind == "thumbnails-small":
                relative = "thumbnails/" + relative.split("/", 1)[1]  # kept while its thumbnail is
            candidates.append((path, "" if kind == "queries" else relative))
    removed = 0
    for start in range(0, len(candidates), GC_BATCH):
        batch = candidates[start:start + GC_BATCH]
        in_use = paths_in_use([key for _, key in batch if key])  # most are: no lock for those
        unused = [(path, key) for path, key in batch if not key or key not in in_use]
        with transaction.atomic():
            # Checked again under the files' locks, as a deletion does: an upload may be adding a row.
            files_lock(key for _, key in unused)
            referenced = paths_in_use([key for _, key in unused if key])
            for path, key in unused:
                if key and key in referenced:
                    continue
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info("removed %s unreferenced media file(s)", removed)
    return removed


@dataclass(frozen=True)
class PreparedImage:
    """An image validated and its original stored: what an ingest needs before the database.

    Not the bytes: a bulk import holds a batch of these before writing their rows.
    """

    byte_size: int
    info: imaging.ImageInfo
    sha256: str
    file_path: str
    #: The file the bytes were read from (a bulk import's), to store them again should a
    #: deletion remove the shared original before this image's row commits.
    source: Path | None = None

    def read_again(self) -> bytes:
        """The original's bytes once more, from `source`; ImageRejected if they cannot be had."""
        try:
            data = self.source.read_bytes() if self.source is not None else b""
        except OSError:
            data = b""
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ImageRejected("The stored file was removed while the image was added, and its source "
                                "is gone or has changed; add it again.")
        return data


def image_prepare(data: bytes, *, decode: bool = True, source: Path | None = None) -> PreparedImage:
    """Validate image bytes and store the original file; no database access, so thread-safe.

    Raises `ImageRejected` (nothing stored) when the bytes are not an acceptable image. The
    file is content-addressed: storing content that is already there only touches it.
    `decode=False` is for bulk imports (`imaging.inspect_image`).
    """
    upload_check_size(size=len(data))
    info = imaging.inspect_image(data, max_pixels=settings.MAX_IMAGE_PIXELS, decode=decode)
    sha256 = hashlib.sha256(data).hexdigest()
    relative = storage.content_path("originals", sha256, info.extension)
    storage.write_or_keep(relative, data)
    return PreparedImage(byte_size=len(data), info=info, sha256=sha256, file_path=relative, source=source)


def image_ingest(
    *,
    collection: Collection,
    uploaded_by: AbstractBaseUser | AnonymousUser | None,
    data: bytes = b"",
    name: str = "",
    queue: str | None = INTERACTIVE_QUEUE,
    prepared: PreparedImage | None = None,
) -> IngestResult:
    """Validate and store an uploaded image, then queue its embedding once committed.

    Raises `ImageRejected` (nothing stored) when the bytes are not an acceptable image.
    The same content uploaded twice into one collection returns the existing image. With
    `queue=None` nothing is queued: a bulk import queues batch tasks for its rows itself, and
    passes what `image_prepare` made of the bytes (in its threads) instead of the bytes.
    """
    prepared = prepared or image_prepare(data)
    sha256, relative = prepared.sha256, prepared.file_path
    existing = Image.objects.filter(collection=collection, sha256=sha256).first()
    if existing is not None:
        return IngestResult(existing, created=False)
    try:
        with transaction.atomic():
            image = _new_image(collection, uploaded_by, name, prepared, interactive=queue == INTERACTIVE_QUEUE)
            image.save(force_insert=True)
            files_keep({relative: (lambda: data) if data else prepared.read_again})
            if queue is not None:
                _enqueue_on_commit(image.pk, queue=queue)
    except IntegrityError:
        # A concurrent upload of the same content won the race; theirs is the image.
        return IngestResult(Image.objects.get(collection=collection, sha256=sha256), created=False)
    except BaseException:
        delete_unreferenced(relative)
        raise
    return IngestResult(image, created=True)


def images_ingest_prepared(
    *, items: Sequence[tuple[Collection, str, PreparedImage]], uploaded_by: AbstractBaseUser | None
) -> list[IngestResult]:
    """Write the rows of prepared images (collection, name, prepared) in one transaction; queue nothing.

    What `image_ingest` would give for each in turn, in two statements instead of a lookup, an
    insert and a commit per image: content already in its collection, or earlier in `items`,
    returns that image. If a concurrent upload wins a race for one of them, every item goes
    through `image_ingest` instead, which resolves it row by row.
    """
    wanted = {(collection.pk, prepared.sha256) for collection, _, prepared in items}
    found = Image.objects.filter(collection_id__in={pk for pk, _ in wanted}, sha256__in={sha for _, sha in wanted})
    known = {(image.collection_id, image.sha256): image for image in found
             if (image.collection_id, image.sha256) in wanted}
    results, new, new_prepared = [], [], []
    for collection, name, prepared in items:
        pair = (collection.pk, prepared.sha256)
        if pair in known:
            results.append(IngestResult(known[pair], created=False))
            continue
        image = _new_image(collection, uploaded_by, name, prepared, interactive=False)
        known[pair] = image
        new.append(image)
        new_prepared.append((image, prepared))
        results.append(IngestResult(image, created=True))
    try:
        with transaction.atomic():
            Image.objects.bulk_create(new)
            files_keep({image.file_path: prepared.read_again for image, prepared in new_prepared})
    except IntegrityError:
        return [image_ingest(collection=collection, uploaded_by=uploaded_by, name=name, queue=None,
                             prepared=prepared) for collection, name, prepared in items]
    except BaseException:
        delete_unreferenced_many([image.file_path for image in new])  # as image_ingest does for one
        raise
    return results


def _new_image(collection: Collection, uploaded_by: AbstractBaseUser | AnonymousUser | None, name: str,
               prepared: PreparedImage, *, interactive: bool) -> Image:
    """The unsaved row of a prepared image, on the interactive lane or the bulk one."""
    user = uploaded_by if uploaded_by is not None and uploaded_by.is_authenticated else None
    return Image(collection=collection, uploaded_by=user, sha256=prepared.sha256, file_path=prepared.file_path,
                 original_name=_display_name(name), mime_type=prepared.info.mime, width=prepared.info.width,
                 height=prepared.info.height, byte_size=prepared.byte_size,
                 lane=Lane.INTERACTIVE if interactive else Lane.BULK)


def _display_name(name: str) -> str:
    """Keep a client's file name for display only: last path component, printable, bounded."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:255]


def delete_unreferenced(relative: str) -> None:
    """Delete a stored file (and a thumbnail's small copy) unless an image or video row still uses it."""
    delete_unreferenced_many([relative])


def paths_in_use(paths: Sequence[str]) -> set[str]:
    """Return which of these stored paths an image or a video (poster, strip, frame) still uses."""
    from django.db.models import Q

    wanted = [relative for relative in paths if relative]
    if not wanted:
        return set()
    rows = Image.objects.filter(Q(file_path__in=wanted) | Q(thumbnail_path__in=wanted))
    used = {path for pair in rows.values_list("file_path", "thumbnail_path") for path in pair}
    return (used | videos.paths_referenced(wanted)) & set(wanted)


def delete_unreferenced_many(paths: Sequence[str]) -> None:
    """Delete the stored files no image or video row still uses: a few queries for any number.

    Under the files' locks (`files_lock`): an upload of the same content that commits its row
    meanwhile is either seen here, or finds its file gone and stores it again.
    """
    wanted = sorted({relative for relative in paths if relative})
    for start in range(0, len(wanted), GC_BATCH):  # PostgreSQL's lock table is bounded
        batch = wanted[start:start + GC_BATCH]
        with transaction.atomic():
            files_lock(batch)
            used = paths_in_use(batch)
            for relative in batch:
                if relative in used:
                    continue
                storage.delete(relative)
                if relative.startswith("thumbnails/"):
                    storage.delete("thumbnails-small/" + relative.split("/", 1)[1])


def files_lock(paths: Iterable[str]) -> None:
    """Hold these stored files' locks until the current transaction ends.

    Files are shared by content: an upload stores (or reuses) its original before its row
    commits, and a deletion removes a file once no committed row uses it. Both take these
    locks between their check and their commit, so neither can act on what the other has not
    committed yet. One call takes its locks in one order, so two calls never wait on each other;
    a transaction should make one call (two, in different orders, could deadlock).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("files_lock needs a transaction: the locks last until it ends")
    keys = sorted({int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big", signed=True)
                   for path in paths if path})
    if keys:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(key) FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(key, n) "
                           "ORDER BY n", [keys])


def files_keep(files: Mapping[str, Callable[[], bytes]]) -> None:
    """In the transaction that commits rows using these stored files: store again any a deletion removed.

    Each value gives the file's bytes, called only for a missing file (a deletion of another
    row with the same content unlinked it after this row's file was stored, before it commits).
    """
    files_lock(files)
    for relative, read in files.items():
        if relative and not storage.media_path(relative).is_file():
            logger.warning("stored file %s was removed while a row was added for it; storing it again", relative)
            storage.write_atomic(relative, read())


def delete_unreferenced_on_commit(paths: Sequence[str]) -> None:
    """Once the current transaction commits, delete those of `paths` that no row uses then.

    A rolled-back deletion (the admin's delete page runs in a transaction) keeps its rows and
    files together; outside a transaction the files go at once.
    """
    wanted = list(paths)
    transaction.on_commit(lambda: delete_unreferenced_many(wanted), robust=True)


def image_delete(*, image: Image) -> None:
    """Delete an image with its embeddings; its files once that commits, unless a row shares them."""
    paths = [image.file_path, image.thumbnail_path]
    collection_id = image.collection_id
    image.delete()
    delete_unreferenced_on_commit(paths)
    # Once the row is gone for every reader: a refresh that read it would average it in again.
    transaction.on_commit(lambda: schedule_augment(collection_id, full=True), robust=True)


def image_mark_failed(*, image_id: int, error: str) -> None:
    """Record that embedding an image failed, with the reason a person can act on."""
    Image.objects.filter(pk=image_id).update(
        status=ImageStatus.FAILED, error=error[:2000], processed_at=timezone.now()
    )


def image_reembed(*, image_ids: list[int]) -> int:
    """Mark images pending and queue batch tasks on the bulk lane for them; return how many.

    One batch task per EMBED_BATCH_SIZE images (32 when automatic; at most MAX_BATCH_TASKS, each claiming batches
    until none is pending), as an import queues them, not one task per image: a collection's
    worth of re-embedding is then a few messages, embedded in full batches. The rows are
    stamped queued with the change; should the broker be down at the commit, they are
    unstamped and the reconciler queues them once it is back. A row that kills its worker is
    then claimed alone (`ingest.images_claim`), so it fails by itself.
    """
    ids = list(Image.objects.filter(pk__in=image_ids).values_list("pk", flat=True))
    if not ids:
        return 0

    def enqueue() -> None:
        try:
            enqueue_bulk_batches(count=len(ids))
        except BaseException:
            Image.objects.filter(pk__in=ids, status=ImageStatus.PENDING).update(enqueued_at=None)
            raise

    with transaction.atomic():
        Image.objects.filter(pk__in=ids).update(status=ImageStatus.PENDING, error="", attempts=0, lane=Lane.BULK,
                                                enqueued_at=timezone.now())
        # A vector row exists only while its image is searchable: the similarity query then
        # reads one table and skips nothing (docs/search.md).
        collections = set(Image.objects.filter(pk__in=ids).values_list("collection_id", flat=True))
        Embedding.objects.filter(image_id__in=ids).delete()
        transaction.on_commit(enqueue, robust=True)
        for collection_id in collections:  # their old vectors are still in their neighbours' averages
            transaction.on_commit(lambda cid=collection_id: augment_full_request(cid), robust=True)
    return len(ids)


def _collection_neighbours(*, vector: np.ndarray, version: EmbeddingModel, collection_id: int, exclude: int, n: int):
    """Return the raw vectors of the `n` images nearest to `vector` in one collection, best first."""
    dim = int(version.dimensions)
    literal = "[" + ",".join(repr(float(x)) for x in vector) + "]"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT vector::text FROM simili_embedding
                WHERE model_version_id = %s AND collection_id = %s AND image_id <> %s
                ORDER BY vector::vector({dim}) <=> %s::vector({dim}) LIMIT %s""",
            [version.pk, collection_id, exclude, literal, n],
        )
        rows = [np.array(row[0].strip("[]").split(","), dtype=np.float32) for row in cursor.fetchall()]
    return np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)


def augment_one(*, vector: np.ndarray, version: EmbeddingModel, collection_id: int, image_id: int) -> np.ndarray:
    if settings.SIMILAR_DBA == 0:
        return vector
    neighbours = _collection_neighbours(
        vector=vector, version=version, collection_id=collection_id, exclude=image_id, n=settings.SIMILAR_DBA
    )
    return expand_query(vector, neighbours, n=settings.SIMILAR_DBA, alpha=settings.SIMILAR_ALPHA)


#: Rows whose similarities are computed at once when refreshing a collection, and the bytes
#: their scores and neighbour selection may hold (fewer rows for a large collection).
AUGMENT_CHUNK = 1024
AUGMENT_BYTES = 400_000_000


def collection_augment(*, collection_id: int, full: bool = True) -> int:
    """Refresh a collection's augmented vectors (active version); return how many changed.

    Each image's vector is averaged with its SIMILAR_DBA nearest neighbours in the same
    collection, never across collections, so a public image's vector never carries a private one.
    The same pass records the collection's near-duplicate pairs (webapp.duplicates).

    `full` recomputes every row. Otherwise only rows never refreshed (new or re-embedded: no
    `augment_floor`) are compared with the collection, and of the others only those that a new
    row comes closer to than their farthest neighbour: the same result as a full refresh when
    rows were only added, for a cost that grows with the new rows, not the collection's square.
    Vectors are read and written in binary, neighbours selected with `argpartition`, and only
    changed rows written (bench/augment.py, docs/benchmarks.md#augment).
    """
    from webapp import duplicates
    from webapp.embeddings import binary_cursor

    version = EmbeddingModel.objects.filter(is_active=True).first()
    if version is None:
        return 0
    with binary_cursor() as cursor:
        cursor.execute(
            """SELECT id, image_id, vector, augmented, augment_floor FROM simili_embedding
               WHERE model_version_id = %s AND collection_id = %s ORDER BY image_id""",
            [version.pk, collection_id], binary=True,
        )
        rows = cursor.fetchall()
    if not rows:
        duplicates.duplicates_record(collection_id=collection_id, pairs=[])
        return 0
    ids = [int(row[0]) for row in rows]
    image_ids = [int(row[1]) for row in rows]
    vectors = np.stack([videos.as_array(row[2]) for row in rows])
    stored = np.stack([videos.as_array(row[3]) for row in rows])
    floors = np.array([np.nan if row[4] is None else row[4] for row in rows], dtype=np.float64)
    del rows
    fresh = np.flatnonzero(np.isnan(floors))
    if not full and len(fresh) == 0:
        return 0
    full = full or len(fresh) == len(ids)
    n = min(settings.SIMILAR_DBA, len(ids) - 1)
    augmented, new_floors = stored.copy(), floors.copy()
    pairs: list[tuple[int, int, float]] = []

    def refresh(indices: np.ndarray, *, find_pairs: bool) -> np.ndarray:
        """Recompute `indices`' rows; return, per collection row, its best similarity to any of them."""
        closest = np.full(len(ids), -np.inf, dtype=np.float32)
        chunk = max(16, min(AUGMENT_CHUNK, AUGMENT_BYTES // (12 * len(ids))))  # scores + argpartition's indices
        for start in range(0, len(indices), chunk):
            rows = indices[start:start + chunk]
            scores = vectors[rows] @ vectors.T
            scores[np.arange(len(rows)), rows] = -np.inf  # not itself
            np.maximum(closest, scores.max(axis=0), out=closest)
            if find_pairs:
                pairs.extend(duplicates.pairs_in(scores, image_ids, rows=rows.tolist()))
            if n > 0:
                # The n best of each row, in no particular order: the average does not depend on it.
                ranking = np.argpartition(scores, -n, axis=1)[:, -n:]
                augmented[rows] = expand_queries(vectors[rows], vectors, ranking, n=n, alpha=settings.SIMILAR_ALPHA)
                worst = np.take_along_axis(scores, ranking, axis=1).min(axis=1)
            else:
                augmented[rows] = vectors[rows]
                worst = np.full(len(rows), np.inf)
            # With every other row a neighbour, any new row joins them: no floor keeps it out.
            new_floors[rows] = worst if n == settings.SIMILAR_DBA else -np.inf
        return closest

    if full:
        refresh(np.arange(len(ids)), find_pairs=True)
        duplicates.duplicates_record(collection_id=collection_id, pairs=pairs)
        touched = np.arange(len(ids))
    else:
        closest = refresh(fresh, find_pairs=True)
        # >= with a margin: the floors came from other matrix products, equal within rounding.
        # Fresh rows have no floor (NaN), which no comparison selects.
        affected = np.flatnonzero(closest >= floors - 1e-5)
        refresh(affected, find_pairs=False)
        duplicates.duplicates_record(collection_id=collection_id, pairs=pairs,
                                     image_ids=[image_ids[i] for i in fresh])
        touched = np.concatenate([fresh, affected])
    # Stored in half precision: a difference below its resolution is no change (np.allclose's test).
    moved = ~np.all(np.abs(stored[touched] - augmented[touched]) <= 1e-3 + 1e-5 * np.abs(augmented[touched]), axis=1)
    changed = touched[moved]
    write = touched[moved | (floors[touched] != new_floors[touched])]  # NaN != x: fresh rows get their floor
    if len(write):
        from pgvector import HalfVector

        # One commit, pipelined statements. A row moved to another collection since it was read
        # keeps what the move gave it: this collection's neighbours are not its neighbours.
        with transaction.atomic(), binary_cursor() as cursor:
            # ... and a row re-embedded meanwhile (its floor reset) stays fresh for the next refresh.
            cursor.executemany(
                """UPDATE simili_embedding SET augmented = %b, augment_floor = %s
                   WHERE id = %s AND collection_id = %s AND model_version_id = %s
                     AND augment_floor IS NOT DISTINCT FROM %s""",
                [(HalfVector(augmented[i]), float(new_floors[i]), ids[i], collection_id, version.pk,
                  None if np.isnan(floors[i]) else float(floors[i])) for i in write],
            )
    logger.info("refreshed %s augmented vector(s) in collection %s (%s)", len(changed), collection_id,
                "full" if full else f"{len(fresh)} new, {len(touched) - len(fresh)} affected")
    return len(changed)


#: A refresh waits for a collection's uploads to pause for AUGMENT_DELAY, but at most this many
#: delays in all (5 minutes by default), so a steady trickle still gets its refresh.
AUGMENT_MAX_DELAYS = 30


def augment_key(collection_id: int) -> str:
    """The cache key that holds the time its pending refresh was first scheduled: one per collection."""
    return f"augment-pending:{collection_id}"


def augment_key_seconds() -> int:
    """How long the pending key outlives its refresh's longest wait, in case that task is lost."""
    return int(AUGMENT_MAX_DELAYS * float(settings.AUGMENT_DELAY)) + 120


def augment_wait(*, collection_id: int, waited: float) -> float:
    """Return the seconds a refresh should still wait for the collection's uploads to settle (0: now).

    A refresh reads the whole collection, so refreshing a collection that a bulk import is
    still filling every AUGMENT_DELAY seconds costs quadratic time over the import; one refresh
    after its last vector costs one pass (docs/benchmarks.md#augment).
    """
    delay = float(settings.AUGMENT_DELAY)
    if delay <= 0 or waited >= AUGMENT_MAX_DELAYS * delay:
        return 0.0
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT extract(epoch FROM clock_timestamp() - max(embedding.created_at))
               FROM simili_embedding AS embedding
               JOIN simili_embeddingmodel AS version ON version.id = embedding.model_version_id AND version.is_active
               WHERE embedding.collection_id = %s""",
            [collection_id],
        )
        (quiet,) = cursor.fetchone()
    if quiet is None or float(quiet) >= delay:
        return 0.0
    return min(delay - float(quiet), AUGMENT_MAX_DELAYS * delay - waited)


def augment_params() -> str:
    """What a refresh's result depends on besides the vectors: a change calls for a full one."""
    return f"{settings.SIMILAR_DBA}/{settings.SIMILAR_ALPHA}/{settings.NEAR_DUPLICATE_DISTANCE}"


#: A full refresh at least this often (seconds) whatever the cache says: the record of the last
#: one expires, and a missing record means full (a safety net for a flag lost with Redis).
AUGMENT_FULL_EVERY = 86_400


def augment_full_request(collection_id: int) -> None:
    """Ask for the collection's next refresh to recompute every row (an image left or moved)."""
    from django.core.cache import cache

    cache.set(f"augment-full:{collection_id}", time.time(), timeout=None)  # a token: see augment_full_done


def augment_full_due(collection_id: int) -> tuple[bool, object]:
    """Whether the next refresh must recompute every row, and the request it would answer.

    Full after a deletion or a move (a request), with other settings than the last full one,
    or when the cache has no record of one (a refresh that only adds rows assumes the rest are
    current).
    """
    from django.core.cache import cache

    request = cache.get(f"augment-full:{collection_id}")
    due = request is not None or cache.get(f"augment-params:{collection_id}") != augment_params()
    return due, request


def augment_full_done(collection_id: int, request: object) -> None:
    """Record a successful full refresh; drop the request it answered, unless a newer one came."""
    from django.core.cache import cache

    cache.set(f"augment-params:{collection_id}", augment_params(), timeout=AUGMENT_FULL_EVERY)
    key = f"augment-full:{collection_id}"
    if request is not None and cache.get(key) == request:
        cache.delete(key)


#: Advisory-lock class of a collection refresh: two refreshes of one collection overlapping would
#: write each other's stale results over rows the other had just refreshed.
AUGMENT_LOCK = 5_140_002


@contextlib.contextmanager
def augment_lock(collection_id: int) -> Iterator[bool]:
    """Hold the collection's refresh lock (session-level) while the block runs; yield False if taken."""
    with advisory_lock(AUGMENT_LOCK, collection_id) as held:
        yield held


@contextlib.contextmanager
def advisory_lock(kind: int, key: int) -> Iterator[bool]:
    """Try a session-level advisory lock, held while the block runs; yield False if another has it.

    Tried, never waited on: a session blocked on a lock holds a snapshot, which a concurrent
    index build waits for. A lock that cannot be released (the connection broke) goes with the
    connection, which is closed so a persistent one cannot carry it on.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [kind, int(key)])
        held = bool(cursor.fetchone()[0])
    try:
        yield held
    finally:
        if held:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [kind, int(key)])
                    released = bool(cursor.fetchone()[0])
            except DatabaseError:
                released = False
            if not released:
                connection.close()


def schedule_augment(collection_id: int, *, full: bool = False) -> None:
    """Refresh the collection's augmented vectors and near-duplicates once uploads settle.

    One refresh per burst of uploads, not one per image.
    """
    if settings.SIMILAR_DBA == 0 and settings.NEAR_DUPLICATE_DISTANCE <= 0:
        return
    from django.core.cache import cache

    from webapp.tasks import augment_collection

    key, first = augment_key(collection_id), time.time()
    try:
        if full:  # an image left: its neighbours' vectors still average it in
            augment_full_request(collection_id)
        if cache.add(key, first, timeout=augment_key_seconds()):  # else one is pending: it will see this upload
            try:
                augment_collection.apply_async(args=[collection_id, first], countdown=settings.AUGMENT_DELAY,
                                               queue=BULK_QUEUE)
            except Exception:
                cache.delete(key)  # none was queued: the next upload must be able to schedule one
                raise
    except Exception as exc:  # noqa: BLE001 - the next upload or the admin can refresh it
        logger.warning("could not schedule the refresh of collection %s: %s", collection_id, exc)


def image_embed(*, image_id: int) -> None:
    """Embed one image now (the interactive lane): claim it, decode, embed, store, mark ready."""
    from webapp import ingest

    jobs = ingest.images_claim(ids=[image_id])
    if not jobs:
        logger.info("image %s is not pending (gone, done, or claimed by another worker)", image_id)
        return
    ingest.embed_claimed(jobs, augment_each=True)


def images_embed_pending() -> int:
    """Embed pending images in batches (the bulk lane); see `webapp.ingest.embed_pending`."""
    from webapp import ingest

    return ingest.embed_pending()


def upload_queue(position: int) -> str | None:
    """Return where the `position`-th (from 0) image file of one upload request is queued.

    The first INTERACTIVE_FILES_PER_UPLOAD go to the interactive lane, each its own task; the
    rest are queued by no one here (None): the request queues batch tasks for them once it has
    stored them all (`upload_queue_rest`), as an import does.
    """
    return INTERACTIVE_QUEUE if position < settings.INTERACTIVE_FILES_PER_UPLOAD else None


def upload_queue_rest(*, count: int) -> None:
    """Queue batch tasks for an upload's images past the interactive ones (see `upload_queue`).

    A broker outage is logged, never turned into a failed upload: the rows are stored and
    pending, and the reconciler queues them once the broker is back.
    """
    if count <= 0:
        return
    try:
        enqueue_bulk_batches(count=count)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not queue %s uploaded image(s); the reconciler will: %s", count, exc)


def enqueue_bulk_batches(*, count: int) -> int:
    """Queue enough batch tasks for `count` pending images; return how many were queued."""
    from webapp.tasks import embed_pending

    # Sized by the CPU's automatic batch (ingest.CPU_BATCH; this process loads no CNN to ask): a
    # GPU worker's larger batches leave spare tasks, which find nothing pending and end.
    tasks = min(MAX_BATCH_TASKS, -(-count // (settings.EMBED_BATCH_SIZE or 32)))
    for _ in range(tasks):
        embed_pending.apply_async(queue=BULK_QUEUE)
    return tasks


def images_analyze() -> None:
    """Refresh the planner's statistics after a bulk load, not whenever autovacuum gets to it.

    With stale ones the planner misjudges the visibility join in the similarity query and
    computes every distance exactly (measured: 570 ms instead of 30 ms at 10,000 images).
    """
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE simili_image")
        # Skipped while an index is built concurrently (autovacuum analyzes it later): waiting
        # for the build's table lock would hold a snapshot the build waits for at its end.
        cursor.execute("ANALYZE (SKIP_LOCKED) simili_embedding")


#: Batch tasks queued at once: each keeps claiming batches until nothing is pending, so a few
#: are enough to keep every bulk worker busy.
MAX_BATCH_TASKS = 8


def query_embed(*, relative_path: str) -> dict[str, object]:
    """Embed a stored query image (worker side); return its vector and model version key."""
    from webapp import pipeline  # torch: workers only (the web app and import_folder never load it)

    recipe = pipeline.recipe()
    data = storage.media_path(relative_path).read_bytes()
    picture = imaging.load_image(data, min_side=recipe.min_input_side, max_pixels=settings.MAX_IMAGE_PIXELS)
    vector = recipe.embed([picture]).vectors[0]
    # Little-endian float32 in base64: exact, and a sixth of the size of a JSON list of floats.
    return {"model": recipe.key, "vector": base64.b64encode(vector.astype("<f4").tobytes()).decode()}


def search_vector_for_upload(*, data: bytes) -> tuple[str, list[float]]:
    """Embed an uploaded query image on the interactive queue and wait for the vector.

    Raises `ImageRejected` for bad bytes and `SearchUnavailable` when no worker answers in time.
    """
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError as BrokerError

    from webapp.tasks import embed_query

    upload_check_size(size=len(data))
    info = imaging.inspect_image(data, max_pixels=settings.MAX_IMAGE_PIXELS)
    relative = f"queries/{secrets.token_hex(16)}.{info.extension}"
    storage.write_atomic(relative, data)
    try:
        result = embed_query.apply_async(args=[relative], queue=INTERACTIVE_QUEUE)
        answer = result.get(timeout=settings.SEARCH_TIMEOUT)
    except (CeleryTimeout, BrokerError, OSError) as exc:
        raise SearchUnavailable(
            "No embedding worker answered in time; the search could not run. Try again shortly."
        ) from exc
    finally:
        storage.delete(relative)
    vector = np.frombuffer(base64.b64decode(answer["vector"]), dtype="<f4")
    return str(answer["model"]), [float(x) for x in vector]
