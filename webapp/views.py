"""HTML views: each reads like a script of what the page does."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import TooManyFilesSent, ValidationError
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from retrieval import imaging
from retrieval.errors import ImageRejected, UploadRejected
from webapp import duplicates, ratelimit, selectors, services, sharing, similarity, storage, videos
from webapp.forms import CollectionForm, CollectionSettingsForm, EditorAddForm, SearchForm, SignupForm
from webapp.models import Collection, Image, ImageStatus, Video

#: Width of the small thumbnails a phone's two-column grid loads instead of the full ones.
SMALL_THUMBNAIL_SIZE = 200


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """The 400 handler: also reached when the CSRF check parses an over-limit upload first."""
    from django.core.exceptions import TooManyFilesSent

    if isinstance(exception, TooManyFilesSent):
        code, message = "too_many_files", f"Upload at most {settings.MAX_FILES_PER_UPLOAD} files at a time."
    else:
        code, message = "bad_request", "The request could not be understood."
    if request.path.startswith("/api/") or _wants_json(request):
        return JsonResponse({"code": code, "message": message}, status=400)
    return HttpResponse(f"<!doctype html><title>Bad request</title><h1>Bad request</h1><p>{message}</p>", status=400)


def home(request: HttpRequest) -> HttpResponse:
    collections = list(selectors.collections_listed_for(request.user).order_by("-created_at"))
    covers = selectors.collection_covers(collection_ids=[c.pk for c in collections])
    cards = [(c, covers.get(c.pk, [])) for c in collections]
    return render(request, "home.html", {"collections": collections, "cards": cards})


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        messages.success(request, "Welcome to Simili. Create a collection to start.")
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})


@login_required
@require_http_methods(["GET", "POST"])
def collection_create(request: HttpRequest) -> HttpResponse:
    form = CollectionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        collection = services.collection_create(owner=request.user, **form.cleaned_data)
        return redirect(collection)
    return render(request, "collection_form.html", {"form": form})


@require_GET
def collection_detail(request: HttpRequest, key: str) -> HttpResponse:
    collection = selectors.collection_for_viewer(key=key, viewer=request.user)
    sort = request.GET.get("sort", "newest")
    sort = sort if sort in selectors.IMAGE_SORTS else "newest"
    status = request.GET.get("status", "")
    status = status if status in ImageStatus.values else ""
    tag, q = request.GET.get("tag", "")[:100], request.GET.get("q", "")[:100]
    images = selectors.collection_images(collection=collection, sort=sort, status=status, tag=tag, q=q)
    page = Paginator(images, settings.PAGE_SIZE).get_page(request.GET.get("page"))
    # Pager links keep the filters; only `page` changes.
    query = {name: value for name, value in (("sort", sort), ("status", status), ("tag", tag), ("q", q)) if value}
    can_manage = selectors.can_manage(request.user, collection)
    return render(
        request,
        "collection.html",
        {
            "collection": collection,
            "page": page,
            "filters": {"sort": sort, "status": status, "tag": tag, "q": q},
            "filter_query": urlencode(query),
            "sorts": [("newest", "Newest first"), ("oldest", "Oldest first"), ("name", "Name")],
            "statuses": ImageStatus.choices,
            "tags": selectors.collection_tag_counts(collection=collection),
            "can_upload": selectors.can_upload(request.user, collection),
            "can_manage": can_manage,
            "open_duplicates": duplicates.open_duplicate_count(collection=collection) if can_manage else 0,
            "editors": selectors.collection_editors(collection=collection) if can_manage else [],
            "editor_form": EditorAddForm() if can_manage else None,
            "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
            "max_video_bytes": settings.MAX_VIDEO_BYTES,
            "videos": collection.videos.order_by("-created_at", "-id")[:60],
        },
    )


def _managed_collection(request: HttpRequest, key: str) -> Collection:
    """Return the collection if the viewer owns it (or is an admin); 404 to everyone else."""
    collection = selectors.collection_for_viewer(key=key, viewer=request.user)
    if not selectors.can_manage(request.user, collection):
        raise Http404("No such collection.")
    return collection


@login_required
@require_http_methods(["GET", "POST"])
def collection_settings(request: HttpRequest, key: str) -> HttpResponse:
    collection = _managed_collection(request, key)
    form = CollectionSettingsForm(request.POST or None, instance=collection)
    if request.method == "POST" and form.is_valid():
        services.collection_update(collection=collection, **form.cleaned_data)
        messages.success(request, "Collection settings saved.")
        return redirect(collection)
    return render(request, "collection_settings.html", {"collection": collection, "form": form})


@login_required
@require_GET
def collection_duplicates(request: HttpRequest, key: str) -> HttpResponse:
    collection = _managed_collection(request, key)
    groups = duplicates.duplicate_groups(collection=collection)
    return render(request, "duplicates.html", {"collection": collection, "groups": groups,
                                               "threshold": settings.NEAR_DUPLICATE_DISTANCE})


@login_required
@require_POST
def collection_duplicates_keep(request: HttpRequest, key: str) -> HttpResponse:
    collection = _managed_collection(request, key)
    keep = collection.images.filter(key=request.POST.get("image", "")).first()
    if keep is None:
        raise Http404("No such image in this collection.")
    removed = duplicates.duplicate_keep(collection=collection, keep=keep)
    messages.success(request, f"Kept {keep}; deleted {len(removed)} near-duplicate(s).")
    return redirect("collection_duplicates", key=collection.key)


@login_required
@require_POST
def collection_duplicates_dismiss(request: HttpRequest, key: str, pair_id: int) -> HttpResponse:
    collection = _managed_collection(request, key)
    pair = duplicates.duplicate_pair(collection=collection, pair_id=pair_id)
    if pair is None:
        raise Http404("No such pair.")
    duplicates.duplicate_dismiss(pair=pair, reviewer=request.user)
    messages.success(request, "Marked as not duplicates; they will not be proposed again.")
    return redirect("collection_duplicates", key=collection.key)


@login_required
@require_POST
def collection_delete(request: HttpRequest, key: str) -> HttpResponse:
    collection = _managed_collection(request, key)
    name = collection.name
    services.collection_delete(collection=collection)
    messages.success(request, f"Collection {name} deleted with its images.")
    return redirect("home")


@login_required
@require_POST
def collection_editor_add(request: HttpRequest, key: str) -> HttpResponse:
    collection = _managed_collection(request, key)
    form = EditorAddForm(request.POST)
    if form.is_valid():
        try:
            editor = sharing.collection_editor_add(collection=collection, username=form.cleaned_data["username"])
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"{editor.user.get_username()} can now upload to and curate this collection.")
    else:
        messages.error(request, "Enter a username.")
    return redirect(collection)


@login_required
@require_POST
def collection_editor_remove(request: HttpRequest, key: str, user_id: int) -> HttpResponse:
    collection = _managed_collection(request, key)
    if sharing.collection_editor_remove(collection=collection, user_id=user_id):
        messages.success(request, "Editor removed; the collection is no longer shared with them.")
    return redirect(collection)


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


@require_POST
def collection_upload(request: HttpRequest, key: str) -> HttpResponse:
    collection = selectors.collection_for_viewer(key=key, viewer=request.user)
    if not selectors.can_upload(request.user, collection):
        if _wants_json(request):
            return JsonResponse(
                {"code": "forbidden", "message": "Only the owner and editors upload here."}, status=403
            )
        raise Http404("No such collection.")
    wait = ratelimit.retry_after(request, scope="upload", rate=settings.RATE_LIMIT_UPLOAD)
    if wait is not None:
        return _too_many_requests(request, wait)
    try:
        files = request.FILES.getlist("files")
    except TooManyFilesSent:
        files = None  # Django's parser stopped at DATA_UPLOAD_MAX_NUMBER_FILES
    if files is None or len(files) > settings.MAX_FILES_PER_UPLOAD:
        message = f"Upload at most {settings.MAX_FILES_PER_UPLOAD} files at a time."
        if _wants_json(request):
            return JsonResponse({"code": "too_many_files", "message": message}, status=400)
        messages.error(request, message)
        return redirect(collection)
    if not files:
        if _wants_json(request):
            return JsonResponse({"code": "no_files", "message": "Choose at least one image."}, status=400)
        messages.error(request, "Choose at least one image to upload.")
        return redirect(collection)
    results = [_ingest_one(request, collection, upload, position) for position, upload in enumerate(files)]
    services.upload_queue_rest(count=sum(1 for position, r in enumerate(results)
                                         if r["outcome"] == "accepted" and "image" in r
                                         and services.upload_queue(position) is None))
    if _wants_json(request):
        accepted = [r for r in results if r["outcome"] != "rejected"]
        status = 202 if accepted else max(int(str(r["status"])) for r in results)
        return JsonResponse({"results": results}, status=status)
    for result in results:
        if result["outcome"] == "rejected":
            messages.error(request, f"{result['name']}: {result['message']}")
    accepted_count = sum(1 for r in results if r["outcome"] == "accepted")
    duplicates = sum(1 for r in results if r["outcome"] == "duplicate")
    if accepted_count:
        messages.success(request, f"{accepted_count} image(s) uploaded; they are being processed.")
    if duplicates:
        messages.info(request, f"{duplicates} image(s) were already in this collection.")
    return redirect(collection)


def _too_many_requests(request: HttpRequest, wait: int) -> HttpResponse:
    message = f"Too many requests; try again in {wait} s."
    response: HttpResponse
    if _wants_json(request):
        response = JsonResponse({"code": "rate_limited", "message": message}, status=429)
    else:
        response = render(request, "429.html", {"message": message}, status=429)
    response["Retry-After"] = str(wait)
    return response


def _ingest_one(request: HttpRequest, collection: Collection, upload: object, position: int) -> dict[str, object]:
    name = str(getattr(upload, "name", ""))
    size = int(getattr(upload, "size", 0))
    try:
        data = services.upload_read(upload, size=size)
        if videos.is_video(data):
            made = videos.video_ingest(collection=collection, uploaded_by=request.user, data=data, name=name)
            return {"name": name, "outcome": "accepted" if made.created else "duplicate",
                    "video": _video_json(made.video), "status": 202}
        result = services.image_ingest(collection=collection, uploaded_by=request.user, data=data, name=name,
                                       queue=services.upload_queue(position))
    except UploadRejected as exc:
        return {
            "name": name,
            "outcome": "rejected",
            "code": exc.code,
            "message": str(exc),
            "status": services.rejection_status(exc),
        }
    return {
        "name": name,
        "outcome": "accepted" if result.created else "duplicate",
        "image": _image_json(result.image),
        "status": 202,
    }


def _video_json(video: Video) -> dict[str, object]:
    return {"key": video.key, "status": video.status, "error": video.error, "url": video.get_absolute_url(),
            "duration": video.duration}


def _image_json(image: Image) -> dict[str, object]:
    return {
        "key": image.key,
        "status": image.status,
        "error": image.error,
        "url": image.get_absolute_url(),
        "thumbnail_url": reverse("media_thumbnail", args=[image.key]) if image.thumbnail_path else None,
    }


@require_GET
def collection_status(request: HttpRequest, key: str) -> JsonResponse:
    collection = selectors.collection_for_viewer(key=key, viewer=request.user)
    keys = [k for k in request.GET.get("keys", "").split(",") if k]
    images = selectors.images_status(collection=collection, keys=keys)
    response = JsonResponse({"images": [_image_json(image) for image in images]})
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def image_detail(request: HttpRequest, key: str) -> HttpResponse:
    image = selectors.image_for_viewer(key=key, viewer=request.user)

    def section(found: similarity.ImageResults) -> str:
        # No request here: the HTML is cached for every viewer with the same visible collections.
        return render_to_string("_similar_section.html",
                                {"image": image, "similar": found.similar, "moments": found.moments})

    html = similarity.image_section(image=image, viewer=request.user, moments=settings.VIDEO_MOMENTS_K,
                                    render=section)
    newer, older = selectors.image_neighbours(image=image)
    return render(
        request,
        "image.html",
        {
            "image": image,
            "similar_section": mark_safe(html),  # noqa: S308 — rendered by the template above, escaped there
            "tags": selectors.image_tags(image=image),
            "previous": newer,
            "next": older,
            "uploader": image.uploaded_by.get_username() if image.uploaded_by else "",
            "can_curate": selectors.can_curate(request.user, image.collection),
        },
    )


def _curated_image(request: HttpRequest, key: str) -> Image:
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    if not selectors.can_curate(request.user, image.collection):
        raise Http404("No such image.")
    return image


@login_required
@require_POST
def image_reembed(request: HttpRequest, key: str) -> HttpResponse:
    image = _curated_image(request, key)
    services.image_reembed(image_ids=[image.pk])
    messages.success(request, "The image is queued for processing again.")
    return redirect(image)


@login_required
@require_POST
def image_delete(request: HttpRequest, key: str) -> HttpResponse:
    image = _curated_image(request, key)
    collection = image.collection
    services.image_delete(image=image)
    messages.success(request, "Image deleted.")
    return redirect(collection)


@require_GET
def tag_detail(request: HttpRequest, label: str) -> HttpResponse:
    page = Paginator(selectors.tag_images(label=label, viewer=request.user), settings.PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    return render(request, "tag.html", {"label": label, "page": page})


def _media_response(request: HttpRequest, relative: str, content_type: str) -> FileResponse:
    try:
        handle = storage.media_path(relative).open("rb")
    except (FileNotFoundError, ValueError):
        raise Http404("No such file.") from None
    return private_media_headers(FileResponse(handle, content_type=content_type))


def private_media_headers(response: HttpResponse) -> HttpResponse:
    """Headers of every stored file served: never sniffed, never run, not kept by shared caches."""
    response["X-Content-Type-Options"] = "nosniff"
    # Private media must not sit in shared caches; browsers may keep it briefly.
    response["Cache-Control"] = "private, max-age=300"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


@require_GET
def media_original(request: HttpRequest, key: str) -> FileResponse:
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    return _media_response(request, image.file_path, image.mime_type)


@require_GET
def media_thumbnail(request: HttpRequest, key: str) -> FileResponse:
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    if not image.thumbnail_path:
        raise Http404("The thumbnail is not ready yet.")
    return _media_response(request, image.thumbnail_path, "image/jpeg")


@require_GET
def media_thumbnail_small(request: HttpRequest, key: str) -> FileResponse:
    """A half-size thumbnail, made from the stored one on first request and kept beside it."""
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    if not image.thumbnail_path:
        raise Http404("The thumbnail is not ready yet.")
    relative = "thumbnails-small/" + image.thumbnail_path.split("/", 1)[1]
    if not storage.media_path(relative).exists():
        try:
            source = storage.media_path(image.thumbnail_path).read_bytes()
        except (FileNotFoundError, ValueError):
            raise Http404("No such file.") from None
        storage.write_atomic(relative, _shrink_jpeg(source, SMALL_THUMBNAIL_SIZE))
    return _media_response(request, relative, "image/jpeg")


def _shrink_jpeg(data: bytes, size: int) -> bytes:
    import io

    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as picture:
        picture.draft("RGB", (size, size))  # JPEG decodes at a reduced scale: cheaper than a full decode
        # Its colour profile kept; a stored thumbnail already this small is served as it is.
        return imaging.make_thumbnail(picture.convert("RGB"), max_side=size, source=data, quality=82)


@login_required
@require_http_methods(["GET", "POST"])
def account_tokens(request: HttpRequest) -> HttpResponse:
    created = None
    if request.method == "POST":
        _, created = services.api_token_create(user=request.user, name=request.POST.get("name", ""))
    tokens = selectors.api_tokens_of(user=request.user)
    response = render(request, "account_tokens.html", {"tokens": tokens, "created": created})
    response["Cache-Control"] = "no-store"  # the new token is on this page once
    return response


@login_required
@require_POST
def account_token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = selectors.api_tokens_of(user=request.user).filter(pk=token_id).first()
    if token is None:
        raise Http404("No such token.")
    services.api_token_revoke(token=token)
    messages.success(request, f"Token {token.name} revoked.")
    return redirect("account_tokens")


@require_http_methods(["GET", "POST"])
def search(request: HttpRequest) -> HttpResponse:
    collections = list(selectors.collections_searchable_by(request.user))
    form = SearchForm(request.POST or None, request.FILES or None, collections=collections)
    context: dict[str, object] = {"form": form, "results": None}
    status = 200
    if request.method == "GET" and request.GET.getlist("positive"):
        return _search_examples(request, context)
    if request.method == "POST":
        wait = ratelimit.retry_after(request, scope="search", rate=settings.RATE_LIMIT_SEARCH)
        if wait is not None:
            return _too_many_requests(request, wait)
    if request.method == "POST" and form.is_valid():
        chosen = form.cleaned_data.get("collection")
        collection_ids = [form.collections[chosen].pk] if chosen else None
        upload = form.cleaned_data["image"]
        try:
            services.upload_check_size(size=upload.size)
            model_key, vector = services.search_vector_for_upload(data=upload.read())
            version = selectors.active_model_version()
            if version is None or version.key != model_key:
                context["results"] = []
            else:
                context["results"] = similarity.vector_similar(
                    vector=vector, version=version, viewer=request.user,
                    k=settings.SIMILAR_K, collection_ids=collection_ids,
                )
                context["moments"] = videos.moments_for_vector(
                    vector=np.asarray(vector, dtype=np.float32), version=version, viewer=request.user,
                    k=settings.VIDEO_MOMENTS_K, collection_ids=collection_ids,
                )
        except ImageRejected as exc:
            form.add_error("image", str(exc))
            status = services.rejection_status(exc)
        except services.SearchUnavailable as exc:
            context["unavailable"] = str(exc)
            status = 503
    elif request.method == "POST":
        status = 400
    return render(request, "search.html", context, status=status)


def _search_examples(request: HttpRequest, context: dict[str, object]) -> HttpResponse:
    """Relevance feedback: ?positive=KEY&negative=KEY…, refined by the links beside each result."""
    positives = similarity.images_visible(keys=request.GET.getlist("positive")[:20], viewer=request.user)
    negatives = similarity.images_visible(keys=request.GET.getlist("negative")[:20], viewer=request.user)
    results = []
    try:
        results = similarity.examples_search(positives=positives, negatives=negatives,
                                             version=selectors.active_model_version(), viewer=request.user,
                                             k=settings.SIMILAR_K)
    except ValueError as exc:  # the examples cancel out
        context["unavailable"] = str(exc)
    keys = {"positive": [i.key for i in positives], "negative": [i.key for i in negatives]}
    context.update(
        positives=positives, negatives=negatives, results=results,
        refine=[(result, urlencode({**keys, "positive": [*keys["positive"], result.image.key]}, doseq=True),
                 urlencode({**keys, "negative": [*keys["negative"], result.image.key]}, doseq=True))
                for result in results],
    )
    return render(request, "search.html", context)


