"""Response headers every page gets, and a clear 503 when the database is unreachable."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying while the database is unreachable.
DATABASE_RETRY_AFTER = 5


class SecurityHeadersMiddleware:
    """Add a Content-Security-Policy to pages that did not set their own (media, embeds do)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Content-Security-Policy" not in response and response.get("Content-Type", "").startswith("text/html"):
            policy = settings.CONTENT_SECURITY_POLICY
            if request.path.startswith("/api/v1/docs"):
                policy = policy.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'")
            response["Content-Security-Policy"] = policy
        response.setdefault("Cross-Origin-Resource-Policy", "cross-origin" if _embeddable(request) else "same-site")
        return response


def _embeddable(request: HttpRequest) -> bool:
    # Thumbnails and widget reads are meant to be loaded by other sites' pages.
    return request.path.startswith(("/media/", "/embed/", "/api/v1/images/", "/static/"))


class DatabaseUnavailableMiddleware:
    """Answer 503 with a message, not a stack trace, when PostgreSQL cannot be reached."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        logger.error("database unavailable for %s: %s", request.path, exception)
        message = "The database is unavailable right now. Please try again in a few seconds."
        response: HttpResponse
        if request.path.startswith("/api/") or "application/json" in request.headers.get("Accept", ""):
            response = JsonResponse({"code": "database_unavailable", "message": message}, status=503)
        else:
            response = HttpResponse(render_to_string("503.html", {"message": message}), status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER)
        return response
