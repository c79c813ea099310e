"""Near-duplicates: found on refresh, collapsed in results, reviewed by the owner, answers remembered."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.urls import reverse
from PIL import Image as PILImage

from tests.conftest import shown_similar
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, near, unit_vector
from webapp import services
from webapp.models import Image, NearDuplicate, Visibility

pytestmark = pytest.mark.django_db


def _copy(vector: np.ndarray, seed: int, spread: float = 0.1) -> np.ndarray:
    """A near-duplicate's vector: cosine distance about 0.005 from the original."""
    return near(vector, seed, spread=spread)


@pytest.fixture
def shop(owner):
    """A public collection: one photo with two near-copies, one merely similar photo, one unrelated."""
    version = default_version()
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    base = unit_vector(1)
    images = {}
    for name, vector in [("photo", base), ("copy-a", _copy(base, 2)), ("copy-b", _copy(base, 3)),
                         ("similar", near(base, 4)), ("other", unit_vector(5)), ("query", near(base, 6))]:
        images[name] = ImageFactory(collection=collection, original_name=f"{name}.jpg")
        embed(images[name], vector, version)
    services.collection_augment(collection_id=collection.pk)
    return collection, images


def _pairs(collection) -> set[frozenset[str]]:
    pairs = NearDuplicate.objects.filter(collection=collection, status="open").select_related("first", "second")
    return {frozenset((p.first.original_name, p.second.original_name)) for p in pairs}


def test_the_refresh_records_near_duplicate_pairs_and_nothing_else(shop) -> None:
    collection, _ = shop
    assert _pairs(collection) == {frozenset(("photo.jpg", "copy-a.jpg")), frozenset(("photo.jpg", "copy-b.jpg")),
                                  frozenset(("copy-a.jpg", "copy-b.jpg"))}


def test_similar_results_show_one_photo_of_a_group(shop, anonymous_client) -> None:
    _, images = shop
    body = anonymous_client.get(f"/api/v1/images/{images['query'].key}/similar", {"k": 5}).json()
    names = [r["image"]["name"] for r in body["results"]]
    assert sum(name in {"photo.jpg", "copy-a.jpg", "copy-b.jpg"} for name in names) == 1
    assert "similar.jpg" in names and "other.jpg" in names


def test_a_photo_s_copies_appear_once_among_its_similar_images(shop, anonymous_client) -> None:
    _, images = shop
    page = anonymous_client.get(reverse("image", args=[images["photo"].key]))
    shown = [tile.name for tile in shown_similar(page)]
    assert shown[0] in {"copy-a.jpg", "copy-b.jpg"}  # finding the copy is what a search by photo is for
    assert sum(name in {"copy-a.jpg", "copy-b.jpg"} for name in shown) == 1
    assert "similar.jpg" in shown


def test_the_owner_reviews_groups_and_others_may_not(shop, owner_client, outsider_client) -> None:
    collection, _ = shop
    url = reverse("collection_duplicates", args=[collection.key])
    assert outsider_client.get(url).status_code == 404
    page = owner_client.get(url)
    assert page.status_code == 200
    [group] = page.context["groups"]
    assert {image.original_name for image in group.images} == {"photo.jpg", "copy-a.jpg", "copy-b.jpg"}
    collection_page = owner_client.get(collection.get_absolute_url()).content.decode()
    assert "Review 3 near-duplicate pairs" in collection_page


def test_keeping_one_deletes_the_rest_of_its_group(shop, owner_client) -> None:
    collection, images = shop
    response = owner_client.post(reverse("collection_duplicates_keep", args=[collection.key]),
                                 {"image": images["copy-a"].key}, follow=True)
    assert "deleted 2 near-duplicate(s)" in response.content.decode()
    names = set(Image.objects.filter(collection=collection).values_list("original_name", flat=True))
    assert names == {"copy-a.jpg", "similar.jpg", "other.jpg", "query.jpg"}
    assert not NearDuplicate.objects.filter(collection=collection).exists()


