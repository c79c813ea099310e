"""Videos: upload, the worker's frame index, moments for a photo, and similar videos.

A video lives in a collection next to photos and is visible to whoever sees its collection. Its
worker samples frames (`retrieval.video.sample_frames`: one a second plus scene changes, at most
VIDEO_MAX_FRAMES), embeds them in batches with the image model version, and stores, in one
transaction, a `VideoFrame` per sample (its time and a small JPEG), a `FrameEmbedding` per frame,
the poster and keyframe strip, and the video's own vectors: the mean of its frame vectors (in
the photos' space) and, once one is trained, a recurrent encoder's (`VideoEncoder`). A photo then
finds *moments*: the nearest frames among the videos the viewer may see, one per video.
docs/video.md has the design and its measurements.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, connection, transaction
from django.db.models import DurationField, ExpressionWrapper, F, Q
from django.utils import timezone
from PIL import Image as PILImage

from retrieval import video as rv
from webapp import storage
from webapp.models import (
    Collection,
    EmbeddingModel,
    FrameEmbedding,
    ImageStatus,
    Video,
    VideoEmbedding,
    VideoEncoder,
    VideoFrame,
)
from webapp.selectors import Viewer, can_view_collection

if TYPE_CHECKING:
    from retrieval.video_encoder import VideoEncoder as GRUEncoder
    from webapp import pipeline
    from webapp.similarity import Scope

logger = logging.getLogger(__name__)

#: Containers that are always videos; GIF and WebP are videos only when animated.
VIDEO_CONTAINERS = frozenset({"mp4", "mov", "webm"})


class VideoFileTooLarge(rv.VideoRejected):
    code = "file_too_large"


def is_video(data: bytes) -> bool:
    """Whether an upload is a video: an MP4/MOV/WebM container, or a GIF/WebP of several frames.

    A GIF or WebP of one frame stays a photo; a file that is neither is left to the image
    validation, which rejects it with its own message.
    """
    fmt = rv.sniff_format(data[:64])
    if fmt in VIDEO_CONTAINERS:
        return True
    if fmt in {"gif", "webp"}:
        try:
            with PILImage.open(io.BytesIO(data)) as picture:
                return int(getattr(picture, "n_frames", 1)) > 1
        except Exception:  # noqa: BLE001 - not readable: the image path rejects it properly
            return False
    return False


@dataclass(frozen=True)
class VideoIngestResult:
    video: Video
    created: bool


def video_ingest(
    *,
    collection: Collection,
    uploaded_by: AbstractBaseUser | AnonymousUser | None,
    data: bytes,
    name: str = "",
) -> VideoIngestResult:
    """Validate and store an uploaded video, then queue its frame index once committed.

    Raises `retrieval.video.VideoRejected` (nothing stored) when the bytes are not an
    acceptable video: sniffed by content, decoded, within MAX_VIDEO_BYTES, MAX_VIDEO_SECONDS and
    MAX_VIDEO_PIXELS. The same content uploaded twice into one collection returns the first.
    """
    from webapp.services import _display_name, delete_unreferenced, files_keep

    if len(data) > settings.MAX_VIDEO_BYTES:
        raise VideoFileTooLarge(
            f"The video is {len(data):,} bytes; at most {settings.MAX_VIDEO_BYTES:,} bytes are accepted."
        )
    info = rv.probe(io.BytesIO(data), max_duration=settings.MAX_VIDEO_SECONDS, max_pixels=settings.MAX_VIDEO_PIXELS)
    sha256 = hashlib.sha256(data).hexdigest()
    existing = Video.objects.filter(collection=collection, sha256=sha256).first()
    if existing is not None:
        return VideoIngestResult(existing, created=False)
    relative = storage.content_path("videos", sha256, info.extension)
    storage.write_or_keep(relative, data)
    user = uploaded_by if uploaded_by is not None and uploaded_by.is_authenticated else None
    try:
        with transaction.atomic():
            video = Video.objects.create(
                collection=collection, uploaded_by=user, sha256=sha256, file_path=relative,
                original_name=_display_name(name), mime_type=info.mime, container=info.format,
                codec=info.codec[:50], width=info.width, height=info.height, duration=info.duration,
                byte_size=len(data),
            )
            files_keep({relative: functools.partial(bytes, data)})  # a deletion of another copy may have taken it
            transaction.on_commit(lambda: _enqueue_index([video.pk]), robust=True)
    except IntegrityError:
        return VideoIngestResult(Video.objects.get(collection=collection, sha256=sha256), created=False)
    except BaseException:
        delete_unreferenced(relative)
        raise
    return VideoIngestResult(video, created=True)


def _enqueue_index(video_ids: Sequence[int], *, refresh: bool = False) -> int:
    """Queue index tasks in order until the broker refuses one; stamp the queued in one UPDATE.

    Returns how many were queued; the broker's error is logged, not raised (the reconciler
    queues the rest on a later round).
    """
    from webapp.services import BULK_QUEUE
    from webapp.tasks import index_video

    queued: list[int] = []
    try:
        for video_id in video_ids:
            # On the bulk lane: a five-minute video is seconds of CNN time, which a photo's
            # search by image on the interactive lane must not wait behind.
            index_video.apply_async(args=[video_id], kwargs={"refresh": refresh}, queue=BULK_QUEUE)
            queued.append(video_id)
    except Exception as exc:  # noqa: BLE001 - the broker is down
        logger.warning("could not queue video %s: %s", video_ids[len(queued)], exc)
    Video.objects.filter(pk__in=queued).update(enqueued_at=timezone.now())
    return len(queued)


def videos_refresh_for_version(*, version: EmbeddingModel) -> int:
    """Queue every ready video without frame vectors of `version` to be indexed again under it.

    Called when a version becomes the active one: photos were re-indexed before the switch,
    videos are re-sampled from their originals after it (docs/video.md). Returns how many.
    """
    stale = list(Video.objects.filter(status=ImageStatus.READY)
                 .exclude(pk__in=FrameEmbedding.objects.filter(model_version=version).values("video_id"))
                 .values_list("pk", flat=True))
    _enqueue_index(stale, refresh=True)
    return len(stale)


def videos_drop_version(*, version: EmbeddingModel) -> None:
    """Delete a version's frame vectors, video vectors and encoders (before the version itself)."""
    with transaction.atomic():
        VideoEmbedding.objects.filter(frame_version=version).delete()
        VideoEncoder.objects.filter(frame_version=version).delete()
        FrameEmbedding.objects.filter(model_version=version).delete()


