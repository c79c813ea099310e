from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.html import format_html

from webapp import curation, duplicates, embeddings, services, videos
from webapp.forms import MoveImagesForm
from webapp.models import (
    ApiToken,
    Collection,
    CollectionEditor,
    EmbeddingModel,
    Image,
    ImageStatus,
    NearDuplicate,
    Video,
    VideoEncoder,
)


def _thumbnail_html(key: str, height: int = 48) -> str:
    return format_html(
        '<img src="{}" alt="" loading="lazy" style="height:{}px;width:{}px;object-fit:cover;border-radius:4px">',
        reverse("media_thumbnail", args=[key]), height, height,
    )


class CollectionEditorInline(admin.TabularInline):  # type: ignore[type-arg]
    model = CollectionEditor
    extra = 0
    autocomplete_fields = ("user",)
    readonly_fields = ("added_at",)


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("cover", "name", "owner", "visibility", "images", "ready", "failed", "editor_count", "created_at")
    list_display_links = ("name",)
    fields = ("key", "owner", "name", "description", "visibility", "embed_origins", "created_at", "updated_at")
    list_filter = ("visibility", "created_at")
    search_fields = ("name", "owner__username", "key")
    readonly_fields = ("key", "created_at", "updated_at")
    inlines = (CollectionEditorInline,)
    list_select_related = ("owner",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Collection]:
        return super().get_queryset(request).annotate(
            image_total=Count("images", distinct=True),
            ready_total=Count("images", filter=Q(images__status=ImageStatus.READY), distinct=True),
            failed_total=Count("images", filter=Q(images__status=ImageStatus.FAILED), distinct=True),
            editor_total=Count("editor_links", distinct=True),
            cover_key=Subquery(
                Image.objects.filter(collection=OuterRef("pk"), status=ImageStatus.READY)
                .exclude(thumbnail_path="").order_by("-created_at", "-id").values("key")[:1]
            ),
        )

    @admin.display(description="Cover")
    def cover(self, obj: Collection) -> str:
        key = getattr(obj, "cover_key", None)
        return _thumbnail_html(key, 40) if key else "—"

    @admin.display(description="Images", ordering="image_total")
    def images(self, obj: Collection) -> int:
        return obj.image_total  # type: ignore[attr-defined]

    @admin.display(description="Ready", ordering="ready_total")
    def ready(self, obj: Collection) -> int:
        return obj.ready_total  # type: ignore[attr-defined]

    @admin.display(description="Failed", ordering="failed_total")
    def failed(self, obj: Collection) -> int:
        return obj.failed_total  # type: ignore[attr-defined]

    @admin.display(description="Editors", ordering="editor_total")
    def editor_count(self, obj: Collection) -> int:
        return obj.editor_total  # type: ignore[attr-defined]

    def delete_model(self, request: HttpRequest, obj: Collection) -> None:
        services.collection_delete(collection=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Collection]) -> None:
        for collection in queryset:
            services.collection_delete(collection=collection)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("thumbnail", "__str__", "collection", "status", "error_excerpt", "model_versions", "tag_list",
                    "created_at")
    list_filter = ("status", "collection__visibility", "embeddings__model_version", "mime_type")
    search_fields = ("original_name", "key", "sha256", "collection__name", "tags__label", "error")
    # The collection changes only through the Move action, which moves the vectors and pairs
    # with it (a vector left behind would show the image to its old collection's viewers);
    # the status is the workers' (Re-embed queues an image again).
    readonly_fields = (
        "key", "collection", "status", "sha256", "file_path", "thumbnail_path", "mime_type", "width", "height",
        "byte_size", "created_at", "updated_at", "processed_at", "thumbnail",
    )
    actions = ("reembed", "move")
    list_select_related = ("collection",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Image]:
        return super().get_queryset(request).prefetch_related("embeddings__model_version", "tags")

    @admin.display(description="Thumbnail")
    def thumbnail(self, obj: Image) -> str:
        if not obj.thumbnail_path:
            return "—"
        return _thumbnail_html(obj.key)

    @admin.display(description="Model version")
    def model_versions(self, obj: Image) -> str:
        return ", ".join(e.model_version.key for e in obj.embeddings.all()) or "—"

    @admin.display(description="Tags")
    def tag_list(self, obj: Image) -> str:
        return ", ".join(tag.label for tag in obj.tags.all()) or "—"

    @admin.action(description="Move selected images to another collection…")
    def move(self, request: HttpRequest, queryset: QuerySet[Image]) -> HttpResponse | None:
        form = MoveImagesForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            target = form.cleaned_data["target"]
            summary = curation.images_move(image_ids=list(queryset.values_list("pk", flat=True)), target=target)
            self.message_user(request, f"{len(summary.moved)} image(s) moved to {target}.", messages.SUCCESS)
            if summary.duplicates:
                names = ", ".join(str(image) for image in summary.duplicates[:20])
                self.message_user(
                    request,
                    f"{len(summary.duplicates)} image(s) skipped: {target} already holds the same file ({names}).",
                    messages.WARNING,
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Move images to another collection",
            "images": queryset.select_related("collection"),
            "form": form,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "opts": self.model._meta,
        }
        return render(request, "admin/simili_move.html", context)

    @admin.display(description="Error")
    def error_excerpt(self, obj: Image) -> str:
        return obj.error[:80]

    @admin.action(description="Re-embed selected images")
    def reembed(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        count = services.image_reembed(image_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} image(s) queued for embedding.", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        services.image_delete(image=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        for image in queryset:
            services.image_delete(image=image)


@admin.register(EmbeddingModel)
class EmbeddingModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("key", "backbone", "dimensions", "is_active", "coverage", "indexed", "reindex_state",
                    "created_at")
    readonly_fields = ("key", "backbone", "dimensions", "is_active", "reindex_state", "reindex_updated_at",
                       "created_at")
    actions = ("reindex", "activate", "drop")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a version is registered by the workers' recipe (EMBEDDING_*), not typed in

    def has_delete_permission(self, request: HttpRequest, obj: EmbeddingModel | None = None) -> bool:
        return False  # dropping goes through the "drop" action, which refuses the active version

    @admin.display(description="Images with a vector")
    def coverage(self, obj: EmbeddingModel) -> str:
        covered, total = embeddings.embedding_model_coverage(version=obj)
        return f"{covered} / {total} ({covered / total:.0%})" if total else "0 / 0"

    @admin.display(description="HNSW index", boolean=True)
    def indexed(self, obj: EmbeddingModel) -> bool:
        return embeddings.embedding_index_exists(version=obj)

    @admin.action(description="Re-index every image with the selected version, in the background")
    def reindex(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        for version in queryset:
            embeddings.embedding_model_reindex_start(version=version)
        self.message_user(request, f"{queryset.count()} re-index(es) queued on the bulk workers; "
                                   "this page shows their progress.", messages.SUCCESS)

    @admin.action(description="Drop the selected inactive versions (their vectors and index)")
    def drop(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        for version in queryset:
            try:
                removed = embeddings.embedding_model_drop(version=version)
            except ValueError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            self.message_user(request, f"Dropped {version.key} ({removed} vectors).", messages.SUCCESS)

    @admin.action(description="Make the selected version the one searches use")
    def activate(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version.", messages.ERROR)
            return
        try:
            embeddings.embedding_model_activate(version=queryset.get())
        except ValueError as exc:
            self.message_user(request, f"{exc} (manage.py reindex).", messages.ERROR)
            return
        self.message_user(request, "Searches now use this version.", messages.SUCCESS)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    actions = ("revoke",)

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("user", "name")
        return ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        return () if obj is None else ("user", "prefix", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request: HttpRequest, obj: ApiToken, form: object, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        row, token = services.api_token_create(user=obj.user, name=obj.name)
        obj.pk = row.pk
        self.message_user(request, f"Token for {obj.user}: {token} (copy it now; it is not shown again)",
                          messages.WARNING)

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset:
            services.api_token_revoke(token=token)
        self.message_user(request, f"{queryset.count()} token(s) revoked.", messages.SUCCESS)


@admin.register(NearDuplicate)
class NearDuplicateAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("first", "second", "collection", "distance", "status", "reviewed_by", "reviewed_at")
    list_filter = ("status", "collection")
    readonly_fields = ("collection", "first", "second", "distance", "found_at", "reviewed_by", "reviewed_at")
    list_select_related = ("first", "second", "collection", "reviewed_by")
    actions = ("dismiss",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # pairs are found by the collection refresh

    @admin.action(description="Mark the selected pairs as not duplicates")
    def dismiss(self, request: HttpRequest, queryset: QuerySet[NearDuplicate]) -> None:
        for pair in queryset:
            duplicates.duplicate_dismiss(pair=pair, reviewer=request.user)
        self.message_user(request, f"{queryset.count()} pair(s) dismissed.", messages.SUCCESS)



@admin.register(Video)
class VideoAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("__str__", "collection", "status", "duration", "frame_count", "created_at")
    list_filter = ("status", "container")
    search_fields = ("original_name", "key", "collection__name")
    readonly_fields = ("key", "collection", "uploaded_by", "sha256", "file_path", "poster_path", "strip_path",
                       "mime_type", "container", "codec", "width", "height", "duration", "byte_size", "status",
                       "error", "attempts", "enqueued_at", "created_at", "updated_at", "processed_at")
    fields = ("original_name", *readonly_fields)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Video]:
        return super().get_queryset(request).select_related("collection").annotate(n_frames=Count("frames"))

    @admin.display(description="keyframes", ordering="n_frames")
    def frame_count(self, obj: Video) -> int:
        return int(getattr(obj, "n_frames", 0))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # videos arrive through the upload form or the API, validated

    def delete_model(self, request: HttpRequest, obj: Video) -> None:
        videos.video_delete(video=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Video]) -> None:
        for video in queryset:
            videos.video_delete(video=video)


@admin.register(VideoEncoder)
class VideoEncoderAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("key", "frame_version", "trained_on", "videos_seen", "final_loss", "created_at")
    readonly_fields = ("key", "frame_version", "trained_on", "checkpoint_path", "dimensions", "videos_seen",
                       "final_loss", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # made by manage.py train_video_encoder
