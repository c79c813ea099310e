"""Fixed-window rate limits in Redis (Django's cache), per user and per client IP."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str:
    """Return the client's address, trusting X-Forwarded-For only for configured proxies."""
    hops = settings.TRUSTED_PROXY_COUNT
    if hops:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return str(request.META.get("REMOTE_ADDR", "unknown"))


def retry_after(request: HttpRequest, *, scope: str, rate: tuple[int, int]) -> int | None:
    """Count one request; return the seconds to wait if the user or the IP is over `rate`."""
    limit, window = rate
    if limit == 0:
        return None
    now = int(time.time())
    bucket = now // window
    identities = [f"ip:{client_ip(request)}"]
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        identities.append(f"user:{user.pk}")
    try:
        for identity in identities:
            key = f"rate:{scope}:{identity}:{bucket}"
            cache.add(key, 0, timeout=window + 1)
            if cache.incr(key) > limit:
                return max(1, (bucket + 1) * window - now)
    except Exception as exc:  # noqa: BLE001 - a cache outage must not take uploads down with it
        logger.warning("rate limiting skipped, cache unavailable: %s", exc)
    return None
