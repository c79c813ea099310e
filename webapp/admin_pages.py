"""Staff pages beside the model admin: the index health page, the zip import, a collection's GAN."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib import admin, messages
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from webapp import embeddings, gan_runs, imports, selectors, services
from webapp.forms import ZipImportForm
from webapp.models import Collection

logger = logging.getLogger(__name__)

#: Celery queues whose backlog the health page shows (services.INTERACTIVE_QUEUE, services.BULK_QUEUE).
QUEUES = (services.INTERACTIVE_QUEUE, services.BULK_QUEUE)
#: Seconds the health page waits for workers to answer a ping: the page must stay quick.
PING_TIMEOUT = 0.5


def _queue_lengths() -> dict[str, int | None]:
    """Return each queue's waiting messages (Redis LLEN), None when the broker does not answer."""
    from webapp.celery import app

    lengths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as connection:
            client = connection.default_channel.client
            for name in QUEUES:
                lengths[name] = int(client.llen(name))
    except Exception as exc:  # noqa: BLE001 - a health page reports a broker outage, never raises it
        logger.warning("health page could not read the queues: %s", exc)
        lengths = {name: None for name in QUEUES}
    return lengths


def _workers() -> list[str]:
    """Return the names of the workers that answered a ping (empty: no answer)."""
    from webapp.celery import app

    try:
        replies = app.control.ping(timeout=PING_TIMEOUT) or []
    except Exception as exc:  # noqa: BLE001 - as above
        logger.warning("health page could not ping the workers: %s", exc)
        return []
    return sorted(name for reply in replies for name in reply)


@require_http_methods(["GET", "POST"])
def health(request: HttpRequest) -> HttpResponse:
    failed = list(selectors.images_failed())
    if request.method == "POST":
        count = services.image_reembed(image_ids=[image.pk for image in failed])
        messages.success(request, f"{count} failed image(s) queued for embedding again.")
        return redirect("admin_health")
    version = selectors.active_model_version()
    context = {
        **admin.site.each_context(request),
        "title": "Index health",
        "statuses": selectors.images_per_status(),
        "queues": _queue_lengths(),
        "workers": _workers(),
        "model_version": version,
        "indexed": version is not None and embeddings.embedding_index_ready(version=version),
        "index_building": version is not None and embeddings.embedding_index_building(version=version),
        "index_min_rows": settings.HNSW_INDEX_MIN_ROWS,
        "failed": failed,
    }
    response = render(request, "admin/simili_health.html", context)
    response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
def zip_import(request: HttpRequest) -> HttpResponse:
    form = ZipImportForm(request.POST or None, request.FILES or None, initial={"owner": request.user.pk})
    summary = None
    if request.method == "POST" and form.is_valid():
        summary = imports.import_zip(
            fileobj=form.cleaned_data["archive"],
            owner=form.cleaned_data["owner"],
            collection=form.cleaned_data["collection"],
        )
    context = {**admin.site.each_context(request), "title": "Import a zip archive", "form": form, "summary": summary}
    return render(request, "admin/simili_import.html", context)


@require_GET
def gan(request: HttpRequest, key: str) -> HttpResponse:
    collection = get_object_or_404(Collection, key=key)
    context = {
        **admin.site.each_context(request),
        "title": f"GAN of {collection.name}",
        "collection": collection,
        "state": gan_runs.collection_gan_state(collection=collection),
    }
    response = render(request, "admin/simili_gan.html", context)
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def gan_samples(request: HttpRequest, key: str) -> FileResponse:
    collection = get_object_or_404(Collection, key=key)
    state = gan_runs.collection_gan_state(collection=collection)
    if state is None or not state.samples.is_file():
        raise Http404("no GAN samples for this collection yet")
    response = FileResponse(state.samples.open("rb"), content_type="image/png")
    response["Cache-Control"] = "no-store"  # rewritten after every epoch, and for staff only
    return response
