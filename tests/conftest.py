"""Fixtures: real embedded PostgreSQL + pgvector, real Redis, a real Celery worker process."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from django.conf import settings
from django.test import Client
from PIL import Image as PILImage

from webapp import embedded

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[None]:
    started = False
    if settings.EMBEDDED_POSTGRES:
        started = embedded.start_postgres(settings.EMBEDDED, database="simili")
    yield
    if started:
        embedded.stop_postgres(settings.EMBEDDED)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(embedded_postgres: None) -> None:
    """Make sure the server runs before pytest-django creates the test database."""


class RedisServer:
    """The test Redis (embedded unless REDIS_URL is set); fault tests stop and restart it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def client(self):
        import redis

        url = settings.REDIS_URL.replace("redis+socket://", "unix://").replace("?virtual_host=", "?db=")
        return redis.Redis.from_url(url)

    def start(self) -> None:
        if settings.EMBEDDED_REDIS:
            self.process = embedded.start_redis(settings.EMBEDDED) or self.process

    def stop(self) -> None:
        """Shut the server down as a crash or a restart would (its append-only file stays)."""
        assert settings.EMBEDDED_REDIS, "only the embedded Redis can be stopped by the tests"
        import redis

        try:
            self.client().shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        if self.process is not None:
            self.process.wait(timeout=20)
        while embedded.redis_running(settings.EMBEDDED):
            time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    server.client().flushdb()  # stale messages from an earlier run would name rows that no longer exist
    yield server
    embedded.stop_process(server.process)


@pytest.fixture(autouse=True)
def clean_media() -> None:
    shutil.rmtree(settings.MEDIA_ROOT, ignore_errors=True)
    Path(settings.MEDIA_ROOT).mkdir(parents=True, exist_ok=True)


def _worker_database_url() -> str:
    db = settings.DATABASES["default"]
    host = db.get("HOST") or db.get("OPTIONS", {}).get("host", "")
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    if host.startswith("/"):
        return f"postgresql://{user}{password}@/{db['NAME']}?host={host}"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgresql://{user}{password}@{host}{port}/{db['NAME']}"


class Worker:
    """A real `celery worker` process on the test database, Redis and media; restartable."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ARTIFACTS / "celery-worker.log"

    def start(self, *, wait: bool = True, **env_overrides: str) -> None:
        from webapp.celery import app

        ARTIFACTS.mkdir(exist_ok=True)
        log = self.log_path.open("ab")
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": _worker_database_url(),
            "EMBEDDING_DEVICE": "cpu",
            **env_overrides,
        }
        name = f"test-{uuid.uuid4().hex[:8]}@%h"
        schedule = ARTIFACTS / f"celerybeat-{uuid.uuid4().hex[:8]}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-P", "solo", "-Q", "interactive,bulk",
             "--loglevel", "INFO", "-n", name, "--without-gossip", "--without-mingle",
             "-B", "--schedule", str(schedule)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so the embedded beat process goes with it
        )
        if not wait:
            return
        deadline = time.monotonic() + 120
        while not any(name.split("@")[0] in key for reply in app.control.ping(timeout=1.0) for key in reply):
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self._signal_group(signal.SIGKILL)
                raise RuntimeError(f"celery worker did not answer within 120 s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer would: no cleanup, no acknowledgement."""
        assert self.process is not None
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait()

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup: None, django_db_blocker: object) -> Iterator[Worker]:
    worker = Worker()
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()


# --- personas -------------------------------------------------------------------------


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user(username="olivia", password="pw-olivia-1")


@pytest.fixture
def outsider(django_user_model):
    return django_user_model.objects.create_user(username="oscar", password="pw-oscar-1")


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser(username="ada", password="pw-ada-1")


def _client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def owner_client(owner) -> Client:
    return _client_for(owner)


@pytest.fixture
def outsider_client(outsider) -> Client:
    return _client_for(outsider)


@pytest.fixture
def admin_client_(admin_user) -> Client:
    return _client_for(admin_user)


@pytest.fixture
def anonymous_client() -> Client:
    return Client()


# --- what a page shows ------------------------------------------------------------------


class Shown(NamedTuple):
    key: str
    name: str
    similarity: float


def shown_similar(response) -> list[Shown]:
    """Each image in a page's "Similar images" grid, in order, as sent: key, name, similarity."""
    body = response.content.decode()
    start = body.find('id="similar"')
    if start < 0:
        return []
    grid = body[start:body.index("</ol>", start)]
    tiles = re.findall(r'<li class="tile">\s*<a href="/i/([^/"]+)/"><img [^>]*alt="([^"]*)".*?'
                       r'data-similarity="([^"]+)"', grid, flags=re.S)
    return [Shown(key, html.unescape(alt), float(similarity)) for key, alt, similarity in tiles]


def shown_moments(response) -> list[tuple[str, float]]:
    """The (video key, start second) of each moment in a page's "In videos" list, in order."""
    return [(key, float(second)) for key, second in
            re.findall(r'<a class="moment" href="/v/([^/"]+)/\?t=[^"]*" data-timestamp="([^"]+)"',
                       response.content.decode())]


# --- real photos ----------------------------------------------------------------------


def photo_bytes(array: np.ndarray, fmt: str = "JPEG", **save: object) -> bytes:
    image = PILImage.fromarray(array)
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, as JPEG/PNG/WebP bytes."""
    from skimage import data

    return {
        "chelsea.jpg": photo_bytes(data.chelsea()),
        "coffee.png": photo_bytes(data.coffee(), "PNG"),
        "rocket.webp": photo_bytes(data.rocket(), "WEBP", quality=90),
        "astronaut.jpg": photo_bytes(data.astronaut()),
        "motorcycle.jpg": photo_bytes(data.stereo_motorcycle()[0]),
    }


def near_copy(data: bytes) -> bytes:
    """A resized, cropped, mirrored, re-encoded copy of a photo."""
    image = PILImage.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    image = image.crop((w // 12, h // 12, w - w // 12, h - h // 12))
    image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT).resize((w * 2 // 3, h * 2 // 3))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def media_files() -> list[Path]:
    """Every stored file under MEDIA_ROOT (originals, thumbnails, queries)."""
    root = Path(settings.MEDIA_ROOT)
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- a real browser -------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright; `make test` installs it where it can."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; `make test` installs Debian's chromium package as root")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread, which Django's async-safety
    # check mistakes for async code around our (synchronous) database fixtures.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def other_origin(tmp_path):
    """A static web server on another port: a third-party site that embeds Simili."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
