"""Refreshing a collection's augmented vectors: the right neighbours, once its uploads have settled."""

from __future__ import annotations

import time

import numpy as np
import pytest
from django.core.cache import cache
from django.utils import timezone

from retrieval.evaluation import rank_by_similarity
from retrieval.reranking import augment_database
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, half, near, unit_vector
from webapp import services, tasks
from webapp.models import Embedding, Image, NearDuplicate

pytestmark = pytest.mark.django_db


def _collection(owner, vectors: list[np.ndarray]):
    version = default_version()
    collection = CollectionFactory(owner=owner)
    for vector in vectors:
        embed(ImageFactory(collection=collection), vector, version)
    return collection


def _augmented(collection) -> np.ndarray:
    rows = Embedding.objects.filter(collection=collection).order_by("image_id")
    return np.stack([np.asarray(row.augmented, dtype=np.float32) for row in rows])


def test_each_vector_is_averaged_with_its_nearest_in_its_own_collection(owner, settings) -> None:
    settings.SIMILAR_DBA, settings.SIMILAR_ALPHA = 5, 3.0
    vectors = [half(near(unit_vector(seed % 4), 100 + seed, spread=1.0)) for seed in range(40)]
    collection = _collection(owner, vectors)
    outsider = _collection(owner, [half(near(unit_vector(0), 999, spread=0.3))])

    changed = services.collection_augment(collection_id=collection.pk)

    database = np.stack(vectors)
    itself = np.arange(len(database))
    expected = augment_database(database, rank_by_similarity(database, database, exclude=itself), n=5, alpha=3.0)
    assert changed == len(vectors)
    np.testing.assert_allclose(_augmented(collection), expected, atol=2e-3)  # stored in half precision
    np.testing.assert_array_equal(_augmented(outsider), np.stack([half(near(unit_vector(0), 999, spread=0.3))]))
    assert services.collection_augment(collection_id=collection.pk) == 0  # nothing left to change


def test_a_refresh_after_new_images_recomputes_only_what_they_change(owner, settings) -> None:
    settings.SIMILAR_DBA, settings.SIMILAR_ALPHA = 5, 3.0
    old = [half(near(unit_vector(seed % 3), 100 + seed, spread=1.0)) for seed in range(30)]
    collection = _collection(owner, old)
    services.collection_augment(collection_id=collection.pk)
    assert not Embedding.objects.filter(collection=collection, augment_floor__isnull=True).exists()
    # A row far from everything new, its stored vector spoiled: only a full refresh would mend it.
    far = Embedding.objects.filter(collection=collection).order_by("image_id")[2]  # cluster 2
    Embedding.objects.filter(pk=far.pk).update(augmented=half(unit_vector(77)))
    new = [half(near(unit_vector(0), 200 + seed, spread=1.0)) for seed in range(4)] + [half(near(old[0], 9, 0.02))]
    version = default_version()
    for vector in new:
        embed(ImageFactory(collection=collection), vector, version)

    changed = services.collection_augment(collection_id=collection.pk, full=False)

    database = np.stack(old + new)
    itself = np.arange(len(database))
    expected = augment_database(database, rank_by_similarity(database, database, exclude=itself), n=5, alpha=3.0)
    stored = _augmented(collection)
    mended = np.ones(len(database), dtype=bool)
    mended[2] = False
    assert 5 <= changed < len(database)
    np.testing.assert_allclose(stored[mended], expected[mended], atol=2e-3)  # as if refreshed in full
    np.testing.assert_array_equal(stored[2], half(unit_vector(77)))  # not affected, not recomputed
    first_id = Embedding.objects.filter(collection=collection).order_by("image_id")[0].image_id
    assert (first_id, max(Image.objects.filter(collection=collection).values_list("pk", flat=True))) in {
        (pair.first_id, pair.second_id) for pair in NearDuplicate.objects.filter(collection=collection)
    }  # the new near-copy of the first image
    assert services.collection_augment(collection_id=collection.pk, full=False) == 0  # nothing new


def test_a_deletion_or_other_settings_ask_for_a_full_refresh(owner, settings, requeued,
                                                              django_capture_on_commit_callbacks) -> None:
    settings.AUGMENT_DELAY = 30
    collection = _collection(owner, [unit_vector(1), near(unit_vector(1), 2), near(unit_vector(1), 3)])
    Embedding.objects.filter(collection=collection).update(created_at=timezone.now() - timezone.timedelta(seconds=60))
    long_ago = time.time() - 10_000
    assert tasks.augment_collection(collection.pk, long_ago) == 3  # the first refresh is full: no record of one
    assert services.augment_full_due(collection.pk) == (False, None)
    settings.SIMILAR_DBA = 3
    assert services.augment_full_due(collection.pk)[0]
    assert tasks.augment_collection(collection.pk, long_ago) == 0  # full (other settings), nothing moved
    assert services.augment_full_due(collection.pk) == (False, None)

    with django_capture_on_commit_callbacks(execute=True):
        services.image_delete(image=Image.objects.filter(collection=collection).first())

    assert services.augment_full_due(collection.pk)[0]
    cache.delete(services.augment_key(collection.pk))  # the chain the deletion scheduled (not run here)
    # An upload's chain, not an admin's: full only because the deletion asked for it.
    assert tasks.augment_collection(collection.pk, long_ago) == 2  # the two left, each now with the other only
    assert services.augment_full_due(collection.pk) == (False, None)


