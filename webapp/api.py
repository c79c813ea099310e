"""The JSON API under /api/v1/: collections, images, similar images and search by image."""

# No `from __future__ import annotations` here: django-ninja reads the endpoint annotations at
# import time to build request parsing and the OpenAPI schema.

from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import TooManyFilesSent
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Field, File, Form, NinjaAPI, Query, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.files import UploadedFile
from ninja.pagination import PageNumberPagination, paginate
from ninja.responses import Status
from ninja.security import HttpBearer

from retrieval.errors import ImageRejected, UploadRejected
from webapp import ratelimit, selectors, services, similarity, videos
from webapp.models import Collection, Image, Video, Visibility


class ApiError(Exception):
    """An error answered as JSON `{"code", "message"}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class TokenAuth(HttpBearer):
    """`Authorization: Bearer sim_…`: a token created on the account page or in the admin."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        row = selectors.api_token_for(token=token)
        if row is None or not row.user.is_active:
            return None
        services.api_token_touch(token=row)
        request.user = row.user
        return row.user


api = NinjaAPI(
    title="Simili API",
    version="1",
    description="Collections, images, similar images and search by image. Reads of public collections "
    "need no token; writes need `Authorization: Bearer <token>`. Errors are `{code, message}`.",
    urls_namespace="api",
    docs_url="/docs",
    openapi_url="/openapi.json",
)


def _error(request: HttpRequest, status: int, code: str, message: str, headers: dict[str, str] | None = None):
    response = api.create_response(request, {"code": code, "message": message}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


@api.exception_handler(ApiError)
def _on_api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return _error(request, exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(ValidationError)
def _on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    details = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'request'}: {err.get('msg')}" for err in exc.errors
    )
    return _error(request, 400, "invalid_request", details or "The request is not valid.")


@api.exception_handler(AuthenticationError)
def _on_auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _error(request, 401, "unauthorized", "Send a valid token: Authorization: Bearer <token>.",
                  {"WWW-Authenticate": "Bearer"})


@api.exception_handler(Http404)
def _on_not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return _error(request, 404, "not_found", str(exc) or "Not found.")


@api.exception_handler(TooManyFilesSent)
def _on_too_many_files(request: HttpRequest, exc: TooManyFilesSent) -> HttpResponse:
    # Django's multipart parser stops at DATA_UPLOAD_MAX_NUMBER_FILES, before images_upload runs.
    return _error(request, 400, "too_many_files", f"At most {settings.MAX_FILES_PER_UPLOAD} files per request.")


@api.exception_handler(HttpError)
def _on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    codes = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
             405: "method_not_allowed", 413: "file_too_large", 429: "rate_limited"}
    return _error(request, exc.status_code, codes.get(exc.status_code, "error"), str(exc))


def _viewer(request: HttpRequest) -> Any:
    """Who is reading: the token's user, else the session's user, else anonymous."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        row = selectors.api_token_for(token=token.strip()) if scheme.lower() == "bearer" else None
        if row is None or not row.user.is_active:
            raise ApiError(401, "invalid_token", "The token is not valid or was revoked.",
                           headers={"WWW-Authenticate": "Bearer"})
        services.api_token_touch(token=row)
        request.user = row.user
        return row.user
    return getattr(request, "user", AnonymousUser())


def _rate_limit(request: HttpRequest, scope: str, rate: tuple[int, int]) -> None:
    wait = ratelimit.retry_after(request, scope=scope, rate=rate)
    if wait is not None:
        raise ApiError(429, "rate_limited", f"Too many requests; try again in {wait} s.",
                       headers={"Retry-After": str(wait)})


def _collection(key: str, viewer: Any) -> Collection:
    return selectors.collection_for_viewer(key=key, viewer=viewer)


def _managed_collection(key: str, viewer: Any) -> Collection:
    collection = _collection(key, viewer)
    if not selectors.can_manage(viewer, collection):
        raise ApiError(403, "forbidden", "Only the collection's owner or an admin may do this.")
    return collection


def _cors(request: HttpRequest, response: HttpResponse, collection: Collection | None) -> HttpResponse:
    """Let the widget read this from other origins: any for public collections (configurable),
    the collection's listed origins otherwise. Never with credentials."""
    origin = request.headers.get("Origin", "").rstrip("/").lower()
    response["Vary"] = "Origin, Authorization, Cookie"
    if not origin or collection is None:
        return response
    if collection.visibility == Visibility.PUBLIC and settings.WIDGET_PUBLIC_ANY_ORIGIN:
        response["Access-Control-Allow-Origin"] = "*"
    elif origin in selectors.embed_origins(collection):
        response["Access-Control-Allow-Origin"] = origin
    return response