def video_mark_failed(*, video_id: int, error: str) -> None:
    Video.objects.filter(pk=video_id).update(status=ImageStatus.FAILED, error=error[:2000],
                                             processed_at=timezone.now())


def _jpeg(picture: PILImage.Image, quality: int = 85) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _store_jpeg(kind: str, picture: PILImage.Image, written: dict[str, bytes]) -> str:
    """Store a picture as a content-addressed JPEG; `written` collects it for `services.files_keep`."""
    data = _jpeg(picture)
    relative = storage.content_path(kind, hashlib.sha256(data).hexdigest(), "jpg")
    storage.write_or_keep(relative, data)
    written[relative] = data
    return relative


def _embed_frames(recipe: pipeline.Recipe, frames: Sequence[rv.Frame]) -> np.ndarray:
    from webapp.ingest import bulk_layout

    batch = bulk_layout(recipe)[0]
    chunks = [recipe.embed([f.image for f in frames[i:i + batch]]).vectors for i in range(0, len(frames), batch)]
    return np.concatenate(chunks).astype(np.float32)


def as_array(value: object) -> np.ndarray:
    """A vector as float32, whether the driver gave a pgvector object, a list or an array."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)


def mean_pool(vectors: np.ndarray) -> np.ndarray:
    """The mean-pooled video vector: the unit mean of its unit frame vectors (the baseline)."""
    mean = np.asarray(vectors, dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


def video_index(*, video_id: int, refresh: bool = False) -> int:
    """Sample, embed and store a video's frames (the worker); return how many frames were stored.

    Idempotent: a retry replaces the frames of an earlier attempt. A video that cannot be
    decoded is marked failed with the reason; one deleted meanwhile is left alone. With
    `refresh`, a ready video is indexed again under the configured model version and stays
    ready (and playable, with its old moments) meanwhile.
    """
    if refresh:
        if not Video.objects.filter(pk=video_id, status=ImageStatus.READY).exists():
            return 0
        return _index(video_id)
    # Only a pending video is claimed, as for photos: a redelivered message of a video whose
    # worker died finds it "processing" and leaves it to the reconciler, which counts attempts
    # (so a video that kills its worker is failed after EMBED_MAX_ATTEMPTS, not retried forever).
    claimed = Video.objects.filter(
        pk=video_id, status=ImageStatus.PENDING, attempts__lt=settings.EMBED_MAX_ATTEMPTS
    ).update(status=ImageStatus.PROCESSING, attempts=F("attempts") + 1, updated_at=timezone.now())
    if not claimed:
        logger.info("video %s is not pending (gone, done, claimed, or out of attempts)", video_id)
        return 0
    return _index(video_id)


def _index(video_id: int) -> int:
    video = Video.objects.get(pk=video_id)
    path = storage.media_path(video.file_path)
    if not path.exists():
        video_mark_failed(video_id=video_id, error="The original file is missing from storage.")
        return 0
    try:
        frames = rv.sample_frames(
            path,
            every_seconds=settings.VIDEO_FRAME_EVERY or None,
            scene_threshold=settings.VIDEO_SCENE_THRESHOLD or None,
            max_frames=settings.VIDEO_MAX_FRAMES,
            max_side=settings.THUMBNAIL_SIZE,
            max_duration=settings.MAX_VIDEO_SECONDS,
        )
    except rv.VideoRejected as exc:
        video_mark_failed(video_id=video_id, error=str(exc))
        return 0
    from webapp import pipeline  # torch: workers only

    recipe = pipeline.recipe()
    vectors = _embed_frames(recipe, frames)
    from webapp import embeddings
    from webapp.services import files_keep

    version = embeddings.embedding_model_ensure(key=recipe.key, backbone=recipe.spec.name,
                                                dimensions=recipe.dimensions)
    written: dict[str, bytes] = {}
    poster_path = _store_jpeg("thumbnails", rv.poster(frames).image, written)
    strip_path = _store_jpeg("strips", rv.keyframe_strip(frames, height=settings.VIDEO_STRIP_HEIGHT), written)
    # Two samples may round to one millisecond (a clamped or guessed timestamp): keep the first.
    first_at: dict[float, int] = {}
    for index, frame in enumerate(frames):
        first_at.setdefault(round(frame.timestamp, 3), index)
    keep = sorted(first_at.values())
    frames, vectors = [frames[i] for i in keep], vectors[keep]
    frame_paths = [_store_jpeg("frames", frame.image, written) for frame in frames]
    encoder = encoder_current(version=version)
    encoded = encode_videos(encoder, [vectors])[0] if encoder is not None else None
    with transaction.atomic():
        if not Video.objects.select_for_update().filter(pk=video_id).exists():
            return 0  # deleted while we worked; its files go with the media sweeper
        VideoFrame.objects.filter(video_id=video_id).delete()
        rows = VideoFrame.objects.bulk_create([
            VideoFrame(video_id=video_id, timestamp=round(frame.timestamp, 3), thumbnail_path=relative)
            for frame, relative in zip(frames, frame_paths, strict=True)
        ])
        FrameEmbedding.objects.bulk_create([
            FrameEmbedding(frame=row, video_id=video_id, collection_id=video.collection_id,
                           model_version=version, vector=vector)
            for row, vector in zip(rows, vectors, strict=True)
        ])
        VideoEmbedding.objects.filter(video_id=video_id).delete()
        VideoEmbedding.objects.create(video_id=video_id, collection_id=video.collection_id, frame_version=version,
                                      vector=mean_pool(vectors))
        if encoder is not None and encoded is not None:
            VideoEmbedding.objects.create(video_id=video_id, collection_id=video.collection_id,
                                          frame_version=version, encoder=encoder, vector=encoded)
        Video.objects.filter(pk=video_id).update(
            status=ImageStatus.READY, error="", poster_path=poster_path, strip_path=strip_path,
            processed_at=timezone.now(),
        )
        # Shared by content (a frame of the same video in another collection): a deletion may
        # have removed one since it was written.
        files_keep({relative: functools.partial(bytes, data) for relative, data in written.items()})
    logger.info("indexed video %s: %s frames", video_id, len(rows))
    return len(rows)


#: Seconds of worker time a second of video may take before the reconciler calls it abandoned:
#: sampling decodes every frame for scene changes (a 60 fps 4K HEVC second is 60 full decodes,
#: a few seconds on 2 cores), then one frame a second is embedded.
PROCESSING_SECONDS_PER_SECOND = 10


def videos_requeue_stale() -> int:
    """Queue again videos never handed to the broker or whose worker died; give up after attempts.

    A video counts as abandoned after RECONCILE_PROCESSING_AFTER plus PROCESSING_SECONDS_PER_SECOND
    per second of video: a five-minute 4K video legitimately takes longer than a photo.
    """
    now = timezone.now()
    allowance = ExpressionWrapper(F("duration") * timedelta(seconds=PROCESSING_SECONDS_PER_SECOND),
                                  output_field=DurationField())
    stale = Video.objects.filter(
        Q(status=ImageStatus.PENDING, enqueued_at__isnull=True)
        | Q(status=ImageStatus.PENDING, enqueued_at__lt=now - timedelta(seconds=settings.RECONCILE_PENDING_AFTER))
        | Q(status=ImageStatus.PROCESSING,
            updated_at__lt=now - timedelta(seconds=settings.RECONCILE_PROCESSING_AFTER) - allowance)
    )
    stale.filter(attempts__gte=settings.EMBED_MAX_ATTEMPTS).update(
        status=ImageStatus.FAILED, processed_at=now,
        error=f"Gave up after {settings.EMBED_MAX_ATTEMPTS} attempts: the worker died each time "
        "(the video may be too large for its memory).",
    )
    with transaction.atomic():
        # Locked as read (the conditions re-checked on the locked row): a video a worker claimed
        # or finished since is skipped, not set back to pending and indexed twice at once.
        retry = list(stale.filter(attempts__lt=settings.EMBED_MAX_ATTEMPTS).select_for_update(skip_locked=True)
                     .values_list("pk", flat=True)[:1000])
        Video.objects.filter(pk__in=retry).update(status=ImageStatus.PENDING)
    return _enqueue_index(retry)


def video_delete(*, video: Video) -> None:
    """Delete a video with its frames and vectors, and its files unless another row shares them.

    The files go once the deletion commits: a rolled-back deletion keeps rows and files together.
    """
    from webapp.services import delete_unreferenced_on_commit

    paths = [video.file_path, video.poster_path, video.strip_path,
             *video.frames.values_list("thumbnail_path", flat=True)]
    video.delete()
    delete_unreferenced_on_commit(paths)


def paths_referenced(paths: Sequence[str]) -> set[str]:
    """Return which of these stored paths a video, its poster, strip or a frame still uses."""
    wanted = [p for p in paths if p]
    if not wanted:
        return set()
    found = Video.objects.filter(Q(file_path__in=wanted) | Q(poster_path__in=wanted) | Q(strip_path__in=wanted))
    used = {p for row in found.values_list("file_path", "poster_path", "strip_path") for p in row}
    used |= set(VideoFrame.objects.filter(thumbnail_path__in=wanted).values_list("thumbnail_path", flat=True))
    return used & set(wanted)


# --- reads ------------------------------------------------------------------------------------


def video_for_viewer(*, key: str, viewer: Viewer) -> Video:
    """Return the video, or raise 404 if it does not exist or the viewer may not see it."""
    from django.http import Http404

    video = Video.objects.select_related("collection", "collection__owner", "uploaded_by").filter(key=key).first()
    if video is None or not can_view_collection(viewer, video.collection):
        raise Http404("No such video.")
    return video


@dataclass(frozen=True)
class Moment:
    """The best-matching frame of one video for a query: where to start playing."""

    video: Video
    frame: VideoFrame
    similarity: float

    @property
    def percent(self) -> int:
        return max(0, min(100, round(self.similarity * 100)))

    @property
    def url(self) -> str:
        return f"{self.video.get_absolute_url()}?t={self.frame.timestamp:g}"


def moments_for_vector(
    *, vector: np.ndarray, version: EmbeddingModel, viewer: Viewer, k: int,
    collection_ids: Sequence[int] | None = None,
) -> list[Moment]:
    """Return up to k videos the viewer may see, each at its frame nearest to `vector`, best first."""
    from webapp.similarity import search_scope

    scope = search_scope(version=version, viewer=viewer, collection_ids=collection_ids)
    return moments_load(moment_rows(vector=vector, scope=scope, k=k), scope)


def moment_rows(*, vector: np.ndarray, scope: Scope, k: int) -> list[tuple[int, int, float]]:
    """Return (video id, frame id, cosine distance) of the best frame of the k nearest videos in scope.

    Exact: every visible frame's distance is computed (the (version, collection) btree narrows
    them), then each video keeps its best frame. Recall 1.0; fine for thousands of videos of a
    few hundred frames each (docs/video.md gives the numbers and the next step).
    """
    from pgvector import HalfVector

    from webapp.embeddings import binary_cursor

    version = scope.version
    dim = int(version.dimensions)
    if len(vector) != dim:
        raise ValueError(f"expected a vector of {dim} dimensions, got {len(vector)}")
    if k <= 0 or scope.collection_ids == []:
        return []
    where = [f"model_version_id = {int(version.pk)}"]
    params: dict[str, object] = {"query": HalfVector(np.asarray(vector, dtype=np.float32)), "k": int(k)}
    if scope.collection_ids is not None:
        where.append("collection_id = ANY(%(collections)s)")
        params["collections"] = scope.collection_ids
    sql = f"""
        SELECT video_id, frame_id, distance FROM (
            SELECT DISTINCT ON (video_id) video_id, frame_id, distance FROM (
                SELECT video_id, frame_id, vector::halfvec({dim}) <=> %(query)s::halfvec({dim}) AS distance
                FROM simili_frameembedding WHERE {" AND ".join(where)}
            ) AS frames ORDER BY video_id, distance
        ) AS best ORDER BY distance, video_id LIMIT %(k)s
    """
    with binary_cursor() as cursor:
        cursor.execute(sql, params, binary=True)
        return [(int(v), int(f), float(d)) for v, f, d in cursor.fetchall()]


def moments_load(rows: Sequence[tuple[int, int, float]], scope: Scope) -> list[Moment]:
    """Load the moments' videos and frames, keeping only ready videos the scope still allows."""
    if not rows:
        return []
    found = Video.objects.select_related("collection").in_bulk([v for v, _, _ in rows])
    frames = VideoFrame.objects.in_bulk([f for _, f, _ in rows])
    allowed = None if scope.collection_ids is None else set(scope.collection_ids)
    return [
        Moment(video=found[v], frame=frames[f], similarity=1.0 - d)
        for v, f, d in rows
        if v in found and f in frames and found[v].is_ready
        and (allowed is None or found[v].collection_id in allowed)
    ]


