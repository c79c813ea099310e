"""Reads: what a viewer may see, and the similar-image queries."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.http import Http404

from webapp.models import (
    ApiToken,
    Collection,
    CollectionEditor,
    EmbeddingModel,
    Image,
    ImageStatus,
    ImageTag,
    Visibility,
)


class Viewer(Protocol):
    """A signed-in user or Django's AnonymousUser: what every access rule reads."""

    pk: Any
    is_authenticated: bool
    is_staff: bool
    is_superuser: bool


def is_admin(viewer: Viewer) -> bool:
    return bool(viewer.is_authenticated and (viewer.is_staff or viewer.is_superuser))


def collections_listed_for(viewer: Viewer) -> QuerySet[Collection]:
    """Return the collections listed to a viewer: public ones, their own, all for admins."""
    queryset = Collection.objects.select_related("owner").annotate(
        image_count=Count("images", distinct=True),
        ready_count=Count("images", filter=Q(images__status=ImageStatus.READY), distinct=True),
    )
    if is_admin(viewer):
        return queryset
    return queryset.filter(listed_filter(viewer))


def listed_filter(viewer: Viewer, prefix: str = "") -> Q:
    """Public, owned or shared with the viewer: the rule for listings and similar results."""
    visible = Q(**{f"{prefix}visibility": Visibility.PUBLIC})
    if viewer.is_authenticated:
        # A subquery, not a join: a join on editors would multiply the image counts.
        shared = CollectionEditor.objects.filter(user_id=viewer.pk).values("collection_id")
        visible |= Q(**{f"{prefix}owner_id": viewer.pk}) | Q(**{f"{prefix}pk__in": shared})
    return visible


def is_editor(viewer: Viewer, collection: Collection) -> bool:
    """Whether the owner shared this collection with the viewer as an editor."""
    if not viewer.is_authenticated:
        return False
    return CollectionEditor.objects.filter(collection_id=collection.pk, user_id=viewer.pk).exists()


def collection_editors(*, collection: Collection) -> QuerySet[CollectionEditor]:
    """Return a collection's editors, in the order they were added."""
    return CollectionEditor.objects.filter(collection=collection).select_related("user")


def collections_searchable_by(viewer: Viewer) -> QuerySet[Collection]:
    """Return the collections whose images may appear as similar results to a viewer."""
    return collections_listed_for(viewer).order_by("name")


def can_view_collection(viewer: Viewer, collection: Collection) -> bool:
    """Public and unlisted collections are viewable by link; private ones by owner, editors and admins."""
    if collection.visibility in (Visibility.PUBLIC, Visibility.UNLISTED):
        return True
    return can_manage(viewer, collection) or is_editor(viewer, collection)


def can_manage(viewer: Viewer, collection: Collection) -> bool:
    """The owner and admins change a collection's settings and editors, or delete it."""
    return is_admin(viewer) or bool(viewer.is_authenticated and collection.owner_id == viewer.pk)


def can_curate(viewer: Viewer, collection: Collection) -> bool:
    """The owner, editors and admins delete a collection's images or queue them again."""
    return can_manage(viewer, collection) or is_editor(viewer, collection)


def api_token_for(*, token: str) -> ApiToken | None:
    """Return the active token row matching a presented bearer token, or None."""
    import hashlib

    digest = hashlib.sha256(token.encode()).hexdigest()
    return ApiToken.objects.select_related("user").filter(digest=digest, revoked_at__isnull=True).first()


def api_tokens_of(*, user: Viewer) -> QuerySet[ApiToken]:
    """Return a user's tokens, newest first, revoked ones included."""
    return ApiToken.objects.filter(user_id=user.pk)


def embed_origins(collection: Collection) -> set[str]:
    """Return the origins allowed to embed a collection's widget, normalised."""
    return {line.strip().rstrip("/").lower() for line in collection.embed_origins.splitlines() if line.strip()}


def can_upload(viewer: Viewer, collection: Collection) -> bool:
    """A collection's owner and its editors upload into it."""
    if not viewer.is_authenticated:
        return False
    return collection.owner_id == viewer.pk or is_editor(viewer, collection)