def _cacheable(request: HttpRequest, response: HttpResponse, collection: Collection) -> HttpResponse:
    anonymous = not request.headers.get("Authorization") and not request.user.is_authenticated
    if anonymous and collection.visibility == Visibility.PUBLIC:
        # Caches may keep it but must revalidate every time (a cheap 304 by ETag), so a
        # collection made private disappears from them at once.
        response["Cache-Control"] = "public, no-cache"
    else:
        response["Cache-Control"] = "private, no-store"
    return response


# --- schemas -------------------------------------------------------------------------------


class ErrorOut(Schema):
    code: str
    message: str


def _absolute(context: dict[str, Any] | None, path: str) -> str:
    request = (context or {}).get("request")
    return request.build_absolute_uri(path) if request is not None else path


class CollectionOut(Schema):
    key: str
    name: str
    description: str
    visibility: str
    owner: str
    url: str
    created_at: datetime

    @staticmethod
    def resolve_owner(obj: Collection) -> str:
        return str(obj.owner.get_username())

    @staticmethod
    def resolve_url(obj: Collection, context: dict[str, Any]) -> str:
        return _absolute(context, obj.get_absolute_url())


class CollectionIn(Schema):
    name: str
    description: str = ""
    visibility: Literal["public", "unlisted", "private"] = "private"


class CollectionPatch(Schema):
    name: str | None = None
    description: str | None = None
    visibility: Literal["public", "unlisted", "private"] | None = None
    embed_origins: list[str] | None = None


class _UploadOut(Schema):
    """What images and videos share: where they live, what they are, how they are doing."""

    key: str
    collection: str
    name: str
    status: str
    error: str
    mime_type: str
    width: int
    height: int
    byte_size: int
    url: str
    original_url: str
    created_at: datetime
    processed_at: datetime | None

    @staticmethod
    def resolve_collection(obj: Image | Video) -> str:
        return obj.collection.key

    @staticmethod
    def resolve_name(obj: Image | Video) -> str:
        return obj.original_name

    @staticmethod
    def resolve_url(obj: Image | Video, context: dict[str, Any]) -> str:
        return _absolute(context, obj.get_absolute_url())


class ImageOut(_UploadOut):
    thumbnail_url: str | None

    @staticmethod
    def resolve_original_url(obj: Image, context: dict[str, Any]) -> str:
        return _absolute(context, reverse("media_original", args=[obj.key]))

    @staticmethod
    def resolve_thumbnail_url(obj: Image, context: dict[str, Any]) -> str | None:
        if not obj.thumbnail_path:
            return None
        return _absolute(context, reverse("media_thumbnail", args=[obj.key]))


class VideoOut(_UploadOut):
    duration: float = Field(..., description="Seconds")
    poster_url: str | None

    @staticmethod
    def resolve_original_url(obj: Video, context: dict[str, Any]) -> str:
        return _absolute(context, reverse("media_video_original", args=[obj.key]))

    @staticmethod
    def resolve_poster_url(obj: Video, context: dict[str, Any]) -> str | None:
        if not obj.poster_path:
            return None
        return _absolute(context, reverse("media_video_poster", args=[obj.key]))


class FrameOut(Schema):
    timestamp: float = Field(..., description="Seconds from the start of the video")
    url: str = Field(..., description="The video's page, playing from this frame")
    frame_url: str = Field(..., description="The frame as a small JPEG")


class MomentOut(Schema):
    video: VideoOut
    timestamp: float = Field(..., description="Seconds from the start: the best-matching frame")
    similarity: float
    url: str = Field(..., description="The video's page, playing from this moment")
    frame_url: str