def test_in_a_collection_smaller_than_its_neighbour_count_each_new_image_joins_all(owner, settings) -> None:
    settings.SIMILAR_DBA, settings.SIMILAR_ALPHA = 10, 3.0
    vectors = [half(near(unit_vector(0), 300 + seed, spread=1.0)) for seed in range(8)]  # one cluster: all count
    collection = _collection(owner, vectors[:2])  # fewer rows than neighbours: every new one joins all
    services.collection_augment(collection_id=collection.pk)
    version = default_version()
    for vector in vectors[2:]:
        embed(ImageFactory(collection=collection), vector, version)
        services.collection_augment(collection_id=collection.pk, full=False)

    database = np.stack(vectors)
    itself = np.arange(len(database))
    expected = augment_database(database, rank_by_similarity(database, database, exclude=itself), n=7, alpha=3.0)
    np.testing.assert_allclose(_augmented(collection), expected, atol=2e-3)


def test_without_augmentation_a_refresh_keeps_raw_vectors_and_finds_pairs(owner, settings) -> None:
    settings.SIMILAR_DBA = 0
    collection = _collection(owner, [half(unit_vector(1)), half(near(unit_vector(1), 2, spread=0.02))])
    services.collection_augment(collection_id=collection.pk)
    pair = NearDuplicate.objects.get(collection=collection)
    pair.status = NearDuplicate.Status.DISMISSED
    pair.save()
    embed(ImageFactory(collection=collection), half(near(unit_vector(1), 3, spread=0.02)))

    assert services.collection_augment(collection_id=collection.pk, full=False) == 0

    assert set(Embedding.objects.filter(collection=collection).values_list("augment_floor", flat=True)) == {
        float("inf")}
    statuses = sorted(NearDuplicate.objects.filter(collection=collection).values_list("status", flat=True))
    assert statuses == ["dismissed", "open", "open"]  # the dismissed answer kept; the new copy paired twice


@pytest.fixture
def requeued(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(tasks.augment_collection, "apply_async", lambda **kwargs: calls.append(kwargs))
    yield calls
    for call in calls:
        cache.delete(services.augment_key(call["args"][0]))


def test_an_upload_schedules_one_refresh_per_collection(owner, settings, requeued) -> None:
    settings.AUGMENT_DELAY = 30
    collection = _collection(owner, [unit_vector(1)])

    services.schedule_augment(collection.pk)
    services.schedule_augment(collection.pk)  # the pending one will see this upload too

    assert len(requeued) == 1
    assert requeued[0]["args"] == [collection.pk, cache.get(services.augment_key(collection.pk))]
    assert requeued[0]["countdown"] == 30 and requeued[0]["queue"] == services.BULK_QUEUE


def test_a_refresh_waits_while_the_collection_is_still_growing(owner, settings, requeued) -> None:
    settings.AUGMENT_DELAY = 30
    collection = _collection(owner, [unit_vector(1), near(unit_vector(1), 2)])  # vectors stored just now
    first = time.time() - 5

    assert tasks.augment_collection(collection.pk, first) == 0

    assert len(requeued) == 1
    assert requeued[0]["args"] == [collection.pk, first] and 25 < requeued[0]["countdown"] <= 31
    assert cache.get(services.augment_key(collection.pk)) == first  # this chain still owns the refresh
    unchanged = np.stack([half(unit_vector(1)), half(near(unit_vector(1), 2))])
    np.testing.assert_array_equal(_augmented(collection), unchanged)


def test_a_refresh_runs_once_uploads_pause_or_it_has_waited_its_longest(owner, settings, requeued) -> None:
    settings.AUGMENT_DELAY = 30
    quiet = _collection(owner, [unit_vector(1), near(unit_vector(1), 2)])
    Embedding.objects.filter(collection=quiet).update(created_at=timezone.now() - timezone.timedelta(seconds=31))
    busy = _collection(owner, [unit_vector(3), near(unit_vector(3), 4)])
    almost = _collection(owner, [unit_vector(5), near(unit_vector(5), 6)])

    assert tasks.augment_collection(quiet.pk, time.time()) == 2
    assert tasks.augment_collection(busy.pk, 0.0) == 2  # first scheduled long ago: refreshed all the same
    assert tasks.augment_collection(almost.pk, time.time() - 29.5 * 30) == 0
    assert requeued[0]["countdown"] <= 0.5 * 30 + 1  # the wait never passes its longest
    assert cache.get(services.augment_key(quiet.pk)) is None  # uploads from now on schedule anew


def test_an_admins_refresh_runs_at_once_and_a_superseded_one_not_at_all(owner, settings, requeued) -> None:
    settings.AUGMENT_DELAY = 30
    growing = _collection(owner, [unit_vector(1), near(unit_vector(1), 2)])
    taken = _collection(owner, [unit_vector(3), near(unit_vector(3), 4)])
    cache.set(services.augment_key(taken.pk), 123.0)

    assert tasks.augment_collection(growing.pk) == 2  # curation sends no `first`: no waiting
    assert tasks.augment_collection(taken.pk, 456.0) == 0  # chain 123.0 holds the key
    assert requeued == []
    cache.delete(services.augment_key(taken.pk))