def collection_for_viewer(*, key: str, viewer: Viewer) -> Collection:
    """Return the collection, or raise 404 if it does not exist or the viewer may not see it."""
    collection = Collection.objects.select_related("owner").filter(key=key).first()
    if collection is None or not can_view_collection(viewer, collection):
        # 404, not 403: a private collection's existence is itself private.
        raise Http404("No such collection.")
    return collection


def image_for_viewer(*, key: str, viewer: Viewer) -> Image:
    """Return the image, or raise 404 if it does not exist or the viewer may not see it."""
    found = images_loaded(key=key, uploader=True)
    if not found or not can_view_collection(viewer, found[0].collection):
        raise Http404("No such image.")
    return found[0]


def _columns(model: Any, alias: str = "") -> tuple[str, list[str]]:
    """A model's concrete columns for a SELECT (under a table alias) and their attribute names, for `from_db`."""
    prefix = f"{alias}." if alias else ""
    fields = model._meta.concrete_fields
    return ", ".join(f'{prefix}"{f.column}"' for f in fields), [f.attname for f in fields]


@functools.cache
def _image_loader(uploader: bool) -> tuple[str, list[list[str]]]:
    """The SELECT of images joined to their collections (and uploaders), and each model's attribute names."""
    user = get_user_model()
    parts = [_columns(Image, "i"), _columns(Collection, "c")] + ([_columns(user, "u")] if uploader else [])
    sql = (f"SELECT {', '.join(columns for columns, _ in parts)} FROM {Image._meta.db_table} i "
           f"JOIN {Collection._meta.db_table} c ON c.id = i.collection_id")
    if uploader:
        sql += f' LEFT JOIN {user._meta.db_table} u ON u."{user._meta.pk.column}" = i.uploaded_by_id'
    return sql, [names for _, names in parts]


def images_loaded(*, ids: Sequence[int] = (), key: str | None = None, uploader: bool = False) -> list[Image]:
    """Return the images with these ids (or this key), their collections (and uploaders) loaded.

    What `select_related("collection"[, "uploaded_by"])` gives, through one statement and
    `Model.from_db` as the ORM builds rows, without compiling a queryset: on an image page
    that compiling cost more than PostgreSQL's answer (docs/benchmarks.md#pages-hit). None of
    the three models has a field that converts its database value (tests/test_similar_sql.py
    checks the objects equal the ORM's).
    """
    sql, names = _image_loader(uploader)
    where, params = ("i.key = %s", [key]) if key is not None else ("i.id = ANY(%s)", [[int(i) for i in ids]])
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} WHERE {where}", params)
        rows = cursor.fetchall()
    user = get_user_model()
    collection_field, uploader_field = Image._meta.get_field("collection"), Image._meta.get_field("uploaded_by")
    first, second = len(names[0]), len(names[0]) + len(names[1])
    user_pk = second + (names[2].index(user._meta.pk.attname) if uploader else 0)
    images = []
    for row in rows:
        image = Image.from_db(connection.alias, names[0], row[:first])
        collection_field.set_cached_value(image, Collection.from_db(connection.alias, names[1], row[first:second]))
        if uploader:  # the joined row, not the column: a dangling id reads as no uploader, as the ORM's would
            found = row[user_pk] is not None
            uploader_field.set_cached_value(image, user.from_db(connection.alias, names[2], row[second:])
                                            if found else None)
        images.append(image)
    return images


#: Orders a collection page offers, by the value of its `?sort=`.
IMAGE_SORTS = {"newest": ("-created_at", "-id"), "oldest": ("created_at", "id"), "name": ("original_name", "id")}


def collection_images(
    *, collection: Collection, sort: str = "newest", status: str = "", tag: str = "", q: str = ""
) -> QuerySet[Image]:
    """Return a collection's images in a listed order, optionally by status, tag and text."""
    images = collection.images.order_by(*IMAGE_SORTS.get(sort, IMAGE_SORTS["newest"]))
    if status in ImageStatus.values:
        images = images.filter(status=status)
    if tag:
        images = images.filter(tags__label=tag)
    if q.strip():
        text = q.strip()[:100]
        tagged = ImageTag.objects.filter(label__icontains=text).values("image_id")
        images = images.filter(Q(original_name__icontains=text) | Q(pk__in=tagged))
    return images


