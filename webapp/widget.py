"""The iframe form of the similar-images widget: the only pages other origins may frame."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.http import require_GET

from webapp import selectors, similarity
from webapp.models import Visibility

#: Thumbnails an iframe shows unless ?limit= asks for another number (1..24).
DEFAULT_EMBED_LIMIT = 6


@xframe_options_exempt
@require_GET
def embed_similar(request: HttpRequest, key: str) -> HttpResponse:
    image = selectors.image_for_viewer(key=key, viewer=request.user)
    try:
        limit = max(1, min(24, int(request.GET.get("limit", DEFAULT_EMBED_LIMIT))))
    except ValueError:
        limit = DEFAULT_EMBED_LIMIT
    similar = similarity.image_similar(image=image, viewer=request.user, k=limit)
    response = render(request, "embed_similar.html", {"image": image, "similar": similar})
    collection = image.collection
    if collection.visibility == Visibility.PUBLIC and settings.WIDGET_PUBLIC_ANY_ORIGIN:
        ancestors = "*"
    else:
        ancestors = " ".join(sorted(selectors.embed_origins(collection))) or "'none'"
    response["Content-Security-Policy"] = f"frame-ancestors {ancestors}"
    # Shareable only when the results are everyone's: a signed-in viewer's list may hold their
    # private images, and a cache that ignores `Vary: Cookie` would hand it to the next visitor.
    shared = collection.visibility == Visibility.PUBLIC and not request.user.is_authenticated
    response["Cache-Control"] = "public, no-cache" if shared else "private, no-store"
    return response