def moment_rows_for_image(*, image_id: int, version: EmbeddingModel, scope: Scope, k: int) -> list[
    tuple[int, int, float]
]:
    """Moment rows for a stored photo: its raw vector (frames are not re-ranked), in its scope."""
    from webapp.similarity import _vectors

    if k <= 0 or not FrameEmbedding.objects.filter(model_version=version).exists():
        return []
    raw = _vectors(version=version, image_ids=[image_id], column="vector")
    if image_id not in raw:
        return []
    frames_scope = replace(scope, exclude_image_ids=[])
    return moment_rows(vector=raw[image_id], scope=frames_scope, k=k)


def video_representation(video: Video) -> tuple[EmbeddingModel, VideoEncoder | None] | None:
    """Return (frame version, encoder or None for mean pooling) that "similar videos" uses for a video."""
    from webapp.selectors import active_model_version

    version = active_model_version()
    if version is None:
        return None
    encoder = encoder_current(version=version) if settings.VIDEO_ENCODER == "gru" else None
    if encoder is not None and VideoEmbedding.objects.filter(video=video, encoder=encoder).exists():
        return version, encoder
    return version, None


def videos_similar(*, video: Video, viewer: Viewer, k: int = 6) -> list[tuple[Video, float]]:
    """Return the videos most like a video among those the viewer may see: (video, similarity)."""
    from webapp.similarity import search_scope

    representation = video_representation(video)
    if representation is None or not video.is_ready:
        return []
    version, encoder = representation
    mine = VideoEmbedding.objects.filter(video=video, frame_version=version, encoder=encoder).first()
    if mine is None:
        return []
    scope = search_scope(version=version, viewer=viewer)
    if scope.collection_ids == []:
        return []
    query = as_array(mine.vector)
    dim = len(query)
    where = ["frame_version_id = %(version)s", "video_id <> %(video)s",
             "encoder_id IS NULL" if encoder is None else "encoder_id = %(encoder)s"]
    params: dict[str, object] = {"version": version.pk, "video": video.pk, "k": int(k),
                                 "query": "[" + ",".join(f"{x:.7g}" for x in query) + "]",
                                 "encoder": encoder.pk if encoder else None}
    if scope.collection_ids is not None:
        where.append("collection_id = ANY(%(collections)s)")
        params["collections"] = scope.collection_ids
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT video_id, vector::vector({dim}) <=> %(query)s::vector({dim}) AS distance "
            f"FROM simili_videoembedding WHERE {' AND '.join(where)} ORDER BY distance, video_id LIMIT %(k)s",
            params,
        )
        rows = [(int(v), float(d)) for v, d in cursor.fetchall()]
    videos = Video.objects.select_related("collection").in_bulk([v for v, _ in rows])
    allowed = None if scope.collection_ids is None else set(scope.collection_ids)
    return [(videos[v], 1.0 - d) for v, d in rows
            if v in videos and videos[v].is_ready and (allowed is None or videos[v].collection_id in allowed)]


