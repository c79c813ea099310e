"""Security settings and abuse limits: deploy checks, headers, CSRF, rate limits, a down database."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from tests.factories import CollectionFactory, ImageFactory
from webapp import services
from webapp.models import Image, ImageStatus, Visibility

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    # DJANGO_ALLOW_ASYNC_UNSAFE is set by the browser tests' fixture for this process only.
    dropped = {"DATABASE_URL", "REDIS_URL", "DEBUG", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings", **extra})
    return env


def test_check_deploy_is_clean_with_production_settings() -> None:
    production = _env(
        SECRET_KEY=secrets.token_urlsafe(60), ALLOWED_HOSTS="simili.example", SECURE_COOKIES="1",
        SECURE_SSL_REDIRECT="1", SECURE_HSTS_SECONDS="31536000", SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        SECURE_HSTS_PRELOAD="1",
    )
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=production, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "no issues" in result.stdout


def test_a_down_database_answers_503_with_a_message_not_a_traceback(tmp_path) -> None:
    code = (
        "import django; django.setup();"
        "from django.test import Client; c = Client(raise_request_exception=False);"
        "r = c.get('/'); print(r.status_code, r['Retry-After']); print(r.content.decode());"
        "r = c.get('/api/v1/collections'); print(r.status_code); print(r.content.decode())"
    )
    env = _env(DATABASE_URL=f"postgresql://postgres@/simili?host={tmp_path}", DATABASE_CONN_MAX_AGE="0")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "503 5"
    assert "The database is unavailable right now" in result.stdout
    assert "Traceback" not in result.stdout
    assert '"code": "database_unavailable"' in result.stdout
    assert "503" in lines


@pytest.mark.django_db
def test_pages_send_security_headers(client) -> None:
    response = client.get("/")
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert "script-src 'self'" in response["Content-Security-Policy"]


@pytest.mark.django_db
def test_forms_require_a_csrf_token(owner) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post(reverse("collection_create"), {"name": "x", "visibility": "public"}).status_code == 403
    collection = CollectionFactory(owner=owner)
    upload = SimpleUploadedFile("a.png", b"x")
    assert client.post(reverse("collection_upload", args=[collection.key]), {"files": [upload]}).status_code == 403


@pytest.mark.django_db
def test_uploads_and_searches_are_rate_limited_per_user_with_retry_after(owner_client, owner, settings, photos):
    cache.clear()
    settings.RATE_LIMIT_UPLOAD = (2, 60)
    collection = CollectionFactory(owner=owner)
    url = reverse("collection_upload", args=[collection.key])
    statuses = []
    for name in ("chelsea.jpg", "coffee.png", "rocket.webp"):
        upload = SimpleUploadedFile(name, photos[name])
        statuses.append(owner_client.post(url, {"files": [upload]}, HTTP_ACCEPT="application/json"))
    assert [r.status_code for r in statuses] == [202, 202, 429]
    assert statuses[2].json()["code"] == "rate_limited"
    assert 1 <= int(statuses[2]["Retry-After"]) <= 60
    assert collection.images.count() == 2

    settings.RATE_LIMIT_SEARCH = (1, 60)
    first = owner_client.post(reverse("search"), {"image": SimpleUploadedFile("q.txt", b"text")})
    assert first.status_code == 415
    second = owner_client.post(reverse("search"), {"image": SimpleUploadedFile("q.txt", b"text")})
    assert second.status_code == 429
    assert "Too many requests" in second.content.decode()


@pytest.mark.django_db
def test_the_limit_counts_per_ip_across_users(settings, django_user_model, photos) -> None:
    cache.clear()
    settings.RATE_LIMIT_SEARCH = (2, 60)
    answers = []
    for index in range(3):
        client = Client(REMOTE_ADDR="203.0.113.9")
        client.force_login(django_user_model.objects.create_user(f"u{index}"))
        answers.append(client.post(reverse("search"), {"image": SimpleUploadedFile("q.txt", b"t")}).status_code)
    assert answers == [415, 415, 429]


@pytest.mark.django_db
def test_a_failed_image_can_be_retried_by_its_owner_only(owner_client, outsider_client, owner) -> None:
    image = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PUBLIC),
                         status=ImageStatus.FAILED, error="The image is truncated or corrupt")
    page = owner_client.get(reverse("image", args=[image.key])).content.decode()
    assert "Retry processing" in page and "truncated or corrupt" in page
    assert "Retry processing" not in outsider_client.get(reverse("image", args=[image.key])).content.decode()
    assert outsider_client.post(reverse("image_reembed", args=[image.key])).status_code == 404
    assert Image.objects.get(pk=image.pk).status == ImageStatus.FAILED
    assert owner_client.post(reverse("image_reembed", args=[image.key])).status_code == 302
    image.refresh_from_db()
    assert (image.status, image.error) == (ImageStatus.PENDING, "")


@pytest.mark.django_db
def test_a_failed_image_can_be_retried_through_the_api(owner) -> None:
    image = ImageFactory(collection=CollectionFactory(owner=owner), status=ImageStatus.FAILED, error="boom")
    _, token = services.api_token_create(user=owner, name="t")
    response = Client().post(f"/api/v1/images/{image.key}/reembed", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 202
    assert response.json()["status"] == "pending"


@pytest.mark.django_db
def test_the_embed_page_of_a_private_or_unlisted_image_leaks_nothing(client, owner) -> None:
    private = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PRIVATE))
    assert client.get(reverse("embed_similar", args=[private.key])).status_code == 404
    unlisted = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.UNLISTED))
    response = client.get(reverse("embed_similar", args=[unlisted.key]))
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert response["Cache-Control"] == "private, no-store"


@pytest.mark.django_db
def test_a_signed_in_viewers_widget_is_never_shareable_by_caches(client, owner) -> None:
    """Their similar images may be private ones: a cache ignoring `Vary: Cookie` must not keep it."""
    public = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PUBLIC))
    assert client.get(reverse("embed_similar", args=[public.key]))["Cache-Control"] == "public, no-cache"
    client.force_login(owner)
    assert client.get(reverse("embed_similar", args=[public.key]))["Cache-Control"] == "private, no-store"


def test_a_key_never_starts_with_a_dash_so_a_command_line_can_take_it(monkeypatch) -> None:
    """`manage.py train_video_encoder --collection -Ab…` reads the key as an option (1 key in 64)."""
    from webapp import models

    drawn = iter(["-dashFirst12345x", "_fineKey1234567x"])
    monkeypatch.setattr(models.secrets, "token_urlsafe", lambda n: next(drawn))
    assert models.new_key() == "_fineKey1234567x"
