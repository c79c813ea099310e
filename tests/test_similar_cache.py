"""Cached similar lists: never older than the data, never a result the viewer may not see."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from tests.conftest import shown_similar
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, near, unit_vector
from webapp import services
from webapp import similarity as sim
from webapp.models import Image, ImageStatus, NearDuplicate, Visibility

pytestmark = pytest.mark.django_db


def similar_keys(client, image) -> list[str]:
    response = client.get(f"/api/v1/images/{image.key}/similar?k=5")
    assert response.status_code == 200
    return [item["image"]["key"] for item in response.json()["results"]]


@pytest.fixture
def searches(monkeypatch) -> list[int]:
    """Count the nearest-neighbour queries sent to PostgreSQL (they bypass Django's query log)."""
    calls: list[int] = []
    real = sim.nearest_hits

    def counted(**kwargs):
        calls.append(kwargs["k"])
        return real(**kwargs)

    monkeypatch.setattr(sim, "nearest_hits", counted)
    return calls


@pytest.fixture
def library():
    version = default_version()
    collection = CollectionFactory(visibility=Visibility.PUBLIC)
    base = unit_vector(1)
    me = ImageFactory(collection=collection)
    embed(me, base, version)
    others = [ImageFactory(collection=collection) for _ in range(4)]
    for seed, image in enumerate(others, start=10):
        embed(image, near(base, seed), version)
    return version, collection, me, others, base


def visit_twice(fetch, searches) -> tuple[Any, Any, CaptureQueriesContext, CaptureQueriesContext, int]:
    """Fetch twice; return both answers, the queries of each, and the searches the first made."""
    with CaptureQueriesContext(connection) as first:
        before = fetch()
    made = len(searches)
    with CaptureQueriesContext(connection) as second:
        after = fetch()
    return before, after, first, second, made


def test_a_second_request_is_answered_from_the_cache(anonymous_client, library, searches) -> None:
    _, _, me, others, _ = library
    keys, again, first, second, made = visit_twice(lambda: similar_keys(anonymous_client, me), searches)
    assert sorted(keys) == sorted(o.key for o in others)
    assert again == keys
    assert made >= 1
    assert len(searches) == made
    assert len(second.captured_queries) < len(first.captured_queries)


def test_a_new_embedding_shows_at_once(anonymous_client, library) -> None:
    version, collection, me, _, base = library
    similar_keys(anonymous_client, me)
    twin = ImageFactory(collection=collection)
    embed(twin, near(base, 99, spread=0.2), version)
    assert similar_keys(anonymous_client, me)[0] == twin.key


def test_a_removed_embedding_leaves_at_once(anonymous_client, library) -> None:
    _, _, me, others, _ = library
    assert others[0].key in similar_keys(anonymous_client, me)
    services.image_reembed(image_ids=[others[0].pk])  # pending again: not searchable
    assert others[0].key not in similar_keys(anonymous_client, me)


def test_a_reviewed_pair_moves_the_cached_list(admin_user, library) -> None:
    version, collection, me, _, base = library
    a, b = ImageFactory(collection=collection), ImageFactory(collection=collection)
    embed(a, near(base, 50, spread=0.3), version)
    embed(b, near(base, 51, spread=0.3), version)
    before = [r.image.pk for r in sim.image_similar(image=me, viewer=admin_user, k=6)]
    assert {a.pk, b.pk} <= set(before)
    first, second = sorted((a.pk, b.pk))
    NearDuplicate.objects.create(collection=collection, first_id=first, second_id=second, distance=0.01)
    after = [r.image.pk for r in sim.image_similar(image=me, viewer=admin_user, k=6)]
    assert len({a.pk, b.pk} & set(after)) == 1


def test_a_collection_made_private_leaves_the_cached_list(anonymous_client, owner_client, owner, library) -> None:
    version, _, me, _, base = library
    private = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    secret = ImageFactory(collection=private)
    embed(secret, near(base, 77, spread=0.2), version)
    assert secret.key in similar_keys(anonymous_client, me)
    services.collection_update(collection=private, visibility=Visibility.PRIVATE)
    assert secret.key not in similar_keys(anonymous_client, me)
    assert secret.key in similar_keys(owner_client, me)


def test_a_stale_cached_list_never_shows_an_image_the_viewer_may_not_see(anonymous_user_viewer, library) -> None:
    """Even a list that outlived its data (say, written by a reader that raced a writer)."""
    version, _, me, others, _ = library
    secret = ImageFactory(collection=CollectionFactory(visibility=Visibility.PRIVATE))
    scope = sim.search_scope(version=version, viewer=anonymous_user_viewer, exclude_image_ids=[me.pk])
    key = sim._similar_cache_key(image=me, scope=scope, k=5, generation=sim.search_generation())
    cache.set(key, {"rows": [(secret.pk, 0.01), (others[0].pk, 0.2)], "moments": []})
    results = sim.image_similar(image=me, viewer=anonymous_user_viewer, k=5)
    assert [r.image.pk for r in results] == [others[0].pk]


def page_similar(client, image) -> list[tuple[str, str]]:
    response = client.get(f"/i/{image.key}/")
    assert response.status_code == 200
    return [(tile.key, tile.name) for tile in shown_similar(response)]


def test_a_repeat_page_view_reuses_the_rendered_section(anonymous_client, library, searches) -> None:
    _, _, me, others, _ = library
    shown, again, first, second, made = visit_twice(lambda: page_similar(anonymous_client, me), searches)
    assert sorted(key for key, _ in shown) == sorted(o.key for o in others)
    assert again == shown and len(searches) == made
    # The rows' images are neither loaded nor rendered again: one query checks what they show.
    loads = [q["sql"] for q in second.captured_queries if 'FROM "simili_image"' in q["sql"] and "IN (" in q["sql"]]
    assert loads == [] and len(second.captured_queries) < len(first.captured_queries)


def test_a_renamed_result_shows_its_new_name_on_a_cached_page(anonymous_client, library) -> None:
    _, _, me, others, _ = library
    assert (others[0].key, others[0].original_name) in page_similar(anonymous_client, me)
    Image.objects.filter(pk=others[0].pk).update(original_name="renamed <b>.jpg")  # no embedding written
    assert (others[0].key, "renamed <b>.jpg") in page_similar(anonymous_client, me)


@pytest.mark.parametrize("change", ["failed", "private", "deleted"])
def test_a_result_that_may_no_longer_show_leaves_a_cached_page(anonymous_client, owner, library, change) -> None:
    """Changes that write no embedding (so the generation stays) still reach the cached HTML."""
    version, _, me, _, base = library
    elsewhere = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    result = ImageFactory(collection=elsewhere)
    embed(result, near(base, 78, spread=0.2), version)
    assert result.key in {key for key, _ in page_similar(anonymous_client, me)}
    generation = sim.search_generation()
    if change == "failed":
        Image.objects.filter(pk=result.pk).update(status=ImageStatus.FAILED)
    elif change == "private":
        elsewhere.visibility = Visibility.PRIVATE
        elsewhere.save(update_fields=["visibility"])
    else:
        Image.objects.filter(pk=result.pk).delete()
    assert change == "deleted" or sim.search_generation() == generation
    assert result.key not in {key for key, _ in page_similar(anonymous_client, me)}


def test_a_cached_section_is_used_only_for_what_it_was_rendered_from(settings, anonymous_client,
                                                                      anonymous_user_viewer, library) -> None:
    """A section whose recorded rows no longer match what the viewer may see is rendered anew."""
    version, _, me, others, _ = library
    page_similar(anonymous_client, me)
    scope = sim.search_scope(version=version, viewer=anonymous_user_viewer, exclude_image_ids=[me.pk])
    key = sim._similar_cache_key(image=me, scope=scope, k=settings.SIMILAR_K, generation=sim.search_generation(),
                                 moments=settings.VIDEO_MOMENTS_K) + ":section"
    entry = cache.get(key)
    assert entry and entry["html"].count('class="tile"') == len(others)
    cache.set(key, {**entry, "html": "<p>stale secret</p>", "shown": [["i", 0, "x", "y"]]})
    response = anonymous_client.get(f"/i/{me.key}/")
    assert "stale secret" not in response.content.decode()
    assert sorted(tile.key for tile in shown_similar(response)) == sorted(o.key for o in others)


@pytest.fixture
def anonymous_user_viewer():
    from django.contrib.auth.models import AnonymousUser

    return AnonymousUser()


def test_without_redis_the_list_is_computed(settings, anonymous_user_viewer, library) -> None:
    _, _, me, others, _ = library
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}
    results = sim.image_similar(image=me, viewer=anonymous_user_viewer, k=5)
    assert sorted(r.image.pk for r in results) == sorted(o.pk for o in others)


def test_off_when_the_setting_is_zero(settings, anonymous_client, library, searches) -> None:
    settings.SIMILAR_CACHE_SECONDS = 0
    _, _, me, _, _ = library
    similar_keys(anonymous_client, me)
    made = len(searches)
    similar_keys(anonymous_client, me)
    assert made >= 1 and len(searches) == 2 * made


@pytest.mark.django_db(transaction=True)
def test_the_generation_moves_at_each_write_and_again_at_commit() -> None:
    version = default_version()
    image = ImageFactory()
    start = sim.search_generation()
    with transaction.atomic():
        embed(image, unit_vector(3), version)
        inside = sim.search_generation()
        assert inside != start  # the writer reads its own writes fresh
    committed = sim.search_generation()
    assert committed != inside  # a reader that took `inside` before the commit is left behind
    identity, value = committed.split(".")
    assert identity == start.split(".")[0] and int(value) > int(inside.split(".")[1])
