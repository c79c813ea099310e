"""Celery tasks: ids in, one service call, errors stored on the row."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready
from django.conf import settings
from django.db import InterfaceError, OperationalError

from webapp import services

logger = logging.getLogger(__name__)

#: Database hiccups are transient; anything else is a bug or bad data and is stored on the row.
TRANSIENT_ERRORS = (OperationalError, InterfaceError)


class EmbedImageTask(Task):  # type: ignore[misc]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        image_id = args[0] if args else kwargs.get("image_id")
        logger.error("embedding image %s failed: %s", image_id, exc)
        services.image_mark_failed(image_id=image_id, error=f"{type(exc).__name__}: {exc}")


@shared_task(
    base=EmbedImageTask,
    name="simili.embed_image",
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=6,
    acks_late=True,
    ignore_result=True,  # nobody waits on it; status lives on the row
)
def embed_image(image_id: int) -> None:
    services.image_embed(image_id=image_id)


@shared_task(name="simili.embed_pending", ignore_result=True, acks_late=True, autoretry_for=TRANSIENT_ERRORS,
             retry_backoff=2, max_retries=6)
def embed_pending() -> int:
    # Claimed rows of a killed worker stay "processing"; the reconciler hands them back.
    return services.images_embed_pending()


@shared_task(name="simili.embed_query", acks_late=False, ignore_result=False)
def embed_query(relative_path: str) -> dict[str, object]:
    # Not acked late: a query nobody waits for any more must not be redelivered.
    return services.query_embed(relative_path=relative_path)


@shared_task(name="simili.reconcile", ignore_result=True)
def reconcile() -> int:
    from webapp import videos

    return services.images_requeue_stale() + videos.videos_requeue_stale()


class IndexVideoTask(Task):  # type: ignore[misc]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from webapp import videos

        video_id = args[0] if args else kwargs.get("video_id")
        logger.error("indexing video %s failed: %s", video_id, exc)
        videos.video_mark_failed(video_id=video_id, error=f"{type(exc).__name__}: {exc}")


@shared_task(base=IndexVideoTask, name="simili.index_video", autoretry_for=TRANSIENT_ERRORS, retry_backoff=2,
             retry_backoff_max=120, max_retries=6, acks_late=True, ignore_result=True)
def index_video(video_id: int, refresh: bool = False) -> None:
    from webapp import videos

    videos.video_index(video_id=video_id, refresh=refresh)


@shared_task(name="simili.media_gc", ignore_result=True)
def media_gc() -> int:
    return services.media_collect_garbage()


@shared_task(name="simili.augment_collection", ignore_result=True, autoretry_for=TRANSIENT_ERRORS,
             retry_backoff=2, max_retries=6)
def augment_collection(collection_id: int, first: float | None = None) -> int:
    """Refresh a collection's augmented vectors and near-duplicates.

    `first` (when uploads scheduled it) is when the refresh was first scheduled: the task waits
    for the collection's uploads to pause (`services.augment_wait`), coming back later while
    vectors still arrive, and only the chain whose `first` the pending key holds goes on, so
    a collection has one refresh pending at a time. Without it (an admin's curation, a message
    from before the wait existed) the refresh runs at once.
    """
    from django.core.cache import cache

    key = services.augment_key(collection_id)
    if first is not None:
        owner = cache.get(key)
        if owner is not None and owner != first:
            return 0  # another refresh of this collection is pending: it will see these vectors
        wait = services.augment_wait(collection_id=collection_id, waited=time.time() - first)
        if wait > 0:
            cache.set(key, first, timeout=services.augment_key_seconds())
            try:
                augment_collection.apply_async(args=[collection_id, first], countdown=wait, queue=services.BULK_QUEUE)
                return 0
            except Exception:  # noqa: BLE001 - no broker to come back through: refresh now instead
                logger.warning("could not queue the refresh of collection %s for later; refreshing now",
                               collection_id, exc_info=True)
    with services.augment_lock(collection_id) as held:
        if not held:  # another worker is refreshing it: come back once it is done
            augment_collection.apply_async(args=[collection_id] if first is None else [collection_id, first],
                                           countdown=max(1.0, float(settings.AUGMENT_DELAY)),
                                           queue=services.BULK_QUEUE)
            return 0
        cache.delete(key)  # uploads from now on schedule a new refresh
        due, request = services.augment_full_due(collection_id)
        full = first is None or due
        changed = services.collection_augment(collection_id=collection_id, full=full)
        if full:  # only now: a refresh that failed or was killed leaves the request for the next
            services.augment_full_done(collection_id, request)
        return changed


@worker_ready.connect
def _load_model_at_start(**kwargs: Any) -> None:
    """Load the CNN before the first task, and say which device it runs on."""
    from webapp import pipeline

    recipe = pipeline.recipe()
    logger.warning("simili worker ready: %s on %s", recipe.key, recipe.extractor.device)


#: Seconds before a re-index task that found another step of its version running tries again.
REINDEX_BUSY_DELAY = 5.0


@shared_task(name="simili.reindex_version", ignore_result=True, acks_late=True, autoretry_for=TRANSIENT_ERRORS,
             retry_backoff=2, max_retries=6)
def reindex_version(version_id: int, skip: list[int]) -> None:
    from webapp import embeddings

    # One time budget per task, then a fresh task: the bulk lane stays shared with imports.
    try:
        rest = embeddings.embedding_model_reindex_step(version_id=version_id, skip=skip)
    except embeddings.ReindexBusy:  # another chain's step: this one goes on once it is done
        reindex_version.apply_async(args=[version_id, skip], countdown=REINDEX_BUSY_DELAY, queue=services.BULK_QUEUE)
        return
    if rest is not None:
        reindex_version.apply_async(args=[version_id, rest], queue=services.BULK_QUEUE)