def test_not_duplicates_is_remembered_by_the_refresh_and_the_results(shop, owner_client, anonymous_client) -> None:
    collection, images = shop
    pairs = NearDuplicate.objects.filter(collection=collection)
    for pair in pairs:
        owner_client.post(reverse("collection_duplicates_dismiss", args=[collection.key, pair.pk]))
    services.collection_augment(collection_id=collection.pk)  # a later refresh does not propose them again
    assert _pairs(collection) == set()
    assert pairs.filter(status="dismissed").count() == 3
    body = anonymous_client.get(f"/api/v1/images/{images['query'].key}/similar", {"k": 6}).json()
    names = {r["image"]["name"] for r in body["results"]}
    assert {"photo.jpg", "copy-a.jpg", "copy-b.jpg"} <= names


def test_an_outsider_cannot_dismiss_or_keep(shop, outsider_client) -> None:
    collection, images = shop
    pair = NearDuplicate.objects.filter(collection=collection).first()
    dismiss = reverse("collection_duplicates_dismiss", args=[collection.key, pair.pk])
    assert outsider_client.post(dismiss).status_code == 404
    assert outsider_client.post(reverse("collection_duplicates_keep", args=[collection.key]),
                                {"image": images["copy-a"].key}).status_code == 404
    assert NearDuplicate.objects.get(pk=pair.pk).status == "open"
    assert Image.objects.filter(collection=collection).count() == 6


def test_the_threshold_separates_real_copies_from_different_photos(photos, settings) -> None:
    """On real photos with the real model: a re-encoded, resized copy is under the threshold; others are not."""
    from retrieval import imaging
    from webapp import pipeline

    recipe = pipeline.recipe()

    def vector(data: bytes) -> np.ndarray:
        return recipe.embed([imaging.load_image(data, min_side=224, max_pixels=10**8)]).vectors[0]

    def copy(data: bytes) -> bytes:
        image = PILImage.open(io.BytesIO(data)).convert("RGB")
        w, h = image.size
        image = image.crop((w // 40, h // 40, w - w // 40, h - h // 40)).resize((w * 3 // 4, h * 3 // 4))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=60)
        return out.getvalue()

    vectors = {name: vector(data) for name, data in photos.items()}
    for name, data in photos.items():
        assert 1.0 - float(vectors[name] @ vector(copy(data))) < settings.NEAR_DUPLICATE_DISTANCE, name
    names = sorted(vectors)
    closest = min(1.0 - float(vectors[a] @ vectors[b]) for a in names for b in names if a < b)
    assert closest > settings.NEAR_DUPLICATE_DISTANCE


def test_copies_in_other_collections_show_once_without_a_recorded_pair(owner, anonymous_client) -> None:
    """Two public collections hold the same photo; no refresh ran, so only the vectors tell."""
    version = default_version()
    query = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PUBLIC))
    embed(query, unit_vector(1), version)
    base = near(unit_vector(1), 7)
    for index in range(3):
        copy = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PUBLIC),
                            original_name=f"copy{index}.jpg")
        embed(copy, _copy(base, 20 + index, spread=0.05), version)
    other = ImageFactory(collection=query.collection, original_name="other.jpg")
    embed(other, near(unit_vector(1), 8), version)
    assert not NearDuplicate.objects.exists()
    names = [r["image"]["name"] for r in anonymous_client.get(f"/api/v1/images/{query.key}/similar").json()["results"]]
    assert sorted(names) == sorted(["other.jpg", names[0] if names[0] != "other.jpg" else names[1]])
    assert sum(name.startswith("copy") for name in names) == 1


