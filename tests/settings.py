"""Test settings: the real app settings, with embedded servers and media kept under var/test/.

Keeping them apart from var/ lets the suite run while `make serve` runs, without either
seeing the other's data or queue.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from webapp.embedded import Layout
from webapp.settings import *  # noqa: F403
from webapp.settings import BASE_DIR, CACHES, EMBEDDED_POSTGRES, EMBEDDED_REDIS, _redis_cache_location

# SIMILI_TEST_VAR_DIR lets two test runs (two checkouts, two people) use separate servers.
TEST_VAR_DIR = Path(os.environ.get("SIMILI_TEST_VAR_DIR", str(BASE_DIR / "var" / "test"))).resolve()
EMBEDDED = Layout(TEST_VAR_DIR)

if EMBEDDED_POSTGRES:
    DATABASES = {"default": dj_database_url.parse(EMBEDDED.database_url("simili"))}
if EMBEDDED_REDIS:
    REDIS_URL = EMBEDDED.redis_url()
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
    CACHES["default"]["LOCATION"] = _redis_cache_location(REDIS_URL)

MEDIA_ROOT = TEST_VAR_DIR / "media"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
SEARCH_TIMEOUT = 60.0  # the first query waits for the worker to load the CNN

# The limiter counts per client address and minute, and every test request comes from
# 127.0.0.1: left on, one test's uploads would rate-limit another's, depending on order and
# timing. Tests of the limiter set their own rates (tests/test_security.py, tests/test_api.py).
RATE_LIMIT_UPLOAD = (0, 1)
RATE_LIMIT_SEARCH = (0, 1)

# Most tests search a handful of rows and check what the HNSW index answers, so the index is
# there from the first vector; tests/test_index_threshold.py checks the default's behaviour.
if "HNSW_INDEX_MIN_ROWS" not in os.environ:  # a test's own worker may be started with another
    HNSW_INDEX_MIN_ROWS = 0
