"""Simili's tables: collections of images, their embeddings and the model versions behind them."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models
from pgvector.django import HalfVectorField, VectorField


def new_key() -> str:
    """Return an unguessable URL key: unlisted collections rely on it not being enumerable.

    Never one that starts with "-": a command line reads `--collection -x…` as two options.
    """
    while (key := secrets.token_urlsafe(12)).startswith("-"):
        pass
    return key


class Visibility(models.TextChoices):
    PUBLIC = "public", "Public: listed, and shown as similar results to everyone"
    UNLISTED = "unlisted", "Unlisted: reachable by its link only, never listed or suggested"
    PRIVATE = "private", "Private: you and the admins only"


class Collection(models.Model):
    key = models.CharField(max_length=24, unique=True, default=new_key, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="collections"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    visibility = models.CharField(
        max_length=16, choices=Visibility.choices, default=Visibility.PRIVATE
    )
    embed_origins = models.TextField(
        blank=True,
        help_text="Origins (one per line, e.g. https://shop.example) whose pages may embed this "
        "collection's similar-images widget and read its API from the browser.",
    )
    editors = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="CollectionEditor", related_name="shared_collections", blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["visibility", "owner"], name="collection_visibility_owner")]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        from webapp.links import keyed_url

        return keyed_url("collection", self.key)


class CollectionEditor(models.Model):
    """A user the owner shares a collection with: they see it, upload into it and curate its images."""

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="editor_links")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="editor_links")
    added_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["added_at", "id"]
        constraints = [models.UniqueConstraint(fields=["collection", "user"], name="collection_editor_unique")]
        # The similarity SQL asks "is the viewer an editor of c?" for every candidate row.
        indexes = [models.Index(fields=["user", "collection"], name="collection_editor_user")]

    def __str__(self) -> str:
        return f"{self.user} edits {self.collection}"


class ImageStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PROCESSING = "processing", "Processing"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class Upload(models.Model):
    """What a stored photo and a stored video share: a file and its processing (each names its collection)."""

    key = models.CharField(max_length=24, unique=True, default=new_key, editable=False)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    sha256 = models.CharField(max_length=64)
    # Paths relative to MEDIA_ROOT, derived from the content hash, never from client names.
    file_path = models.CharField(max_length=200)
    original_name = models.CharField(max_length=255, blank=True)
    mime_type = models.CharField(max_length=50)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    byte_size = models.PositiveBigIntegerField()
    status = models.CharField(
        max_length=16, choices=ImageStatus.choices, default=ImageStatus.PENDING
    )
    error = models.TextField(blank=True)
    # When the task was last handed to the broker; NULL while it never was (broker down).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return self.original_name or self.key

    @property
    def is_ready(self) -> bool:
        return self.status == ImageStatus.READY


class Lane(models.TextChoices):
    """Which workers embed a pending image: its own task on the interactive queue, or any batch."""

    INTERACTIVE = "interactive", "Interactive"
    BULK = "bulk", "Bulk"


class Image(Upload):
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="images")
    thumbnail_path = models.CharField(max_length=200, blank=True)
    # Batch tasks claim only bulk rows: a single upload waits for the interactive worker, never
    # for the end of a bulk batch (the reconciler moves it to the bulk lane if its task is lost).
    lane = models.CharField(max_length=16, choices=Lane.choices, default=Lane.BULK)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["collection", "sha256"], name="image_unique_per_collection")
        ]
        indexes = [
            models.Index(fields=["collection", "-created_at"], name="image_collection_recent"),
            models.Index(fields=["status"], name="image_status"),
            models.Index(fields=["sha256"], name="image_sha256"),
        ]

    def get_absolute_url(self) -> str:
        from webapp.links import keyed_url

        return keyed_url("image", self.key)


class ImageTag(models.Model):
    """An ImageNet label the classifier gave an image, with its softmax confidence."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="tags")
    label = models.CharField(max_length=100)
    confidence = models.FloatField()

    class Meta:
        ordering = ["-confidence", "label"]
        constraints = [models.UniqueConstraint(fields=["image", "label"], name="image_tag_unique")]
        indexes = [models.Index(fields=["label"], name="image_tag_label")]

    def __str__(self) -> str:
        return f"{self.label} ({self.confidence:.0%})"


