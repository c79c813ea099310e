"""Writes: every change to Simili's data goes through one of these functions."""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from retrieval import imaging
from retrieval.backbones import BackboneSpec, get_backbone
from retrieval.errors import ImageRejected
from retrieval.extraction import Extractor
from webapp import storage
from webapp.models import ApiToken, Collection, Embedding, EmbeddingModel, Image, ImageStatus

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
}


def rejection_status(exc: ImageRejected) -> int:
    """Return the HTTP status that answers a rejected upload."""
    return REJECTION_STATUS.get(exc.code, 400)


def upload_check_size(*, size: int) -> None:
    """Raise `UploadTooLarge` before reading a file that is over the byte limit."""
    if size > settings.MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"The file is {size:,} bytes; at most {settings.MAX_UPLOAD_BYTES:,} bytes are accepted.")


class SearchUnavailable(Exception):
    """No worker answered a search-by-image request in time."""


@dataclass(frozen=True)
class IngestResult:
    image: Image
    created: bool


@functools.cache
def get_extractor(backbone: str, device: str) -> Extractor:
    """Return the process-wide extractor for a backbone: the CNN is loaded once per process."""
    return Extractor(get_backbone(backbone), device=device)


def _default_extractor() -> Extractor:
    return get_extractor(settings.EMBEDDING_BACKBONE, settings.EMBEDDING_DEVICE)


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
    """Delete a collection with its images, embeddings and every file no other row uses."""
    paths = list(collection.images.values_list("file_path", "thumbnail_path"))
    collection.delete()
    for original, thumbnail in paths:
        _delete_unreferenced(original)
        _delete_unreferenced(thumbnail)


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

    # If the broker is down this raises; on_commit(robust=True) logs it, the row stays pending
    # with enqueued_at NULL, and the reconciler queues it once the broker is back.
    embed_image.apply_async(args=[image_id], queue=queue)
    Image.objects.filter(pk=image_id).update(enqueued_at=timezone.now())


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
    exhausted = stale.filter(attempts__gte=settings.EMBED_MAX_ATTEMPTS)
    for image_id in exhausted.values_list("pk", flat=True):
        image_mark_failed(
            image_id=image_id,
            error=f"Gave up after {settings.EMBED_MAX_ATTEMPTS} attempts: the worker died each time "
            "(the image may be too large for its memory).",
        )
    queued = 0
    for image_id in stale.filter(attempts__lt=settings.EMBED_MAX_ATTEMPTS).values_list("pk", flat=True)[:1000]:
        Image.objects.filter(pk=image_id).update(status=ImageStatus.PENDING)
        try:
            _enqueue_embed(image_id, queue=BULK_QUEUE)
        except Exception as exc:  # noqa: BLE001 - the broker is still down; try on the next round
            logger.warning("reconciler could not queue image %s: %s", image_id, exc)
            break
        queued += 1
    if queued:
        logger.info("reconciler queued %s stale image(s) again", queued)
    return queued


def media_collect_garbage(*, older_than_seconds: float = 3600) -> int:
    """Delete stored files that no row references (left by a crash between write and insert)."""
    import time
    from pathlib import Path

    root = Path(settings.MEDIA_ROOT)
    cutoff = time.time() - older_than_seconds
    removed = 0
    for kind in ("originals", "thumbnails", "queries"):
        for path in (root / kind).rglob("*") if (root / kind).exists() else []:
            if not path.is_file() or path.stat().st_mtime > cutoff:
                continue
            relative = str(path.relative_to(root))
            if kind != "queries" and (
                Image.objects.filter(file_path=relative).exists()
                or Image.objects.filter(thumbnail_path=relative).exists()
            ):
                continue
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %s unreferenced media file(s)", removed)
    return removed


def image_ingest(
    *,
    collection: Collection,
    uploaded_by: AbstractBaseUser | AnonymousUser | None,
    data: bytes,
    name: str = "",
) -> IngestResult:
    """Validate and store an uploaded image, then queue its embedding once committed.

    Raises `ImageRejected` (nothing stored) when the bytes are not an acceptable image.
    The same content uploaded twice into one collection returns the existing image.
    """
    upload_check_size(size=len(data))
    info = imaging.inspect_image(data, max_pixels=settings.MAX_IMAGE_PIXELS)
    sha256 = hashlib.sha256(data).hexdigest()
    existing = Image.objects.filter(collection=collection, sha256=sha256).first()
    if existing is not None:
        return IngestResult(existing, created=False)

    relative = storage.content_path("originals", sha256, info.extension)
    if not storage.media_path(relative).exists():
        storage.write_atomic(relative, data)
    user = uploaded_by if uploaded_by is not None and uploaded_by.is_authenticated else None
    try:
        with transaction.atomic():
            image = Image.objects.create(
                collection=collection,
                uploaded_by=user,
                sha256=sha256,
                file_path=relative,
                original_name=_display_name(name),
                mime_type=info.mime,
                width=info.width,
                height=info.height,
                byte_size=len(data),
            )
            _enqueue_on_commit(image.pk, queue=INTERACTIVE_QUEUE)
    except IntegrityError:
        # A concurrent upload of the same content won the race; theirs is the image.
        return IngestResult(Image.objects.get(collection=collection, sha256=sha256), created=False)
    except BaseException:
        _delete_unreferenced(relative)
        raise
    return IngestResult(image, created=True)


