"""Visibility: private images never reach anyone but their owner and admins, by any path."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.conftest import shown_similar
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, near, unit_vector
from webapp import storage
from webapp.models import Visibility

pytestmark = pytest.mark.django_db

BASE = unit_vector(7)


@pytest.fixture
def world(owner):
    """A public query image and one twin image in each visibility, all owned by `owner`."""
    version = default_version()
    public = CollectionFactory(owner=owner, name="Public holidays", visibility=Visibility.PUBLIC)
    unlisted = CollectionFactory(owner=owner, name="Unlisted drafts", visibility=Visibility.UNLISTED)
    private = CollectionFactory(owner=owner, name="Private family", visibility=Visibility.PRIVATE)
    query = ImageFactory(collection=public)
    twins = {
        "public": ImageFactory(collection=public),
        "unlisted": ImageFactory(collection=unlisted),
        "private": ImageFactory(collection=private),
    }
    for seed, image in enumerate((query, *twins.values())):
        embed(image, near(BASE, seed), version)
        for path in (image.file_path, image.thumbnail_path):
            storage.write_atomic(path, b"\xff\xd8 fake jpeg for " + image.key.encode())
    return {"query": query, "collections": {"public": public, "unlisted": unlisted, "private": private}, **twins}


def _similar_keys(client, image) -> set[str]:
    response = client.get(reverse("image", args=[image.key]))
    assert response.status_code == 200
    return {shown.key for shown in shown_similar(response)}


@pytest.mark.parametrize("persona", ["anonymous_client", "outsider_client"])
def test_others_never_see_a_private_image_anywhere(request, world, persona) -> None:
    client = request.getfixturevalue(persona)
    private = world["private"]
    assert world["collections"]["private"].name not in client.get(reverse("home")).content.decode()
    assert client.get(reverse("collection", args=[private.collection.key])).status_code == 404
    assert client.get(reverse("image", args=[private.key])).status_code == 404
    assert client.get(reverse("media_original", args=[private.key])).status_code == 404
    assert client.get(reverse("media_thumbnail", args=[private.key])).status_code == 404
    status = client.get(reverse("collection_status", args=[private.collection.key]), {"keys": private.key})
    assert status.status_code == 404
    assert private.key not in _similar_keys(client, world["query"])


@pytest.mark.parametrize("persona", ["anonymous_client", "outsider_client"])
def test_an_unlisted_image_is_reachable_by_its_link_only(request, world, persona) -> None:
    client = request.getfixturevalue(persona)
    unlisted = world["unlisted"]
    assert world["collections"]["unlisted"].name not in client.get(reverse("home")).content.decode()
    assert client.get(reverse("collection", args=[unlisted.collection.key])).status_code == 200
    assert client.get(reverse("image", args=[unlisted.key])).status_code == 200
    assert client.get(reverse("media_thumbnail", args=[unlisted.key])).status_code == 200
    assert unlisted.key not in _similar_keys(client, world["query"])
    assert world["public"].key in _similar_keys(client, world["query"])


@pytest.mark.parametrize("persona", ["owner_client", "admin_client_"])
def test_the_owner_and_admins_see_everything(request, world, persona) -> None:
    client = request.getfixturevalue(persona)
    home = client.get(reverse("home")).content.decode()
    for collection in world["collections"].values():
        assert collection.name in home
    assert _similar_keys(client, world["query"]) == {world[v].key for v in ("public", "unlisted", "private")}
    response = client.get(reverse("media_original", args=[world["private"].key]))
    assert response.status_code == 200
    assert response["Content-Type"] == "image/jpeg"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_only_the_owner_may_upload(world, outsider_client, admin_client_, photos) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    public = world["collections"]["public"]
    url = reverse("collection_upload", args=[public.key])
    for client in (outsider_client, admin_client_):
        upload = SimpleUploadedFile("cat.jpg", photos["chelsea.jpg"], content_type="image/jpeg")
        response = client.post(url, {"files": [upload]}, HTTP_ACCEPT="application/json")
        assert response.status_code == 403
    assert public.images.count() == 2


def test_making_a_collection_private_hides_it_at_once(world, outsider_client) -> None:
    public = world["collections"]["public"]
    assert world["public"].key in _similar_keys(outsider_client, world["query"])
    public.visibility = Visibility.PRIVATE
    public.save()
    assert outsider_client.get(reverse("image", args=[world["query"].key])).status_code == 404
    assert outsider_client.get(reverse("media_thumbnail", args=[world["public"].key])).status_code == 404