class EmbeddingModel(models.Model):
    """A model version: a backbone (and later a projection) whose vectors are comparable."""

    key = models.CharField(max_length=400, unique=True)
    backbone = models.CharField(max_length=300)  # may name a checkpoint path (small_cnn:…)
    dimensions = models.PositiveIntegerField()
    is_active = models.BooleanField(default=False)
    # The background re-index started from the admin: "", queued, running, done, or the error.
    reindex_state = models.CharField(max_length=500, blank=True)
    reindex_updated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=models.Q(is_active=True), name="one_active_embedding_model"
            )
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def index_name(self) -> str:
        from webapp.vector_index import index_name

        return index_name(self.pk)


class Embedding(models.Model):
    """An image's vector under one model version; a row exists only while the image is searchable."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="embeddings")
    # Indexed by (model_version, collection) below, which also serves lookups by version alone.
    model_version = models.ForeignKey(EmbeddingModel, on_delete=models.PROTECT, related_name="+", db_index=False)
    # A copy of image.collection_id (services keep it in step): the similarity query filters on
    # it inside the one table its index covers, with no join per candidate (docs/search.md).
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+", db_index=False)
    # The raw CNN vector, float32. Untyped so that versions of different dimensions share the
    # table; stored out of line (STORAGE EXTERNAL): only re-ranking refreshes read it.
    vector = VectorField()
    # The vector searches use: `vector` averaged with its nearest neighbours in its own collection
    # (database-side augmentation, SIMILAR_DBA); equal to `vector` when that is off. Half precision
    # (measured: same recall, half the index, faster build; docs/search.md), kept inline in the
    # heap row (STORAGE MAIN) so exact scans do not chase TOAST pointers. Each version has a
    # partial HNSW index over `augmented::halfvec(dim)` (services.embedding_index_build).
    augmented = HalfVectorField()
    # The similarity of `augmented`'s farthest neighbour when it was last refreshed; NULL until
    # then (and after a re-embed). A later refresh recomputes only new rows and the rows that a
    # new one comes closer to than this (services.collection_augment).
    augment_floor = models.FloatField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="embedding_unique_per_version")
        ]
        # Exact scans and the filter-size estimate of filtered searches (webapp.similarity).
        indexes = [models.Index(fields=["model_version", "collection"], name="embedding_version_collection")]

    def __str__(self) -> str:
        return f"{self.image_id} @ {self.model_version_id}"


class ApiToken(models.Model):
    """A bearer token for the JSON API; only its SHA-256 is stored, the token is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, help_text="The token's first characters, to recognise it.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class NearDuplicate(models.Model):
    """Two images of one collection whose raw vectors are closer than NEAR_DUPLICATE_DISTANCE."""

    class Status(models.TextChoices):
        OPEN = "open", "To review"
        DISMISSED = "dismissed", "Not duplicates"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="near_duplicates")
    # The pair in id order (first < second), so a pair is stored once however it was found.
    first = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="+")
    second = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="+")
    distance = models.FloatField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    found_at = models.DateTimeField(auto_now_add=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["distance", "id"]
        constraints = [
            models.UniqueConstraint(fields=["first", "second"], name="near_duplicate_pair_unique"),
            models.CheckConstraint(
                condition=models.Q(first__lt=models.F("second")), name="near_duplicate_pair_ordered"
            ),
        ]
        indexes = [models.Index(fields=["collection", "status"], name="near_duplicate_review")]

    def __str__(self) -> str:
        return f"{self.first_id} ~ {self.second_id} ({self.distance:.3f})"



class Video(Upload):
    """A short video in a collection; searchable through the frames its worker sampled.

    Visibility is its collection's, as for images. Statuses are the images' (pending, processing,
    ready, failed): frames and vectors are written in one transaction as it becomes ready.
    """

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="videos")
    poster_path = models.CharField(max_length=200, blank=True)
    strip_path = models.CharField(max_length=200, blank=True)
    container = models.CharField(max_length=16)  # mp4, mov, webm, gif, webp
    codec = models.CharField(max_length=50, blank=True)
    duration = models.FloatField()  # seconds

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["collection", "sha256"], name="video_unique_per_collection")
        ]
        indexes = [
            models.Index(fields=["collection", "-created_at"], name="video_collection_recent"),
            models.Index(fields=["status"], name="video_status"),
        ]

    def get_absolute_url(self) -> str:
        from webapp.links import keyed_url

        return keyed_url("video", self.key)