def _display_name(name: str) -> str:
    """Keep a client's file name for display only: last path component, printable, bounded."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:255]


def _delete_unreferenced(relative: str) -> None:
    if not relative:
        return
    if Image.objects.filter(file_path=relative).exists():
        return
    if Image.objects.filter(thumbnail_path=relative).exists():
        return
    storage.delete(relative)


def image_delete(*, image: Image) -> None:
    """Delete an image with its embeddings, and its files unless another row shares them."""
    paths = [image.file_path, image.thumbnail_path]
    image.delete()
    for relative in paths:
        _delete_unreferenced(relative)


def image_mark_failed(*, image_id: int, error: str) -> None:
    """Record that embedding an image failed, with the reason a person can act on."""
    Image.objects.filter(pk=image_id).update(
        status=ImageStatus.FAILED, error=error[:2000], processed_at=timezone.now()
    )


def image_reembed(*, image_ids: list[int]) -> int:
    """Mark images pending and queue them on the bulk queue; return how many were queued."""
    ids = list(Image.objects.filter(pk__in=image_ids).values_list("pk", flat=True))
    with transaction.atomic():
        Image.objects.filter(pk__in=ids).update(status=ImageStatus.PENDING, error="", attempts=0)
        for image_id in ids:
            _enqueue_on_commit(image_id, queue=BULK_QUEUE)
    return len(ids)


def embedding_model_ensure(spec: BackboneSpec) -> EmbeddingModel:
    """Return the model version row for a backbone, creating it and its HNSW index once."""
    version, created = EmbeddingModel.objects.get_or_create(
        key=spec.key, defaults={"backbone": spec.name, "dimensions": spec.embedding_dim}
    )
    if created:
        with connection.cursor() as cursor:
            # One partial index per version: each has its own dimension, and a query that
            # repeats the WHERE and the cast is answered by this version's graph alone.
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {version.index_name} ON simili_embedding "
                f"USING hnsw ((vector::vector({int(spec.embedding_dim)})) vector_cosine_ops) "
                f"WHERE model_version_id = {int(version.pk)}"
            )
    if not version.is_active and not EmbeddingModel.objects.filter(is_active=True).exists():
        try:
            with transaction.atomic():
                EmbeddingModel.objects.filter(pk=version.pk).update(is_active=True)
                version.is_active = True
        except IntegrityError:
            pass  # another worker activated a version first
    return version


def image_embed(*, image_id: int) -> None:
    """Decode an image, store its thumbnail and its embedding, and mark it ready (or failed)."""
    from django.db.models import F

    image = Image.objects.filter(pk=image_id).first()
    if image is None:
        logger.info("image %s is gone; nothing to embed", image_id)
        return
    if image.status == ImageStatus.READY and image.embeddings.exists():
        logger.info("image %s is already embedded; a redelivered task has nothing to do", image_id)
        return
    Image.objects.filter(pk=image_id).update(status=ImageStatus.PROCESSING, attempts=F("attempts") + 1)
    try:
        data = storage.media_path(image.file_path).read_bytes()
    except FileNotFoundError:
        image_mark_failed(image_id=image_id, error="The original file is missing from storage.")
        return
    extractor = _default_extractor()
    try:
        picture = imaging.load_image(
            data,
            min_side=max(settings.THUMBNAIL_SIZE, extractor.spec.input_size),
            max_pixels=settings.MAX_IMAGE_PIXELS,
        )
    except ImageRejected as exc:
        image_mark_failed(image_id=image_id, error=str(exc))
        return
    thumbnail = storage.content_path("thumbnails", image.sha256, "jpg")
    storage.write_atomic(thumbnail, imaging.make_thumbnail(picture, max_side=settings.THUMBNAIL_SIZE))
    vector = extractor.embed([picture]).vectors[0]
    version = embedding_model_ensure(extractor.spec)
    with transaction.atomic():
        if not Image.objects.select_for_update().filter(pk=image_id).exists():
            _delete_unreferenced(thumbnail)
            return
        Embedding.objects.update_or_create(
            image_id=image_id, model_version=version, defaults={"vector": vector}
        )
        Image.objects.filter(pk=image_id).update(
            status=ImageStatus.READY, error="", thumbnail_path=thumbnail, processed_at=timezone.now()
        )
    logger.info("embedded image %s with %s", image_id, version.key)


def query_embed(*, relative_path: str) -> dict[str, object]:
    """Embed a stored query image (worker side); return its vector and model version key."""
    extractor = _default_extractor()
    data = storage.media_path(relative_path).read_bytes()
    picture = imaging.load_image(
        data, min_side=extractor.spec.input_size, max_pixels=settings.MAX_IMAGE_PIXELS
    )
    vector = extractor.embed([picture]).vectors[0]
    return {"model": extractor.spec.key, "vector": [float(x) for x in vector]}


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
    return str(answer["model"]), list(answer["vector"])
