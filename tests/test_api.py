"""The JSON API: every endpoint, each persona, each error code."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.conftest import media_files
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, near, unit_vector
from webapp import services, storage
from webapp.models import Collection, Image, ImageStatus, Visibility

pytestmark = pytest.mark.django_db


def _bearer(user) -> dict[str, str]:
    _, token = services.api_token_create(user=user, name="test")
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def owner_auth(owner):
    return _bearer(owner)


@pytest.fixture
def outsider_auth(outsider):
    return _bearer(outsider)


@pytest.fixture
def admin_auth(admin_user):
    return _bearer(admin_user)


@pytest.fixture
def api() -> Client:
    return Client()


@pytest.fixture
def public(owner):
    return CollectionFactory(owner=owner, name="Public", visibility=Visibility.PUBLIC)


@pytest.fixture
def private(owner):
    return CollectionFactory(owner=owner, name="Private", visibility=Visibility.PRIVATE)


def _error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code
    assert body["message"]


# --- collections ---------------------------------------------------------------------------


def test_anonymous_lists_public_collections_only(api, public, private) -> None:
    body = api.get("/api/v1/collections").json()
    assert [c["key"] for c in body["items"]] == [public.key]
    assert body["count"] == 1


def test_a_token_lists_the_owners_private_collections_too(api, public, private, owner_auth) -> None:
    keys = {c["key"] for c in api.get("/api/v1/collections", **owner_auth).json()["items"]}
    assert keys == {public.key, private.key}


def test_creating_a_collection_needs_a_token(api, owner, owner_auth) -> None:
    _error(api.post("/api/v1/collections", {"name": "Mine"}, content_type="application/json"), 401, "unauthorized")
    response = api.post("/api/v1/collections", {"name": "Mine", "visibility": "public"},
                        content_type="application/json", **owner_auth)
    assert response.status_code == 201
    created = Collection.objects.get(key=response.json()["key"])
    assert (created.owner, created.name, created.visibility) == (owner, "Mine", "public")


def test_bad_payloads_are_400_with_a_code(api, owner_auth) -> None:
    _error(api.post("/api/v1/collections", {"name": "x", "visibility": "secret"},
                    content_type="application/json", **owner_auth), 400, "invalid_request")
    _error(api.post("/api/v1/collections", {"name": "  "}, content_type="application/json", **owner_auth),
           400, "invalid_request")
    _error(api.post("/api/v1/collections", "{not json", content_type="application/json", **owner_auth),
           400, "invalid_request")


def test_a_revoked_or_made_up_token_is_401(api, owner, public) -> None:
    row, token = services.api_token_create(user=owner, name="old")
    services.api_token_revoke(token=row)
    _error(api.get("/api/v1/collections", HTTP_AUTHORIZATION=f"Bearer {token}"), 401, "invalid_token")
    _error(api.get("/api/v1/collections", HTTP_AUTHORIZATION="Bearer sim_madeup"), 401, "invalid_token")


def test_collection_detail_respects_visibility(api, private, owner_auth, outsider_auth, admin_auth) -> None:
    _error(api.get(f"/api/v1/collections/{private.key}"), 404, "not_found")
    _error(api.get(f"/api/v1/collections/{private.key}", **outsider_auth), 404, "not_found")
    assert api.get(f"/api/v1/collections/{private.key}", **owner_auth).json()["name"] == "Private"
    assert api.get(f"/api/v1/collections/{private.key}", **admin_auth).status_code == 200


def test_only_owner_and_admins_update_and_delete(api, public, owner_auth, outsider_auth, admin_auth) -> None:
    url = f"/api/v1/collections/{public.key}"
    _error(api.patch(url, {"name": "Hijacked"}, content_type="application/json", **outsider_auth), 403, "forbidden")
    _error(api.delete(url, **outsider_auth), 403, "forbidden")
    response = api.patch(url, {"visibility": "unlisted", "embed_origins": ["https://shop.example"]},
                         content_type="application/json", **owner_auth)
    assert response.status_code == 200 and response.json()["visibility"] == "unlisted"
    public.refresh_from_db()
    assert public.embed_origins == "https://shop.example"
    assert api.patch(url, {"name": "Renamed"}, content_type="application/json", **admin_auth).status_code == 200
    assert api.delete(url, **owner_auth).status_code == 204
    assert not Collection.objects.filter(pk=public.pk).exists()


def test_deleting_a_collection_removes_its_files(
    api, owner, owner_client, owner_auth, photos, django_capture_on_commit_callbacks
) -> None:
    collection = CollectionFactory(owner=owner)
    upload = SimpleUploadedFile("cat.jpg", photos["chelsea.jpg"])
    api.post(f"/api/v1/collections/{collection.key}/images", {"files": [upload]}, **owner_auth)
    assert len(media_files()) == 1
    with django_capture_on_commit_callbacks(execute=True):  # the files go once the deletion commits
        assert api.delete(f"/api/v1/collections/{collection.key}", **owner_auth).status_code == 204
    assert media_files() == []
    assert Image.objects.count() == 0


# --- images --------------------------------------------------------------------------------


def test_upload_answers_202_with_each_images_status(api, public, owner_auth, photos) -> None:
    files = [SimpleUploadedFile("cat.jpg", photos["chelsea.jpg"]), SimpleUploadedFile("x.txt", b"text")]
    response = api.post(f"/api/v1/collections/{public.key}/images", {"files": files}, **owner_auth)
    assert response.status_code == 202
    accepted, rejected = response.json()["results"]
    assert accepted["outcome"] == "accepted" and accepted["image"]["status"] == "pending"
    assert rejected["outcome"] == "rejected" and rejected["code"] == "unsupported_format"
    assert public.images.get().key == accepted["image"]["key"]


@pytest.mark.parametrize(("data", "status"), [(b"GIF87a-nope", 415), (b"", 400)])
def test_upload_of_nothing_acceptable_answers_its_error(api, public, owner_auth, data, status) -> None:
    response = api.post(f"/api/v1/collections/{public.key}/images",
                        {"files": [SimpleUploadedFile("f.jpg", data)]}, **owner_auth)
    assert response.status_code == status
    assert Image.objects.count() == 0


def test_upload_over_the_limit_is_413(api, public, owner_auth, photos, settings) -> None:
    settings.MAX_UPLOAD_BYTES = 100
    response = api.post(f"/api/v1/collections/{public.key}/images",
                        {"files": [SimpleUploadedFile("cat.jpg", photos["chelsea.jpg"])]}, **owner_auth)
    assert response.status_code == 413
    assert response.json()["results"][0]["code"] == "file_too_large"


def test_upload_permissions(api, public, outsider_auth, admin_auth, photos) -> None:
    url = f"/api/v1/collections/{public.key}/images"
    _error(api.post(url, {"files": [SimpleUploadedFile("c.jpg", photos["chelsea.jpg"])]}), 401, "unauthorized")
    for auth in (outsider_auth, admin_auth):
        _error(api.post(url, {"files": [SimpleUploadedFile("c.jpg", photos["chelsea.jpg"])]}, **auth), 403, "forbidden")


def test_image_list_paginates_and_filters_by_status(api, public, settings) -> None:
    settings.API_PAGE_SIZE = 2
    ready = [ImageFactory(collection=public) for _ in range(3)]
    ImageFactory(collection=public, status=ImageStatus.FAILED, error="undecodable")
    first = api.get(f"/api/v1/collections/{public.key}/images").json()
    assert first["count"] == 4 and len(first["items"]) == 2
    failed = api.get(f"/api/v1/collections/{public.key}/images", {"status": "failed"}).json()
    assert [(i["status"], i["error"]) for i in failed["items"]] == [("failed", "undecodable")]
    third = api.get(f"/api/v1/collections/{public.key}/images", {"page": 2}).json()["items"]
    assert {i["key"] for i in first["items"] + third} >= {r.key for r in ready[:1]}
    _error(api.get(f"/api/v1/collections/{public.key}/images", {"status": "weird"}), 400, "invalid_request")


def test_image_detail_and_delete(api, public, owner_auth, outsider_auth, django_capture_on_commit_callbacks) -> None:
    image = ImageFactory(collection=public)
    storage.write_atomic(image.file_path, b"original")
    storage.write_atomic(image.thumbnail_path, b"thumb")
    body = api.get(f"/api/v1/images/{image.key}").json()
    assert body["collection"] == public.key
    assert body["original_url"].endswith(f"/media/i/{image.key}/original")
    assert body["thumbnail_url"].endswith(f"/media/i/{image.key}/thumbnail")
    _error(api.delete(f"/api/v1/images/{image.key}", **outsider_auth), 403, "forbidden")
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/images/{image.key}", **owner_auth).status_code == 204
    assert media_files() == []
    _error(api.get(f"/api/v1/images/{image.key}"), 404, "not_found")


def test_a_private_image_is_404_to_others(api, private, outsider_auth) -> None:
    image = ImageFactory(collection=private)
    for auth in ({}, outsider_auth):
        _error(api.get(f"/api/v1/images/{image.key}", **auth), 404, "not_found")
        _error(api.get(f"/api/v1/images/{image.key}/similar", **auth), 404, "not_found")


# --- similar -------------------------------------------------------------------------------


@pytest.fixture
def ranked(public, private, settings):
    """A query image and five public neighbours at known, decreasing similarity (no re-ranking)."""
    settings.SIMILAR_QE = 0
    version = default_version()
    query = unit_vector(1)
    query_image = ImageFactory(collection=public)
    embed(query_image, query, version)
    neighbours = []
    # Each off in its own direction: similar to the query, not near-duplicates of each other.
    for index, weight in enumerate((0.6, 0.5, 0.4, 0.3, 0.2)):
        vector = weight * query + (1 - weight) * unit_vector(10 + index)
        image = ImageFactory(collection=public)
        embed(image, vector / np.linalg.norm(vector), version)
        neighbours.append(image)
    secret = ImageFactory(collection=private)
    embed(secret, near(query, 2, spread=0.5), version)  # closer than any neighbour, not a duplicate
    return query_image, neighbours, secret


def test_similar_returns_ranked_results_with_scores(api, ranked) -> None:
    query_image, neighbours, secret = ranked
    body = api.get(f"/api/v1/images/{query_image.key}/similar", {"k": 3}).json()
    assert body["model"] == "efficientnet_lite0@imagenet-1"
    assert [r["image"]["key"] for r in body["results"]] == [n.key for n in neighbours[:3]]
    scores = [r["similarity"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and 0.8 < scores[0] <= 1.0


def test_similar_hides_private_results_from_others_but_not_the_owner(api, ranked, owner_auth) -> None:
    query_image, _, secret = ranked
    anonymous = [r["image"]["key"] for r in api.get(f"/api/v1/images/{query_image.key}/similar").json()["results"]]
    assert secret.key not in anonymous
    body = api.get(f"/api/v1/images/{query_image.key}/similar", **owner_auth).json()
    mine = [r["image"]["key"] for r in body["results"]]
    assert mine[0] == secret.key


def test_similar_filters_by_collection(api, ranked, owner) -> None:
    query_image, neighbours, _ = ranked
    other = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    body = api.get(f"/api/v1/images/{query_image.key}/similar", {"collection": other.key}).json()
    assert body["results"] == []
    _error(api.get(f"/api/v1/images/{query_image.key}/similar", {"k": 0}), 400, "invalid_request")
    _error(api.get(f"/api/v1/images/{query_image.key}/similar", {"k": "many"}), 400, "invalid_request")


def test_similar_allows_any_origin_for_public_and_listed_origins_otherwise(api, ranked, owner) -> None:
    query_image, _, _ = ranked
    response = api.get(f"/api/v1/images/{query_image.key}/similar", HTTP_ORIGIN="https://blog.example")
    assert response["Access-Control-Allow-Origin"] == "*"
    assert response["Cache-Control"] == "public, no-cache"  # revalidated each time: no stale privacy
    again = api.get(f"/api/v1/images/{query_image.key}/similar", HTTP_IF_NONE_MATCH=response["ETag"])
    assert again.status_code == 304
    assert "Access-Control-Allow-Credentials" not in response

    unlisted = CollectionFactory(owner=owner, visibility=Visibility.UNLISTED, embed_origins="https://shop.example\n")
    image = ImageFactory(collection=unlisted)
    embed(image, unit_vector(5))
    allowed = api.get(f"/api/v1/images/{image.key}/similar", HTTP_ORIGIN="https://shop.example")
    assert allowed["Access-Control-Allow-Origin"] == "https://shop.example"
    refused = api.get(f"/api/v1/images/{image.key}/similar", HTTP_ORIGIN="https://evil.example")
    assert "Access-Control-Allow-Origin" not in refused


# --- search --------------------------------------------------------------------------------


def test_search_rejects_non_images_with_415(api) -> None:
    response = api.post("/api/v1/search", {"image": SimpleUploadedFile("a.svg", b"<svg/>")})
    _error(response, 415, "unsupported_format")


def test_search_answers_503_when_no_worker_answers(api, photos, settings, monkeypatch) -> None:
    settings.SEARCH_TIMEOUT = 0.5
    monkeypatch.setattr(services, "INTERACTIVE_QUEUE", "nobody-listens-here")
    response = api.post("/api/v1/search", {"image": SimpleUploadedFile("c.jpg", photos["chelsea.jpg"])})
    _error(response, 503, "search_unavailable")
    assert response["Retry-After"]
    assert media_files() == []


def test_search_is_rate_limited_with_retry_after(api, settings) -> None:
    settings.RATE_LIMIT_SEARCH = (1, 60)
    from django.core.cache import cache

    cache.clear()
    first = api.post("/api/v1/search", {"image": SimpleUploadedFile("a.svg", b"<svg/>")})
    assert first.status_code == 415
    second = api.post("/api/v1/search", {"image": SimpleUploadedFile("a.svg", b"<svg/>")})
    _error(second, 429, "rate_limited")
    assert 1 <= int(second["Retry-After"]) <= 60


def test_a_missing_file_field_is_400(api) -> None:
    _error(api.post("/api/v1/search", {}), 400, "invalid_request")


# --- tokens in the UI --------------------------------------------------------------------------


def test_a_user_creates_and_revokes_a_token_in_the_ui(owner_client, api, public) -> None:
    page = owner_client.post("/account/tokens/", {"name": "my script"})
    token = page.context["created"]
    assert token.startswith("sim_") and token in page.content.decode()
    assert api.get("/api/v1/collections", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    row = page.context["tokens"][0]
    assert owner_client.post(f"/account/tokens/{row.pk}/revoke/").status_code == 302
    assert api.get("/api/v1/collections", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401
    assert token not in owner_client.get("/account/tokens/").content.decode()


def test_someone_elses_token_cannot_be_revoked(outsider_client, owner) -> None:
    row, _ = services.api_token_create(user=owner, name="theirs")
    assert outsider_client.post(f"/account/tokens/{row.pk}/revoke/").status_code == 404
    row.refresh_from_db()
    assert row.is_active


def test_an_admin_creates_a_token_in_the_admin_and_sees_it_once(admin_client_, owner, api, public) -> None:
    response = admin_client_.post("/admin/simili/apitoken/add/", {"user": owner.pk, "name": "for the shop"},
                                  follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"] if "Token for" in str(m)]
    token = shown[0].split(": ", 1)[1].split(" ", 1)[0]
    assert api.get("/api/v1/collections", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    assert owner.api_tokens.get().name == "for the shop"