class UploadResult(Schema):
    name: str
    outcome: Literal["accepted", "duplicate", "rejected"]
    code: str | None = None
    message: str | None = None
    image: ImageOut | None = None
    video: VideoOut | None = None


class UploadOut(Schema):
    results: list[UploadResult]


class SimilarOut(Schema):
    image: ImageOut
    similarity: float


class SimilarListOut(Schema):
    model: str | None
    results: list[SimilarOut]
    moments: list[MomentOut] = Field(default_factory=list,
                                     description="Videos with a matching moment, one per video, best first")


def _frame_out(request: HttpRequest, video: Video, frame: Any) -> dict[str, Any]:
    return {
        "timestamp": frame.timestamp,
        "url": request.build_absolute_uri(f"{video.get_absolute_url()}?t={frame.timestamp:g}"),
        "frame_url": request.build_absolute_uri(reverse("media_video_frame", args=[video.key, frame.pk])),
    }


def _moments_out(request: HttpRequest, moments: list[videos.Moment]) -> list[dict[str, Any]]:
    return [{"video": m.video, "similarity": m.similarity, **_frame_out(request, m.video, m.frame)} for m in moments]


ERRORS = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut}


class Page(PageNumberPagination):
    """`?page=N` (and optionally `&page_size=M`, at most 500); API_PAGE_SIZE items by default."""

    class Input(Schema):
        # Bounded: an absurd page number would overflow PostgreSQL's OFFSET (found by schemathesis).
        page: int = Field(1, ge=1, le=1_000_000)
        page_size: int | None = Field(None, ge=1, le=500)

    def _get_page_size(self, requested_page_size: int | None) -> int:
        return min(requested_page_size or settings.API_PAGE_SIZE, 500)


# --- collections ---------------------------------------------------------------------------


@api.get("/collections", response=list[CollectionOut], tags=["collections"], summary="List collections")
@paginate(Page)
def collections_list(request: HttpRequest) -> Any:
    """Public collections, plus your own with a token; all for admins."""
    viewer = _viewer(request)
    return selectors.collections_listed_for(viewer).order_by("-created_at")


@api.post("/collections", response={201: CollectionOut, **ERRORS}, auth=TokenAuth(), tags=["collections"])
def collections_create(request: HttpRequest, payload: CollectionIn) -> Any:
    if not payload.name.strip():
        raise ApiError(400, "invalid_request", "name: must not be empty")
    collection = services.collection_create(owner=request.user, **payload.dict())
    return Status(201, collection)


@api.get("/collections/{key}", response={200: CollectionOut, **ERRORS}, tags=["collections"])
def collections_detail(request: HttpRequest, key: str) -> Any:
    collection = _collection(key, _viewer(request))
    return Status(200, collection)


@api.patch("/collections/{key}", response={200: CollectionOut, **ERRORS}, auth=TokenAuth(), tags=["collections"])
def collections_update(request: HttpRequest, key: str, payload: CollectionPatch) -> Any:
    collection = _managed_collection(key, request.user)
    fields = {k: v for k, v in payload.dict().items() if v is not None}
    if "embed_origins" in fields:
        fields["embed_origins"] = "\n".join(fields["embed_origins"])
    if "name" in fields and not fields["name"].strip():
        raise ApiError(400, "invalid_request", "name: must not be empty")
    return Status(200, services.collection_update(collection=collection, **fields))


@api.delete("/collections/{key}", response={204: None, **ERRORS}, auth=TokenAuth(), tags=["collections"])
def collections_delete(request: HttpRequest, key: str) -> Any:
    services.collection_delete(collection=_managed_collection(key, request.user))
    return Status(204, None)


# --- images --------------------------------------------------------------------------------


class ImageFilter(Schema):
    status: Literal["pending", "processing", "ready", "failed"] | None = None


@api.get("/collections/{key}/images", response=list[ImageOut], tags=["images"], summary="List a collection's images")
@paginate(Page)
def images_list(request: HttpRequest, key: str, filters: Query[ImageFilter]) -> Any:
    collection = _collection(key, _viewer(request))
    images = selectors.collection_images(collection=collection).select_related("collection")
    if filters.status:
        images = images.filter(status=filters.status)
    return images


