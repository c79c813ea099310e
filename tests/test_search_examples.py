"""Search by several examples: more like these, less like those, from the page and the API."""

from __future__ import annotations

import numpy as np
import pytest
from django.urls import reverse

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, near, unit_vector
from webapp.models import Visibility

pytestmark = pytest.mark.django_db


@pytest.fixture
def gallery(owner):
    """Two themes (cats and boats), four public images each, and one private cat."""
    version = default_version()
    public = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    private = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    cat, boat = unit_vector(1), unit_vector(2)
    images = {}
    for i in range(4):
        for theme, centre in (("cat", cat), ("boat", boat)):
            images[f"{theme}{i}"] = ImageFactory(collection=public, original_name=f"{theme}{i}.jpg")
            embed(images[f"{theme}{i}"], near(centre, 10 * i + len(theme)), version)
    # a cat photo with a boat in it: similar to both themes
    mixed = (cat + boat) / np.linalg.norm(cat + boat)
    images["catboat"] = ImageFactory(collection=public, original_name="catboat.jpg")
    embed(images["catboat"], near(mixed, 99, spread=0.3), version)
    images["secret"] = ImageFactory(collection=private, original_name="secret.jpg")
    embed(images["secret"], near(cat, 98), version)
    return images


def _names(body: dict) -> list[str]:
    return [r["image"]["name"] for r in body["results"]]


def _search(client, **payload) -> dict:
    return client.post("/api/v1/search/examples", payload, content_type="application/json").json()


def test_positive_examples_find_their_theme_and_leave_themselves_out(anonymous_client, gallery) -> None:
    body = _search(anonymous_client, positive=[gallery["cat0"].key, gallery["cat1"].key], k=3)
    assert set(_names(body)) == {"cat2.jpg", "cat3.jpg", "catboat.jpg"}


def test_a_negative_example_pushes_its_theme_away(anonymous_client, gallery) -> None:
    plain = _search(anonymous_client, positive=[gallery["cat0"].key], k=9)
    pushed = _search(anonymous_client, positive=[gallery["cat0"].key], negative=[gallery["boat0"].key], k=9)
    before = {r["image"]["name"]: r["similarity"] for r in plain["results"]}
    after = {r["image"]["name"]: r["similarity"] for r in pushed["results"]}
    assert "boat0.jpg" not in after  # an example is never its own result
    assert all(after[f"boat{i}.jpg"] < before[f"boat{i}.jpg"] - 0.1 for i in (1, 2, 3))
    assert after["catboat.jpg"] < before["catboat.jpg"]
    assert _names(pushed)[:3] == [name for name in _names(pushed) if name.startswith("cat") and name != "catboat.jpg"]


def test_examples_must_be_visible_to_the_caller(anonymous_client, gallery) -> None:
    response = anonymous_client.post("/api/v1/search/examples", {"positive": [gallery["secret"].key]},
                               content_type="application/json")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    response = anonymous_client.post("/api/v1/search/examples", {"positive": ["not a key!"]},
                               content_type="application/json")
    assert response.status_code == 400


def test_the_search_page_refines_with_more_and_less_like_this(anonymous_client, gallery) -> None:
    page = anonymous_client.get(reverse("search"), {"positive": gallery["cat0"].key})
    assert page.status_code == 200
    results = [result.image.original_name for result, _, _ in page.context["refine"]]
    assert results[:4] == sorted(results[:4], key=lambda n: not n.startswith("cat"))  # cats first
    assert "secret.jpg" not in results
    result, more, less = next(r for r in page.context["refine"] if r[0].image.original_name == "catboat.jpg")
    assert f"positive={gallery['cat0'].key}" in more and f"positive={gallery['catboat'].key}" in more
    assert f"negative={gallery['catboat'].key}" in less
    refined = anonymous_client.get(f"{reverse('search')}?{less}")
    names = [r.image.original_name for r, _, _ in refined.context["refine"]]
    assert "catboat.jpg" not in names
    assert [image.original_name for image in refined.context["negatives"]] == ["catboat.jpg"]
    html = anonymous_client.get(reverse("image", args=[gallery["cat0"].key])).content.decode()
    assert f"{reverse('search')}?positive={gallery['cat0'].key}" in html
