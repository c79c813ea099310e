from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from webapp import services
from webapp.models import ApiToken, Collection, EmbeddingModel, Image


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "owner", "visibility", "created_at")
    fields = ("key", "owner", "name", "description", "visibility", "embed_origins", "created_at", "updated_at")
    list_filter = ("visibility",)
    search_fields = ("name", "owner__username")
    readonly_fields = ("key", "created_at", "updated_at")


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("thumbnail", "__str__", "collection", "status", "error_excerpt", "created_at")
    list_filter = ("status", "collection__visibility")
    search_fields = ("original_name", "key", "sha256", "collection__name")
    readonly_fields = (
        "key", "sha256", "file_path", "thumbnail_path", "mime_type", "width", "height",
        "byte_size", "created_at", "updated_at", "processed_at", "thumbnail",
    )
    actions = ("reembed",)
    list_select_related = ("collection",)

    @admin.display(description="Thumbnail")
    def thumbnail(self, obj: Image) -> str:
        if not obj.thumbnail_path:
            return "—"
        return format_html(
            '<img src="{}" alt="" style="height:48px;border-radius:4px">',
            reverse("media_thumbnail", args=[obj.key]),
        )

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
    list_display = ("key", "backbone", "dimensions", "is_active", "created_at")
    readonly_fields = ("key", "backbone", "dimensions", "created_at")


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
