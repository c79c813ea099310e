"""The similar-image query: pgvector's answer equals an exact numpy reference, on an HNSW index."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, unit_vector
from webapp import selectors
from webapp.models import ImageStatus

pytestmark = pytest.mark.django_db


def test_top_k_equals_exact_numpy_ranking_with_distances(admin_user) -> None:
    version = default_version()
    collection = CollectionFactory()
    vectors = np.stack([unit_vector(seed) for seed in range(60)])
    images = [ImageFactory(collection=collection) for _ in range(60)]
    for image, vector in zip(images, vectors, strict=True):
        embed(image, vector, version)
    query = unit_vector(1000)

    results = selectors.vector_similar(vector=query.tolist(), version=version, viewer=admin_user, k=10)

    similarity = vectors @ query
    expected = np.argsort(-similarity)[:10]
    assert [r.image.pk for r in results] == [images[i].pk for i in expected]
    np.testing.assert_allclose([r.similarity for r in results], similarity[expected], atol=1e-5)


def test_an_image_is_never_its_own_similar_result_and_pending_images_are_skipped(admin_user) -> None:
    version = default_version()
    collection = CollectionFactory()
    base = unit_vector(1)
    me, twin, pending = (ImageFactory(collection=collection) for _ in range(3))
    pending.status = ImageStatus.PENDING
    pending.save()
    for image in (me, twin, pending):
        embed(image, base, version)

    results = selectors.image_similar(image=me, viewer=admin_user, k=5)

    assert [r.image.pk for r in results] == [twin.pk]
    assert results[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_each_model_version_has_a_partial_hnsw_cosine_index_that_the_query_uses(admin_user) -> None:
    version = default_version()
    collection = CollectionFactory()
    for seed in range(5):
        embed(ImageFactory(collection=collection), unit_vector(seed), version)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [version.index_name])
        (indexdef,) = cursor.fetchone()
        assert "USING hnsw" in indexdef
        assert "vector_cosine_ops" in indexdef
        assert f"model_version_id = {version.pk}" in indexdef
        # Five rows would never justify an index to the planner; forbid the alternatives.
        for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            cursor.execute(f"SET LOCAL {knob} = off")
        literal = "[" + ",".join(str(x) for x in unit_vector(9)) + "]"
        cursor.execute(
            "EXPLAIN SELECT image_id FROM simili_embedding WHERE model_version_id = %s "
            "ORDER BY vector::vector(1280) <=> %s::vector(1280) LIMIT 12",
            [version.pk, literal],
        )
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert version.index_name in plan
