"""The batched embedding pipeline: claim pending images, decode in threads, embed in batches.

PostgreSQL is the queue of record: a batch is claimed with `FOR UPDATE SKIP LOCKED`, so any
number of bulk workers share the backlog without ever taking the same image twice, and a worker
that dies leaves its claimed rows in `processing` for the reconciler to hand back.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from PIL import Image as PILImage

from retrieval import imaging
from retrieval.errors import ImageRejected
from retrieval.preprocessing import resize_for
from webapp import pipeline, storage, tagging
from webapp.models import Image, ImageStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What a decode thread needs: plain data, no ORM object (threads hold no DB connection)."""

    image_id: int
    collection_id: int
    sha256: str
    file_path: str
    width: int = 0  # as stored, from validation; 0 when unknown
    height: int = 0


@dataclass
class Decoded:
    job: Job
    picture: PILImage.Image | None = None
    thumbnail: bytes | None = None
    error: str = ""


def images_claim(*, ids: Sequence[int] | None = None, limit: int = 1) -> list[Job]:
    """Mark pending images processing and return them; rows locked by others are skipped.

    By `ids` (an image's own task), whatever its lane, waiting for a row another transaction is
    writing: its task exists for that row, and skipping it would drop the message. Otherwise (a
    batch), bulk-lane images only, skipping rows other batches hold: up to `limit` never tried
    before, or else one that was. A tried row is pending again because its worker died (or the
    reconciler handed it over), so it goes alone: an image that kills its worker then costs
    only its own attempts, not those of the rows batched with it.
    """
    if ids is not None:
        return _claim("id = ANY(%s) AND status = 'pending'", [list(ids)], "FOR UPDATE", len(ids))
    fresh = _claim("status = 'pending' AND lane = 'bulk' AND attempts = 0", [], "FOR UPDATE SKIP LOCKED", limit)
    return fresh or _claim("status = 'pending' AND lane = 'bulk' AND attempts > 0", [], "FOR UPDATE SKIP LOCKED", 1)


def _claim(where: str, params: list[object], lock: str, limit: int) -> list[Job]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"""UPDATE simili_image SET status = 'processing', attempts = attempts + 1, updated_at = now()
                WHERE id IN (SELECT id FROM simili_image WHERE {where} ORDER BY id LIMIT %s {lock})
                RETURNING id, collection_id, sha256, file_path, width, height""",
            [*params, int(limit)],
        )
        rows = cursor.fetchall()
    return sorted((Job(*row) for row in rows), key=lambda job: job.image_id)


#: The bulk lane's images per batch when EMBED_BATCH_SIZE is 0: on the CPU larger batches gain
#: nothing (ONNX Runtime's rate is flat from 16 up); a GPU needs hundreds to stay busy.
CPU_BATCH = 32
GPU_BATCH = 256