@api.post(
    "/collections/{key}/images",
    response={202: UploadOut, 413: UploadOut, 415: UploadOut, 400: UploadOut, 401: ErrorOut, 403: ErrorOut,
              404: ErrorOut, 429: ErrorOut},
    auth=TokenAuth(),
    tags=["images"],
    summary="Upload one or many images",
)
def images_upload(request: HttpRequest, key: str, files: File[list[UploadedFile]]) -> Any:
    """Each file is validated by content; accepted ones are queued for embedding (status `pending`)."""
    collection = _collection(key, request.user)
    if not selectors.can_upload(request.user, collection):
        raise ApiError(403, "forbidden", "Only the collection's owner uploads into it.")
    if len(files) > settings.MAX_FILES_PER_UPLOAD:
        raise ApiError(400, "too_many_files", f"At most {settings.MAX_FILES_PER_UPLOAD} files per request.")
    _rate_limit(request, "upload", settings.RATE_LIMIT_UPLOAD)
    results: list[dict[str, Any]] = []
    statuses: list[int] = []
    bulk = 0
    for position, upload in enumerate(files):
        name = upload.name or ""
        try:
            data = services.upload_read(upload, size=upload.size or 0)
            if videos.is_video(data):
                made = videos.video_ingest(collection=collection, uploaded_by=request.user, data=data, name=name)
                results.append({"name": name, "outcome": "accepted" if made.created else "duplicate",
                                 "video": made.video})
                statuses.append(202)
                continue
            queue = services.upload_queue(position)
            outcome = services.image_ingest(collection=collection, uploaded_by=request.user, data=data, name=name,
                                            queue=queue)
            bulk += outcome.created and queue is None
        except UploadRejected as exc:
            results.append({"name": name, "outcome": "rejected", "code": exc.code, "message": str(exc)})
            statuses.append(services.rejection_status(exc))
            continue
        results.append({
            "name": name,
            "outcome": "accepted" if outcome.created else "duplicate",
            "image": outcome.image,
        })
        statuses.append(202)
    services.upload_queue_rest(count=bulk)
    status = 202 if 202 in statuses else max(statuses, default=400)
    return Status(status, {"results": results})


@api.get("/images/{key}", response={200: ImageOut, **ERRORS}, tags=["images"])
def images_detail(request: HttpRequest, key: str) -> Any:
    image = selectors.image_for_viewer(key=key, viewer=_viewer(request))
    return Status(200, image)


@api.delete("/images/{key}", response={204: None, **ERRORS}, auth=TokenAuth(), tags=["images"])
def images_delete(request: HttpRequest, key: str) -> Any:
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    if not selectors.can_curate(request.user, image.collection):
        raise ApiError(403, "forbidden", "Only the collection's owner, its editors or an admin may delete its images.")
    services.image_delete(image=image)
    return Status(204, None)


@api.post("/images/{key}/reembed", response={202: ImageOut, **ERRORS}, auth=TokenAuth(), tags=["images"],
          summary="Queue an image for embedding again")
def images_reembed(request: HttpRequest, key: str) -> Any:
    """Retry a failed image (or refresh a ready one); it goes back to `pending`."""
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    if not selectors.can_curate(request.user, image.collection):
        raise ApiError(403, "forbidden", "Only the owner, an editor or an admin may re-embed its images.")
    services.image_reembed(image_ids=[image.pk])
    image.refresh_from_db()
    return Status(202, image)


class SimilarQuery(Schema):
    k: int = 12
    collection: str | None = None


def _collection_ids(key: str | None, viewer: Any) -> list[int] | None:
    if not key:
        return None
    return [_collection(key, viewer).pk]


@api.get("/images/{key}/similar", response={200: SimilarListOut, **ERRORS}, tags=["similar"],
         summary="Images most similar to a stored image")
