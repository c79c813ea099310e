"""Django settings for Simili: the only module that reads os.environ.

Every value comes from an environment variable with a safe default; a malformed value
stops start-up with `ImproperlyConfigured` naming the variable and what it accepts.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from webapp.embedded import Layout

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    """Return the variable's text, or `default` when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_bool(name: str, default: bool) -> bool:
    """Return the variable as a boolean; accepts 1/0, true/false, yes/no, on/off."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use one of 1, 0, true, false, yes, no, on, off")


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Return the variable as an integer within [minimum, maximum]."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ImproperlyConfigured(f"{name}={value} is out of range; it must be at least {minimum}{upper}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    """Return the variable as a float of at least `minimum`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is out of range; it must be at least {minimum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    """Return the variable as a comma-separated list of non-empty items."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_int_list(name: str, default: list[int], *, minimum: int = 0) -> list[int]:
    """Return the variable as comma-separated integers, each at least `minimum`."""
    items = env_list(name, [str(value) for value in default])
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise ImproperlyConfigured(f"{name}={','.join(items)!r} must be integers, comma-separated") from None
    if any(value < minimum for value in values):
        raise ImproperlyConfigured(f"{name}={values} is out of range; each must be at least {minimum}")
    return values


def env_choice(name: str, default: str, choices: set[str]) -> str:
    """Return the variable if it is one of `choices` (or matches `cuda:N` when "cuda" is one)."""
    value = env_str(name, default)
    if value in choices or ("cuda" in choices and value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ImproperlyConfigured(f"{name}={value!r} is not valid; use one of {', '.join(sorted(choices))}")


def env_url(name: str, schemes: set[str]) -> str | None:
    """Return the variable if it is a URL with one of `schemes`, or None when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    scheme = urlparse(raw).scheme
    if scheme not in schemes:
        accepted = ", ".join(sorted(s + "://" for s in schemes))
        raise ImproperlyConfigured(f"{name} must be a URL starting with one of {accepted}; got scheme {scheme!r}")
    return raw


VAR_DIR = Path(env_str("SIMILI_VAR_DIR", str(BASE_DIR / "var"))).resolve()
EMBEDDED = Layout(VAR_DIR)

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    # No key is hard-coded: without SECRET_KEY, one is generated once and kept under var/.
    explicit = os.environ.get("SECRET_KEY", "").strip()
    if explicit:
        return explicit
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    "webapp.apps.SimiliConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # ETags on responses and 304s for If-None-Match: what makes "public, no-cache" cheap.
    "django.middleware.http.ConditionalGetMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "webapp.middleware.SecurityHeadersMiddleware",
    "webapp.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_database_url = env_url("DATABASE_URL", {"postgres", "postgresql", "pgsql"})
EMBEDDED_POSTGRES = _database_url is None
DATABASES = {
    "default": dj_database_url.parse(
        _database_url or EMBEDDED.database_url("simili"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_redis_url = env_url("REDIS_URL", {"redis", "rediss", "redis+socket", "unix"})
EMBEDDED_REDIS = _redis_url is None
REDIS_URL = _redis_url or EMBEDDED.redis_url()


def _redis_cache_location(url: str) -> str:
    # redis-py spells a Unix socket unix:///path?db=N; Celery/kombu spell it redis+socket://.
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://").replace("virtual_host=", "db=")
    return url


CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _redis_cache_location(REDIS_URL),
        "KEY_PREFIX": "simili",
        "TIMEOUT": 300,
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # serve static/ directly when collectstatic has not run
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()

# Security: fail closed. Media is served by a view that checks permissions, never by URL alone.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_HTTPS_PROXY", False) else None
# Pages load scripts, styles and images from this origin only; media views send a stricter one.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

# Uploads and images
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 25 * 1024 * 1024, minimum=1)
MAX_FILES_PER_UPLOAD = env_int("MAX_FILES_PER_UPLOAD", 100, minimum=1)
# The first files of one upload request go to the interactive lane (each its own task, ready in
# about a second); the rest are bulk work, embedded in batches, so a 100-photo upload does not
# queue ahead of other users' single uploads on the interactive worker.
INTERACTIVE_FILES_PER_UPLOAD = env_int("INTERACTIVE_FILES_PER_UPLOAD", 4, minimum=0)
MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 50_000_000, minimum=1)
DATA_UPLOAD_MAX_NUMBER_FILES = MAX_FILES_PER_UPLOAD
# Django keeps files under 2.5 MB in memory; larger ones spool to a temp file.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
THUMBNAIL_SIZE = env_int("THUMBNAIL_SIZE", 400, minimum=32, maximum=2048)

# Videos (docs/video.md): MP4, MOV, WebM, animated GIF and WebP, sniffed by content.
MAX_VIDEO_BYTES = env_int("MAX_VIDEO_BYTES", 200 * 1024 * 1024, minimum=1)
MAX_VIDEO_SECONDS = env_float("MAX_VIDEO_SECONDS", 300.0, minimum=0.1)
MAX_VIDEO_PIXELS = env_int("MAX_VIDEO_PIXELS", 3840 * 2160, minimum=1)
# Frames sampled per video: one every VIDEO_FRAME_EVERY seconds plus scene changes (a histogram
# distance above VIDEO_SCENE_THRESHOLD; 0 turns that off), at most VIDEO_MAX_FRAMES.
VIDEO_FRAME_EVERY = env_float("VIDEO_FRAME_EVERY", 1.0, minimum=0.0)
VIDEO_SCENE_THRESHOLD = env_float("VIDEO_SCENE_THRESHOLD", 0.12, minimum=0.0)
VIDEO_MAX_FRAMES = env_int("VIDEO_MAX_FRAMES", 300, minimum=1, maximum=10_000)
VIDEO_STRIP_HEIGHT = env_int("VIDEO_STRIP_HEIGHT", 96, minimum=16, maximum=512)
VIDEO_MOMENTS_K = env_int("VIDEO_MOMENTS_K", 6, minimum=0, maximum=50)
# What "similar videos" compares: "mean" (mean-pooled frame vectors) or "gru" (the newest
# trained recurrent encoder, where it has encoded the video; mean pooling otherwise).
VIDEO_ENCODER = env_choice("VIDEO_ENCODER", "mean", {"mean", "gru"})
if VIDEO_FRAME_EVERY == 0 and VIDEO_SCENE_THRESHOLD == 0:
    raise ImproperlyConfigured("VIDEO_FRAME_EVERY and VIDEO_SCENE_THRESHOLD cannot both be 0: no frame would be kept")

# Retrieval
EMBEDDING_BACKBONE = env_str("EMBEDDING_BACKBONE", "efficientnet_lite0")
EMBEDDING_DEVICE = env_choice("EMBEDDING_DEVICE", "auto", {"auto", "cpu", "cuda"})
# On the CPU the default recipe runs in ONNX Runtime (exported once from the torch model into
# var/cache/onnx): 7x faster per image than eager PyTorch here. "torch" forces PyTorch.
EMBEDDING_RUNTIME = env_choice("EMBEDDING_RUNTIME", "auto", {"auto", "onnx", "torch"})
# ONNX Runtime's model: "int8" (statically quantised once into var/cache/onnx) takes 2.4x less CPU
# per image than "fp32" for 0.003 less Corel-1k mAP (docs/quality.md); fp32 where the
# quantisation tools are missing.
ONNX_PRECISION = env_choice("ONNX_PRECISION", "int8", {"int8", "fp32"})
EMBEDDING_RESIZE = env_choice("EMBEDDING_RESIZE", "short_side", {"short_side", "center_crop"})
EMBEDDING_POOLING = env_choice("EMBEDDING_POOLING", "gap", {"gap", "gem"})
EMBEDDING_SCALES = env_int_list("EMBEDDING_SCALES", [224], minimum=16)
EMBEDDING_PROJECTION = env_str("EMBEDDING_PROJECTION", "")  # a .npz from `python -m retrieval.train`
SIMILAR_K = env_int("SIMILAR_K", 12, minimum=1, maximum=100)
# Seconds a stored image's similar list stays in the cache (Redis); any write to embeddings or
# near-duplicate pairs moves the key on, so this only bounds memory. 0 turns the cache off.
SIMILAR_CACHE_SECONDS = env_int("SIMILAR_CACHE_SECONDS", 3600, minimum=0)
# Bulk embedding: images claimed per batch, threads decoding the next batch during inference
# (0 = measured defaults for the worker's device, `ingest.bulk_layout`: 32 and 2 on the CPU, 256
# and all but two cores on a GPU), and how long one task keeps claiming batches before handing
# over (docs/benchmarks.md#ingest, #ingest-gpu).
EMBED_BATCH_SIZE = env_int("EMBED_BATCH_SIZE", 0, minimum=0, maximum=1024)
DECODE_THREADS = env_int("DECODE_THREADS", 0, minimum=0, maximum=64)
EMBED_TIME_BUDGET = env_float("EMBED_TIME_BUDGET", 60.0, minimum=1.0)
# Bulk-lane worker processes that `manage.py serve` starts, and the CPU threads each one's CNN
# uses: 0 = automatic, i.e. one process on a GPU, else two, sharing the cores (measured on 2
# cores: two single-threaded processes embed 20-30% more images/s than one with two threads,
# docs/benchmarks.md#ingest).
BULK_WORKERS = env_int("BULK_WORKERS", 0, minimum=0, maximum=64)
# Threads of `manage.py import_folder` that read, check and store files while its main thread
# writes the rows (docs/benchmarks.md#ingest).
IMPORT_THREADS = env_int("IMPORT_THREADS", 2, minimum=1, maximum=64)
# Re-ranking (docs/quality.md): each stored vector is averaged with its nearest neighbours in its
# own collection (database-side augmentation), and each query with its first results (query
# expansion), each neighbour weighted by similarity ** SIMILAR_ALPHA so that unrelated images
# barely count in small collections. On Corel-1k 10/10/3 raise mAP from 0.866 to 0.956.
SIMILAR_DBA = env_int("SIMILAR_DBA", 10, minimum=0, maximum=50)
SIMILAR_QE = env_int("SIMILAR_QE", 10, minimum=0, maximum=50)
SIMILAR_ALPHA = env_float("SIMILAR_ALPHA", 3.0, minimum=0.0)
# Seconds a collection's uploads must pause before the worker refreshes its augmented vectors,
# so a bulk upload costs one refresh, not one per image or per batch (a refresh reads the whole
# collection); at most services.AUGMENT_MAX_DELAYS delays after the first upload of a burst.
AUGMENT_DELAY = env_float("AUGMENT_DELAY", 10.0, minimum=0.0)
# ef_search bounds how many candidates HNSW keeps per query; the iterative scan goes deeper
# when filters drop rows. m and ef_construction shape the graph of indexes built from now on
# (manage.py reindex, the admin's re-index). Measured at 1M x 1280-d (docs/benchmarks.md):
# ef_construction 64 -> recall@10 0.855 at ef_search 100 and 0.907 at 200, some queries
# stranded in the wrong region; 128 -> 0.893 and 0.976 (p95 9.5 ms), for a build of 712 s
# instead of 446 s.
HNSW_EF_SEARCH = env_int("HNSW_EF_SEARCH", 200, minimum=1, maximum=1000)
HNSW_M = env_int("HNSW_M", 16, minimum=2, maximum=100)
HNSW_EF_CONSTRUCTION = env_int("HNSW_EF_CONSTRUCTION", 128, minimum=4, maximum=1000)
# Memory for one index build (maintenance_work_mem): a build whose graph fits is several times
# faster; 1M x 1280-d halfvec needs about 4 GB.
HNSW_BUILD_MEMORY = env_str("HNSW_BUILD_MEMORY", "1GB")
if not re.fullmatch(r"[1-9][0-9]*(kB|MB|GB)", HNSW_BUILD_MEMORY):
    raise ImproperlyConfigured(f"HNSW_BUILD_MEMORY: expected a size such as 512MB or 2GB, got {HNSW_BUILD_MEMORY!r}")
# The active version's index is built once it holds this many vectors (0: at once). Below it
# an exact scan answers as fast (10k rows: 13.5 ms p50 exact, 13.1 walked), and a library's
# first import does not pay ~2 ms of PostgreSQL CPU per image to grow the graph insert by
# insert (docs/search.md#the-index). A re-indexed version gets its index whatever its size.
HNSW_INDEX_MIN_ROWS = env_int("HNSW_INDEX_MIN_ROWS", 10000, minimum=0)
# A filtered search over at most this many rows computes every distance exactly (recall 1.0,
# bounded time); above it, HNSW with an iterative scan. Measured crossover: docs/benchmarks.md.
EXACT_SEARCH_MAX_ROWS = env_int("EXACT_SEARCH_MAX_ROWS", 20000, minimum=0)
# Two images whose raw vectors are closer than this cosine distance are near-duplicates
# (re-encoded, resized, lightly cropped copies): grouped for review and collapsed in results.
# Measured with EfficientNet-Lite0 on Corel-1k (docs/search.md): 92% of light copies (2.5% crop,
# 75% size, JPEG quality 60) fall under 0.15, and 22 of 499,500 pairs of distinct photos do
# (mostly shots of one scene). 0 turns both off. Another backbone needs its own value.
NEAR_DUPLICATE_DISTANCE = env_float("NEAR_DUPLICATE_DISTANCE", 0.15, minimum=0.0)
SEARCH_TIMEOUT = env_float("SEARCH_TIMEOUT", 20.0, minimum=0.1)
PAGE_SIZE = env_int("PAGE_SIZE", 48, minimum=1, maximum=500)



def env_rate(name: str, default: str) -> tuple[int, int]:
    """Return a rate written "N/S" (N requests per S seconds) as (N, S); "0/1" disables it."""
    raw = env_str(name, default)
    count, _, seconds = raw.partition("/")
    try:
        parsed = (int(count), int(seconds))
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a rate; write N/S, e.g. 30/60") from None
    if parsed[0] < 0 or parsed[1] < 1:
        raise ImproperlyConfigured(f"{name}={raw!r} is out of range; N must be >= 0 and S >= 1")
    return parsed


# Expensive endpoints, per user and per client IP; 0 requests means unlimited.
RATE_LIMIT_SEARCH = env_rate("RATE_LIMIT_SEARCH", "30/60")
RATE_LIMIT_UPLOAD = env_rate("RATE_LIMIT_UPLOAD", "60/60")
# Number of reverse proxies in front of the app whose X-Forwarded-For entries are trusted.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, maximum=10)

# Widget: may any origin embed a public collection's widget? Per-collection origins always may.
WIDGET_PUBLIC_ANY_ORIGIN = env_bool("WIDGET_PUBLIC_ANY_ORIGIN", True)
API_PAGE_SIZE = env_int("API_PAGE_SIZE", 50, minimum=1, maximum=500)

# Celery
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True  # a worker killed mid-task leaves its message to be redelivered
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "bulk"
CELERY_RESULT_EXPIRES = 3600
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# An upload must not hang while the broker is down: try once more, briefly, then leave the
# image pending for the reconciler.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 10}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2}

# The reconciler: PostgreSQL is the source of truth for what needs embedding. Images never
# handed to the broker, or pending/processing for longer than these, are queued again.
RECONCILE_INTERVAL = env_float("RECONCILE_INTERVAL", 30.0, minimum=0.5)
RECONCILE_PENDING_AFTER = env_float("RECONCILE_PENDING_AFTER", 120.0, minimum=0.0)
RECONCILE_PROCESSING_AFTER = env_float("RECONCILE_PROCESSING_AFTER", 600.0, minimum=1.0)
# Attempts after which an image that keeps killing workers is marked failed instead.
EMBED_MAX_ATTEMPTS = env_int("EMBED_MAX_ATTEMPTS", 5, minimum=1)
CELERY_BEAT_SCHEDULE = {
    "reconcile": {"task": "simili.reconcile", "schedule": RECONCILE_INTERVAL},
    "media-gc": {"task": "simili.media_gc", "schedule": 3600.0},
}

LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", {"DEBUG", "INFO", "WARNING", "ERROR"})
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