def bulk_layout(recipe: pipeline.Recipe) -> tuple[int, int]:
    """Return (images per batch, decode threads) for the bulk lane: the settings, else measured defaults.

    On the CPU the CNN takes the cores and two threads keep it fed; on a GPU decoding is the
    bottleneck, so every core but the two that run inference and storage decodes.
    """
    if recipe.extractor.cuda:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (a container's share)
        return settings.EMBED_BATCH_SIZE or GPU_BATCH, settings.DECODE_THREADS or min(32, max(2, cores - 2))
    return settings.EMBED_BATCH_SIZE or CPU_BATCH, settings.DECODE_THREADS or 2


def decode_min_side(job: Job, recipe: pipeline.Recipe) -> int:
    """Return the short side a JPEG must be decoded at for both the CNN and the thumbnail.

    The thumbnail fits in a square, so it needs the long side at THUMBNAIL_SIZE, not the short
    one: a 4000x3000 photo decodes at 1/8 scale (500x375) instead of 1/4, as a search by image
    already does, which saves 20% of its decode and two thirds of its thumbnail and resize.
    """
    short, long = sorted((job.width, job.height))
    if short < 1:
        return max(settings.THUMBNAIL_SIZE, recipe.min_input_side)
    return max(recipe.min_input_side, math.ceil(settings.THUMBNAIL_SIZE * short / long))


def decode(job: Job, recipe: pipeline.Recipe) -> Decoded:
    """Read, validate, thumbnail and pre-resize one image (thread-safe: no database access)."""
    try:
        data = storage.media_path(job.file_path).read_bytes()
    except FileNotFoundError:
        return Decoded(job, error="The original file is missing from storage.")
    try:
        picture = imaging.load_image(
            data,
            min_side=decode_min_side(job, recipe),
            max_pixels=settings.MAX_IMAGE_PIXELS,
        )
        thumbnail = imaging.make_thumbnail(picture, max_side=settings.THUMBNAIL_SIZE, source=data)
        if recipe.single_native_scale:
            # The CNN's resize happens here, in the decode thread, off the inference path; the
            # extractor's own resize of an image already at size is then a copy.
            picture = resize_for(recipe.spec, picture)
    except ImageRejected as exc:
        return Decoded(job, error=str(exc))
    except MemoryError:  # the worker's state, not the image's: the reconciler tries it again
        raise
    except Exception as exc:  # noqa: BLE001 - this image's failure, stored on it, not its batch's
        # Raised, it failed the whole batch: 32 images left "processing" for the reconciler,
        # then tried one at a time, and failed 50 minutes later as "the worker died each time".
        logger.exception("could not decode image %s", job.image_id)
        return Decoded(job, error=f"This image could not be processed ({type(exc).__name__}: {exc}).")
    return Decoded(job, picture=picture, thumbnail=thumbnail)


def store(decoded: Sequence[Decoded], recipe: pipeline.Recipe, *, augment_each: bool) -> int:
    """Embed the decoded images as one batch and store thumbnails, vectors and statuses."""
    from webapp import embeddings, services

    failed = [item for item in decoded if item.error]
    for item in failed:
        services.image_mark_failed(image_id=item.job.image_id, error=item.error)
    good = [item for item in decoded if not item.error]
    if not good:
        return 0
    embedded = recipe.embed([item.picture for item in good if item.picture is not None])
    vectors = embedded.vectors
    version = embeddings.embedding_model_ensure(
        key=recipe.key, backbone=recipe.spec.name, dimensions=recipe.dimensions
    )
    thumbnails = {}
    for item in good:
        relative = storage.content_path("thumbnails", item.job.sha256, "jpg")
        storage.write_atomic(relative, item.thumbnail or b"")
        thumbnails[item.job.image_id] = relative
    augmented = [
        services.augment_one(vector=vector, version=version, collection_id=item.job.collection_id,
                             image_id=item.job.image_id) if augment_each else vector
        for item, vector in zip(good, vectors, strict=True)
    ]
    with transaction.atomic():
        # Each image's collection now, not at its claim: one moved meanwhile (an admin's Move) is
        # searched in its new collection only, with its own vector until that one is refreshed.
        current = dict(Image.objects.select_for_update().filter(pk__in=thumbnails).values_list("pk", "collection_id"))
        alive = set(current)
        embeddings.embeddings_store(version=version, rows=[
            embeddings.VectorRow(item.job.image_id, current[item.job.image_id], vector,
                                 aug if current[item.job.image_id] == item.job.collection_id else vector)
            for item, vector, aug in zip(good, vectors, augmented, strict=True)
            if item.job.image_id in alive
        ])
        if embedded.logits is not None and recipe.spec.imagenet_head:
            tagging.images_tags_replace({
                item.job.image_id: tagging.tags_from_logits(embedded.logits[index])
                for index, item in enumerate(good) if item.job.image_id in alive
            })
        images_mark_ready({image_id: thumbnails[image_id] for image_id in alive})
        # Thumbnails are shared by content: a deletion of another image of the same photo may
        # have removed this one since it was written.
        services.files_keep({thumbnails[item.job.image_id]: functools.partial(bytes, item.thumbnail or b"")
                             for item in good if item.job.image_id in alive})
    for image_id in set(thumbnails) - alive:  # deleted while we worked
        services.delete_unreferenced(thumbnails[image_id])
    if version.is_active:  # the batch that brings the version to HNSW_INDEX_MIN_ROWS builds its index
        try:
            embeddings.embedding_index_build(version=version, when_due=True, wait=False)
        except Exception:  # noqa: BLE001 - the batch is stored and ready; the next one tries again
            logger.warning("could not build the HNSW index of %s; searches scan exactly meanwhile", version.key,
                           exc_info=True)
    for collection_id in set(current.values()):
        services.schedule_augment(collection_id)
    return len(alive)


def images_mark_ready(thumbnails: dict[int, str]) -> None:
    """Mark images ready with their thumbnails in one statement.

    Django's `bulk_update` builds a CASE expression per row and field: 3.1 ms of CPU per image,
    more than the rest of storing a batch; one UPDATE from two arrays costs a few microseconds.
    """
    if not thumbnails:
        return
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            """UPDATE simili_image AS image
               SET status = %s, error = '', thumbnail_path = batch.path, processed_at = %s, updated_at = %s
               FROM unnest(%s::bigint[], %s::text[]) AS batch(id, path)
               WHERE image.id = batch.id""",
            [str(ImageStatus.READY), now, now, list(thumbnails), list(thumbnails.values())],
        )