def images_similar(request: HttpRequest, key: str, query: Query[SimilarQuery]) -> Any:
    """Ranked by cosine similarity among the images the caller may see."""
    viewer = _viewer(request)
    if not 1 <= query.k <= 100:
        raise ApiError(400, "invalid_request", "k: must be between 1 and 100")
    image = selectors.image_for_viewer(key=key, viewer=viewer)
    version = selectors.active_model_version()
    found = similarity.image_results(
        image=image, viewer=viewer, k=query.k, collection_ids=_collection_ids(query.collection, viewer),
        version=version, moments=settings.VIDEO_MOMENTS_K,
    )
    results, moments = found.similar, found.moments
    body = {
        "model": version.key if version else None,
        "results": [{"image": r.image, "similarity": r.similarity} for r in results],
        "moments": _moments_out(request, moments),
    }
    data = SimilarListOut.model_validate(body, context={"request": request}).model_dump(mode="json")
    response = api.create_response(request, data, status=200)
    return _cacheable(request, _cors(request, response, image.collection), image.collection)


@api.post(
    "/search",
    response={200: SimilarListOut, 413: ErrorOut, 415: ErrorOut, 429: ErrorOut, 503: ErrorOut, **ERRORS},
    tags=["similar"],
    summary="Search by an uploaded image",
)
def search(
    request: HttpRequest, image: File[UploadedFile], collection: Form[str | None] = None, k: Form[int] = 12
) -> Any:
    """The query image is embedded by a worker on the interactive queue; nothing is stored."""
    viewer = _viewer(request)
    if not 1 <= k <= 100:
        raise ApiError(400, "invalid_request", "k: must be between 1 and 100")
    collection_ids = _collection_ids(collection, viewer)
    _rate_limit(request, "search", settings.RATE_LIMIT_SEARCH)
    try:
        services.upload_check_size(size=image.size)
        model_key, vector = services.search_vector_for_upload(data=image.read())
    except ImageRejected as exc:
        raise ApiError(services.rejection_status(exc), exc.code, str(exc)) from exc
    except services.SearchUnavailable as exc:
        raise ApiError(503, "search_unavailable", str(exc), headers={"Retry-After": "10"}) from exc
    version = selectors.active_model_version()
    if version is None or version.key != model_key:
        return Status(200, {"model": version.key if version else None, "results": []})
    results = similarity.vector_similar(
        vector=vector, version=version, viewer=viewer, k=k, collection_ids=collection_ids
    )
    moments = videos.moments_for_vector(vector=np.asarray(vector, dtype=np.float32), version=version,
                                        viewer=viewer, k=settings.VIDEO_MOMENTS_K, collection_ids=collection_ids)
    return Status(200, {
        "model": version.key,
        "results": [{"image": r.image, "similarity": r.similarity} for r in results],
        "moments": _moments_out(request, moments),
    })


ImageKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,24}$")]


class ExamplesIn(Schema):
    positive: list[ImageKey] = Field(..., min_length=1, max_length=20, description="Keys of images to look like")
    negative: list[ImageKey] = Field(default_factory=list, max_length=20,
                                     description="Keys of images not to look like")
    k: int = Field(12, ge=1, le=100)
    collection: str | None = None


@api.post("/search/examples", response={200: SimilarListOut, **ERRORS}, tags=["similar"],
          summary="Search by several positive and negative example images")
def search_examples(request: HttpRequest, payload: ExamplesIn) -> Any:
    """The query moves towards the mean of the positives and away from the negatives; the
    examples themselves are left out of the results. Every example must be visible to you."""
    viewer = _viewer(request)
    collection_ids = _collection_ids(payload.collection, viewer)
    version = selectors.active_model_version()
    positives = similarity.images_visible(keys=payload.positive, viewer=viewer)
    negatives = similarity.images_visible(keys=payload.negative, viewer=viewer)
    missing = sorted(set(payload.positive + payload.negative) - {i.key for i in positives + negatives})
    if missing:
        raise ApiError(404, "not_found", f"No such ready image: {', '.join(missing)}")
    try:
        results = similarity.examples_search(positives=positives, negatives=negatives, version=version,
                                             viewer=viewer, k=payload.k, collection_ids=collection_ids)
    except ValueError as exc:  # the examples cancel out
        raise ApiError(400, "invalid_request", str(exc)) from exc
    return Status(200, {
        "model": version.key if version else None,
        "results": [{"image": r.image, "similarity": r.similarity} for r in results],
    })