#: Thumbnails in a collection's cover mosaic on the home page.
COVER_SIZE = 4


def collection_covers(*, collection_ids: Sequence[int]) -> dict[int, list[Image]]:
    """Return up to COVER_SIZE newest ready images of each collection (one query, a window)."""
    from django.db.models import F, Window
    from django.db.models.functions import RowNumber

    rows = (
        Image.objects.filter(collection_id__in=list(collection_ids), status=ImageStatus.READY)
        .exclude(thumbnail_path="")
        .annotate(rank=Window(RowNumber(), partition_by=F("collection_id"), order_by=[F("created_at").desc(),
                                                                                       F("id").desc()]))
        .filter(rank__lte=COVER_SIZE)
        .only("key", "collection_id", "original_name", "thumbnail_path")
    )
    covers: dict[int, list[Image]] = {}
    for image in rows:
        covers.setdefault(image.collection_id, []).append(image)
    return covers


def collection_tag_counts(*, collection: Collection, limit: int = 24) -> list[tuple[str, int]]:
    """Return the collection's most used tags with how many images carry each."""
    rows = (
        ImageTag.objects.filter(image__collection=collection)
        .values("label")
        .annotate(n=Count("image_id"))
        .order_by("-n", "label")[:limit]
    )
    return [(row["label"], row["n"]) for row in rows]


def image_tags(*, image: Image) -> list[ImageTag]:
    """Return an image's auto-tags, most confident first."""
    return list(image.tags.all())


def image_neighbours(*, image: Image) -> tuple[Image | None, Image | None]:
    """Return the previous (newer) and next (older) image of its collection, in page order."""
    # One statement for both: a page view pays one round trip, not two compiled ORM queries.
    side = ("(SELECT %s AS side, id, key, original_name FROM simili_image WHERE collection_id = %s "
            "AND (created_at, id) {} (%s, %s) ORDER BY created_at {}, id {} LIMIT 1)")
    sql = f"{side.format('>', 'ASC', 'ASC')} UNION ALL {side.format('<', 'DESC', 'DESC')}"
    found = {row.side: row for row in Image.objects.raw(
        sql, ["newer", image.collection_id, image.created_at, image.pk,
              "older", image.collection_id, image.created_at, image.pk])}
    return found.get("newer"), found.get("older")


def tag_images(*, label: str, viewer: Viewer) -> QuerySet[Image]:
    """Return the ready images with a tag among those that may be shown to the viewer as results."""
    images = Image.objects.filter(tags__label=label, status=ImageStatus.READY).select_related("collection")
    if not is_admin(viewer):
        images = images.filter(listed_filter(viewer, prefix="collection__"))
    return images.order_by("-created_at", "-id")


def images_per_status() -> dict[str, int]:
    """Return how many images are in each status, every status present."""
    counts = dict(Image.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    return {status: int(counts.get(status, 0)) for status in ImageStatus.values}


def images_failed(*, limit: int = 100) -> QuerySet[Image]:
    """Return the failed images, most recently processed first, with their errors."""
    return Image.objects.filter(status=ImageStatus.FAILED).select_related("collection").order_by(
        "-processed_at", "-id"
    )[:limit]


def images_status(*, collection: Collection, keys: Sequence[str]) -> list[Image]:
    """Return the listed images of a collection, for the live status poll."""
    return list(collection.images.filter(key__in=list(keys)[:500]))


def active_model_version() -> EmbeddingModel | None:
    """Return the model version whose vectors searches use, or None before any exists.

    Read on every search and image page, so plain SQL: the queryset's compiling was most of it.
    """
    columns, names = _columns(EmbeddingModel)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns} FROM {EmbeddingModel._meta.db_table} WHERE is_active LIMIT 1")
        row = cursor.fetchone()
    return None if row is None else EmbeddingModel.from_db(connection.alias, names, row)