def embed_claimed(jobs: Sequence[Job], *, augment_each: bool) -> int:
    """Decode and embed images already claimed (the interactive path: usually one)."""
    recipe = pipeline.recipe()
    return store([decode(job, recipe) for job in jobs], recipe, augment_each=augment_each)


def embed_pending(*, batch_size: int | None = None, time_budget: float | None = None) -> int:
    """Embed pending images in batches until none is left or the time budget is spent.

    The next batch is claimed and decoded in threads while the current one runs through the
    CNN, so decoding (about 27 ms of one core per 12 MP JPEG) overlaps inference.
    """
    recipe = pipeline.recipe()
    size, threads = bulk_layout(recipe)
    size = batch_size or size
    budget = settings.EMBED_TIME_BUDGET if time_budget is None else time_budget
    started = time.monotonic()
    done = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        futures: list[Future[Decoded]] = [pool.submit(decode, job, recipe) for job in images_claim(limit=size)]
        while futures:
            current = [future.result() for future in futures]
            more = time.monotonic() - started < budget
            futures = [pool.submit(decode, job, recipe) for job in images_claim(limit=size)] if more else []
            done += store(current, recipe, augment_each=False)
    logger.info("embedded %s image(s) in %.1f s", done, time.monotonic() - started)
    return done


def reindex_batch(*, version_key: str, limit: int, skip: set[int] | None = None, only: Sequence[int] | None = None,
                  on_rows: Callable[[list[int]], None] | None = None) -> list[int]:
    """Embed up to `limit` ready images that have no vector for the current recipe's version yet.

    Statuses are left alone: the images stay searchable with the active version meanwhile.
    Returns the ids it tried (empty when the version covers every ready image but `skip`).
    `only` limits it to those images; `on_rows` hears the ids before any is decoded.
    """
    from webapp import embeddings

    recipe = pipeline.recipe()
    if recipe.key != version_key:
        raise ValueError(f"the configured recipe is {recipe.key!r}, not {version_key!r}")
    version = embeddings.embedding_model_ensure(key=recipe.key, backbone=recipe.spec.name, dimensions=recipe.dimensions)
    candidates = Image.objects.filter(status=ImageStatus.READY)
    if only is not None:
        candidates = candidates.filter(pk__in=list(only))
    rows = list(
        candidates.exclude(embeddings__model_version=version)
        .exclude(pk__in=skip or set())
        .order_by("id")
        .values_list("id", "collection_id", "sha256", "file_path", "width", "height")[:limit]
    )
    if not rows:
        return []
    if on_rows is not None:
        on_rows([row[0] for row in rows])
    with ThreadPoolExecutor(max_workers=bulk_layout(recipe)[1], thread_name_prefix="decode") as pool:
        decoded = list(pool.map(lambda row: decode(Job(*row), recipe), rows))
    good = [item for item in decoded if not item.error and item.picture is not None]
    if good:
        vectors = recipe.embed([item.picture for item in good if item.picture is not None]).vectors
        with transaction.atomic():
            # Only images still there and ready get a vector (one deleted meanwhile has no row to point at).
            current = dict(Image.objects.select_for_update().filter(
                pk__in=[item.job.image_id for item in good], status=ImageStatus.READY
            ).values_list("pk", "collection_id"))
            embeddings.embeddings_store(version=version, rows=[  # each image's collection now (see store)
                embeddings.VectorRow(item.job.image_id, current[item.job.image_id], v, v)
                for item, v in zip(good, vectors, strict=True) if item.job.image_id in current
            ])
    for item in decoded:
        if item.error:
            logger.warning("re-index skipped image %s: %s", item.job.image_id, item.error)
    return [item.job.image_id for item in decoded]