@pytest.mark.parametrize("expansion", [10, 0])  # with it, the pool's spares; without, a deeper search
def test_more_copies_than_the_margin_still_leave_k_results(owner, anonymous_client, settings, expansion) -> None:
    """Eight copies of one photo outrank everything else: the search looks deeper, k results return."""
    from webapp import similarity

    settings.SIMILAR_QE = expansion
    searches: list[int] = []
    real = similarity.nearest_hits

    def counted(**kwargs):
        searches.append(kwargs["k"])
        return real(**kwargs)

    version = default_version()
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    query = ImageFactory(collection=collection)
    embed(query, unit_vector(1), version)
    base = near(unit_vector(1), 7, spread=0.3)
    for index in range(similarity.COLLAPSE_MARGIN + 4):
        embed(ImageFactory(collection=collection, original_name=f"copy{index}.jpg"),
              _copy(base, 30 + index, spread=0.03), version)
    for index in range(10):
        embed(ImageFactory(collection=collection, original_name=f"other{index}.jpg"),
              near(unit_vector(1), 60 + index), version)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(similarity, "nearest_hits", counted)
        body = anonymous_client.get(f"/api/v1/images/{query.key}/similar?k=5").json()
    names = [r["image"]["name"] for r in body["results"]]
    assert len(names) == 5
    assert sum(name.startswith("copy") for name in names) == 1
    assert names[0].startswith("copy")  # the copies' group is the best match, shown once
    wanted = 5 + similarity.COLLAPSE_MARGIN
    if expansion:
        assert searches == [similarity.QE_POOL_FACTOR * wanted]  # an exact scan's pool: copies and spares
    else:
        assert searches == [wanted, 5 * similarity.COLLAPSE_RETRY_FACTOR + similarity.COLLAPSE_MARGIN]


def test_a_refresh_that_read_an_image_before_it_moved_does_not_pair_it_again(shop, owner_client, outsider) -> None:
    """An admin moves a copy into another user's private collection while a refresh of this one runs."""
    from webapp import curation, duplicates

    collection, images = shop
    pairs = [(p.first_id, p.second_id, p.distance) for p in NearDuplicate.objects.filter(collection=collection)]
    elsewhere = CollectionFactory(owner=outsider, visibility=Visibility.PRIVATE)
    curation.images_move(image_ids=[images["copy-a"].pk], target=elsewhere)

    duplicates.duplicates_record(collection_id=collection.pk, pairs=pairs)  # as the refresh read them

    assert _pairs(collection) == {frozenset(("photo.jpg", "copy-b.jpg"))}
    page = owner_client.get(reverse("collection_duplicates", args=[collection.key])).content.decode()
    assert images["copy-a"].key not in page and "copy-a.jpg" not in page


def test_a_pair_whose_image_left_the_collection_is_neither_shown_nor_deleted(shop, owner_client, outsider) -> None:
    """Pairs recorded before that check: the review leaves the other collection's image alone."""
    collection, images = shop
    elsewhere = CollectionFactory(owner=outsider, visibility=Visibility.PRIVATE)
    Image.objects.filter(pk=images["copy-a"].pk).update(collection=elsewhere)  # its pair row left behind

    page = owner_client.get(reverse("collection_duplicates", args=[collection.key])).content.decode()
    assert images["copy-a"].key not in page and "copy-a.jpg" not in page
    owner_client.post(reverse("collection_duplicates_keep", args=[collection.key]), {"image": images["photo"].key})
    assert Image.objects.filter(pk=images["copy-a"].pk, collection=elsewhere).exists()
    assert not Image.objects.filter(pk=images["copy-b"].pk).exists()  # the real copy went


def test_keep_one_spares_an_image_moved_away_after_the_group_was_read(shop, outsider, monkeypatch) -> None:
    from webapp import curation, duplicates

    collection, images = shop
    elsewhere = CollectionFactory(owner=outsider, visibility=Visibility.PRIVATE)
    groups = duplicates.duplicate_groups

    def read_then_an_admin_moves_one(**kwargs):
        found = groups(**kwargs)
        curation.images_move(image_ids=[images["copy-b"].pk], target=elsewhere)
        return found

    monkeypatch.setattr(duplicates, "duplicate_groups", read_then_an_admin_moves_one)
    removed = duplicates.duplicate_keep(collection=collection, keep=images["photo"])
    assert [image.original_name for image in removed] == ["copy-a.jpg"]
    assert not Image.objects.filter(pk=images["copy-a"].pk).exists()
    assert Image.objects.filter(pk=images["copy-b"].pk, collection=elsewhere).exists()
