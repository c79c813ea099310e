"""Refreshing a collection's augmented vectors: each image's nearest neighbours in its own collection."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation import rank_by_similarity
from retrieval.reranking import augment_database
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, half, near, unit_vector
from webapp import services
from webapp.models import Embedding

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