# --- the recurrent encoder ----------------------------------------------------------------------


def encoder_public_name(encoder: VideoEncoder) -> str:
    """The encoder's name as the API shows it: never the training collection's key, which
    encoders made before it was left out of their keys still hold ("video-gru:<key>@...")."""
    return f"video-gru@{encoder.key.rsplit('@', 1)[-1]}"


def encoder_current(*, version: EmbeddingModel) -> VideoEncoder | None:
    """Return the newest encoder trained on this image version's frame vectors, if any."""
    return VideoEncoder.objects.filter(frame_version=version).order_by("-created_at", "-id").first()


def frame_vectors(*, version: EmbeddingModel, video_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Return each video's frame vectors (frames x dim, in time order) under an image version."""
    out: dict[int, list[np.ndarray]] = {}
    rows = (FrameEmbedding.objects.filter(model_version=version, video_id__in=list(video_ids))
            .order_by("video_id", "frame__timestamp").values_list("video_id", "vector"))
    for video_id, vector in rows:
        out.setdefault(int(video_id), []).append(as_array(vector))
    return {video_id: np.stack(vectors) for video_id, vectors in out.items()}


def encode_videos(encoder: VideoEncoder, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Encode frame-vector sequences with a stored encoder (loaded once per process)."""
    from retrieval import video_encoder

    model = _load_encoder(encoder)
    return [np.asarray(video_encoder.encode(model, seq), dtype=np.float32) for seq in sequences]


_ENCODERS: dict[str, GRUEncoder] = {}


def _load_encoder(encoder: VideoEncoder) -> GRUEncoder:
    from retrieval import video_encoder

    path = encoder.checkpoint_path
    if path not in _ENCODERS:
        _ENCODERS[path] = video_encoder.load(Path(path), dim=encoder.frame_version.dimensions)
    return _ENCODERS[path]


@dataclass(frozen=True)
class EncoderRun:
    encoder: VideoEncoder
    losses: list[float]
    encoded: int


def encoder_train(
    *, collection: Collection, epochs: int, batch_size: int, clip_len: int, seed: int = 0, device: str = "cpu",
    progress: bool = False,
) -> EncoderRun:
    """Train a GRU video encoder on a collection's ready videos, register it, encode every video.

    Self-supervised (no labels: two clips of a video closer than clips of others). The new
    encoder becomes the newest for the active image version: "similar videos" uses it when
    VIDEO_ENCODER is "gru", and the worker encodes new videos with it.
    """
    from retrieval import video_encoder
    from webapp.selectors import active_model_version

    version = active_model_version()
    if version is None:
        raise ValueError("no image model version yet: upload and index something first")
    ids = list(Video.objects.filter(collection=collection, status=ImageStatus.READY).values_list("pk", flat=True))
    sequences = frame_vectors(version=version, video_ids=ids)
    if len(sequences) < 2:
        raise ValueError(f"the collection has {len(sequences)} indexed video(s); at least two are needed to train")
    model, losses = video_encoder.train(
        list(sequences.values()), epochs=epochs, batch_size=batch_size, clip_len=clip_len, seed=seed,
        device=device, source_key=version.key, progress=progress,
    )
    # Named by the weights and a random suffix: never the name of an encoder that exists or existed.
    suffix = f"{model.identifier}-{secrets.token_hex(4)}"
    # Not the collection's key: the API names the encoder to anyone who asks for similar
    # videos, and an unlisted collection's key is its only protection.
    key = f"video-gru@{suffix}"[:200]
    path = Path(settings.VAR_DIR) / "video-encoders" / f"{collection.key}-{suffix}.pt"
    video_encoder.save(model, path, metadata={"collection": collection.key, "frame_version": version.key})
    encoder = VideoEncoder.objects.create(
        key=key, frame_version=version, trained_on=collection, checkpoint_path=str(path),
        dimensions=model.dim, videos_seen=len(sequences), final_loss=losses[-1] if losses else None,
    )
    return EncoderRun(encoder=encoder, losses=losses, encoded=encoder_encode_all(encoder=encoder))


def encoder_encode_all(*, encoder: VideoEncoder, batch: int = 200) -> int:
    """Store the encoder's vector of every video that has frame vectors of its image version."""
    ids = list(FrameEmbedding.objects.filter(model_version=encoder.frame_version)
               .values_list("video_id", flat=True).distinct())
    done = 0
    for start in range(0, len(ids), batch):
        sequences = frame_vectors(version=encoder.frame_version, video_ids=ids[start:start + batch])
        vectors = encode_videos(encoder, list(sequences.values()))
        collections = dict(Video.objects.filter(pk__in=list(sequences)).values_list("pk", "collection_id"))
        with transaction.atomic():
            VideoEmbedding.objects.filter(encoder=encoder, video_id__in=list(sequences)).delete()
            VideoEmbedding.objects.bulk_create([
                VideoEmbedding(video_id=video_id, collection_id=collections[video_id],
                               frame_version=encoder.frame_version, encoder=encoder, vector=vector)
                for video_id, vector in zip(sequences, vectors, strict=True) if video_id in collections
            ])
        done += len(sequences)
    return done
