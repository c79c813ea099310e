"""Filtered similar-image search: the plan follows the filter's size, and k results always return."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, half
from webapp import similarity as sim
from webapp.models import Visibility

pytestmark = pytest.mark.django_db


@pytest.fixture
def library(owner, django_user_model):
    """600 clustered vectors: 30 in the viewer's own private collection, the rest in others' private ones."""
    version = default_version()
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, 1280)).astype(np.float32)
    stranger = django_user_model.objects.create_user("stranger")
    mine = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    theirs = [CollectionFactory(owner=stranger, visibility=Visibility.PRIVATE) for _ in range(3)]
    rows = []
    for index in range(600):
        vector = centres[index % 6] + rng.standard_normal(1280).astype(np.float32)
        vector = half(vector / np.linalg.norm(vector))
        collection = mine if index % 20 == 0 else theirs[index % 3]
        image = ImageFactory(collection=collection)
        embed(image, vector, version)
        rows.append((image.pk, collection.pk, vector))
    return version, owner, mine, rows


def _exact_top(rows, query: np.ndarray, collection_ids: set[int], k: int) -> list[int]:
    visible = [(image_id, vector) for image_id, collection_id, vector in rows if collection_id in collection_ids]
    scores = np.array([vector @ half(query) for _, vector in visible])
    return [visible[i][0] for i in np.argsort(-scores)[:k]]


def test_a_small_filter_is_answered_exactly_and_a_large_one_by_hnsw(library, settings, admin_user) -> None:
    version, owner, mine, _ = library
    settings.EXACT_SEARCH_MAX_ROWS = 100
    assert sim.choose_plan(sim.search_scope(version=version, viewer=owner)) == "exact"  # 30 rows
    assert sim.choose_plan(sim.search_scope(version=version, viewer=admin_user)) == "hnsw"  # no filter
    settings.EXACT_SEARCH_MAX_ROWS = 10
    assert sim.choose_plan(sim.search_scope(version=version, viewer=owner)) == "hnsw"


def test_the_exact_plan_reads_the_btree_not_the_hnsw_graph(library) -> None:
    version, owner, _, rows = library
    scope = sim.search_scope(version=version, viewer=owner)
    sql, params = sim.nearest_sql(scope=scope, k=5)
    params["query"] = "[" + ",".join(str(x) for x in rows[0][2]) + "]"
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_indexscan = off")  # what nearest(plan="exact") sets
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Bitmap Index Scan" in plan  # a btree narrows the rows; every distance is computed
    assert version.index_name not in plan


@pytest.mark.parametrize("exact_below", [0, 100_000])
def test_a_selective_filter_returns_k_results_equal_to_the_exact_answer(library, settings, exact_below) -> None:
    """5% of the rows visible: HNSW (forced) keeps walking the graph until k pass; exact is exact."""
    version, owner, mine, rows = library
    settings.EXACT_SEARCH_MAX_ROWS = exact_below
    settings.HNSW_EF_SEARCH = 10  # a short candidate list: only the iterative scan can find k
    rng = np.random.default_rng(9)
    recalls = []
    for _ in range(10):
        query = rng.standard_normal(1280).astype(np.float32)
        query /= np.linalg.norm(query)
        results = sim.vector_similar(vector=query, version=version, viewer=owner, k=10, expand=0)
        got = [r.image.pk for r in results]
        assert len(got) == 10
        assert {r.image.collection_id for r in results} == {mine.pk}
        recalls.append(len(set(got) & set(_exact_top(rows, query, {mine.pk}, 10))) / 10)
    assert min(recalls) >= (1.0 if exact_below else 0.9)


def test_asking_for_more_than_the_filter_holds_returns_all_of_it(library, settings) -> None:
    version, owner, mine, rows = library
    settings.EXACT_SEARCH_MAX_ROWS = 0
    results = sim.vector_similar(vector=rows[0][2], version=version, viewer=owner, k=50, expand=0)
    assert len(results) == 30


def test_one_search_function_takes_positive_and_negative_examples(library, admin_user) -> None:
    version, _, _, rows = library
    # rows i and i + 6 share a cluster; two positives of cluster 0, one negative of cluster 1
    positives = [rows[0][2], rows[6][2]]
    query = sim.SearchQuery(positives=positives, exclude_image_ids=[rows[0][0], rows[6][0]])
    liked = sim.images_search(query=query, version=version, viewer=admin_user, k=10, expand=0)
    assert rows[0][0] not in [r.image.pk for r in liked] and rows[6][0] not in [r.image.pk for r in liked]
    cluster = {image_id for i, (image_id, _, _) in enumerate(rows) if i % 6 == 0}
    assert all(r.image.pk in cluster for r in liked)

    mean = np.mean(positives, axis=0) - 0.5 * rows[1][2]
    expected = mean / np.linalg.norm(mean)
    pushed = sim.SearchQuery(positives=positives, negatives=[rows[1][2]])
    np.testing.assert_allclose(pushed.vector(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        sim.SearchQuery(positives=[rows[0][2], -rows[0][2]]).vector()


def test_a_filter_keeping_a_large_share_of_the_graph_walks_it(library, settings, monkeypatch) -> None:
    """Below the row threshold, HNSW still wins when the filter keeps much of the graph."""
    version, owner, _, _ = library
    settings.EXACT_SEARCH_MAX_ROWS = 100
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE simili_embedding")  # records the version's row count on its index
        cursor.execute("SELECT reltuples FROM pg_class WHERE relname = %s", [version.index_name])
        assert cursor.fetchone()[0] == pytest.approx(600, rel=0.1)
    scope = sim.search_scope(version=version, viewer=owner)  # 30 of 600 rows: a 5% share
    monkeypatch.setattr(sim, "HNSW_MIN_SHARE", 0.2)
    assert sim.choose_plan(scope) == "exact"
    monkeypatch.setattr(sim, "HNSW_MIN_SHARE", 0.01)
    assert sim.choose_plan(scope) == "hnsw"