class VideoFrame(models.Model):
    """A frame the worker sampled from a video: its time and its small JPEG (a keyframe)."""

    video = models.ForeignKey(Video, on_delete=models.CASCADE, related_name="frames")
    timestamp = models.FloatField()  # seconds from the start
    thumbnail_path = models.CharField(max_length=200)

    class Meta:
        ordering = ["video", "timestamp"]
        constraints = [models.UniqueConstraint(fields=["video", "timestamp"], name="video_frame_unique_time")]

    def __str__(self) -> str:
        return f"{self.video_id} @ {self.timestamp:.2f} s"


class FrameEmbedding(models.Model):
    """A frame's vector under an image model version: what a photo's search compares it with."""

    frame = models.ForeignKey(VideoFrame, on_delete=models.CASCADE, related_name="embeddings")
    # Copies of frame.video_id and video.collection_id: the moment search filters and groups
    # on them inside this one table.
    video = models.ForeignKey(Video, on_delete=models.CASCADE, related_name="+", db_index=False)
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+", db_index=False)
    model_version = models.ForeignKey(EmbeddingModel, on_delete=models.PROTECT, related_name="+", db_index=False)
    vector = HalfVectorField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["frame", "model_version"], name="frame_embedding_unique_per_version")
        ]
        indexes = [models.Index(fields=["model_version", "collection"], name="frame_embedding_version_coll")]


class VideoEncoder(models.Model):
    """A trained recurrent encoder (frame vectors -> one video vector): a video model version.

    `frame_version` is the image model version whose frame vectors it reads. Trained on one
    collection's videos (self-supervised), it then encodes every video with such frame vectors.
    """

    key = models.CharField(max_length=200, unique=True)
    frame_version = models.ForeignKey(EmbeddingModel, on_delete=models.PROTECT, related_name="+")
    trained_on = models.ForeignKey(Collection, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    checkpoint_path = models.CharField(max_length=500)
    dimensions = models.PositiveIntegerField()
    videos_seen = models.PositiveIntegerField(default=0)
    final_loss = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.key


class VideoEmbedding(models.Model):
    """One vector per video and representation: mean-pooled frames (encoder NULL) or an encoder's."""

    video = models.ForeignKey(Video, on_delete=models.CASCADE, related_name="embeddings")
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+", db_index=False)
    frame_version = models.ForeignKey(EmbeddingModel, on_delete=models.PROTECT, related_name="+", db_index=False)
    encoder = models.ForeignKey(VideoEncoder, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    vector = VectorField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["video", "frame_version"], condition=models.Q(encoder__isnull=True),
                name="video_embedding_unique_mean",
            ),
            models.UniqueConstraint(
                fields=["video", "encoder"], condition=models.Q(encoder__isnull=False),
                name="video_embedding_unique_encoder",
            ),
        ]
        indexes = [models.Index(fields=["frame_version", "collection"], name="video_embedding_version_coll")]
