"""Query expansion and database-side augmentation on small arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation import rank_by_similarity
from retrieval.reranking import augment_database, expand_queries, expand_query


def test_expand_query_averages_the_query_with_its_first_n_neighbours() -> None:
    query = np.array([1.0, 0.0])
    neighbours = np.array([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(expand_query(query, neighbours, n=2), np.array([1.0, 2.0]) / np.sqrt(5), atol=1e-6)


def test_expand_query_with_no_neighbours_returns_the_query() -> None:
    query = np.array([0.6, 0.8])
    np.testing.assert_allclose(expand_query(query, np.array([[1.0, 0.0]]), n=0), query, atol=1e-6)
    np.testing.assert_allclose(expand_query(query, np.zeros((0, 2)), n=5), query, atol=1e-6)


def test_expand_query_uses_every_neighbour_when_there_are_fewer_than_n() -> None:
    result = expand_query(np.array([1.0, 0.0]), np.array([[0.0, 1.0]]), n=5)
    np.testing.assert_allclose(result, np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-6)
    assert result.dtype == np.float32


def test_expand_query_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected query ndim to be 1"):
        expand_query(np.ones((1, 2)), np.ones((1, 2)), n=1)
    with pytest.raises(ValueError, match=r"expected neighbours of shape \(k, 2\)"):
        expand_query(np.ones(2), np.ones((1, 3)), n=1)


def test_the_batch_version_matches_the_single_query_function() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(12, 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ranking = rank_by_similarity(vectors, vectors, exclude=np.arange(12))
    batch = expand_queries(vectors, vectors, ranking, n=3)
    for i in range(12):
        np.testing.assert_allclose(batch[i], expand_query(vectors[i], vectors[ranking[i]], n=3), atol=1e-6)
    np.testing.assert_allclose(augment_database(vectors, ranking, n=3), batch, atol=1e-6)


def test_expansion_pulls_a_query_into_its_cluster() -> None:
    # The query is nearest to one stranger, but three of its next neighbours agree on the cluster.
    database = np.array([[0.0, 1.0], [0.8, 0.6], [0.8, 0.6], [0.8, 0.6], [0.6, 0.8]])
    query = np.array([0.5, 0.866])
    first = rank_by_similarity(query[None], database)[0]
    assert first[0] == 4
    expanded = expand_query(query, database[first], n=4)
    again = rank_by_similarity(expanded[None], database)[0]
    assert set(again[:3].tolist()) == {1, 2, 3}


def test_alpha_weighting_lets_unrelated_neighbours_barely_count() -> None:
    from retrieval.reranking import expand_query

    query = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    close = np.array([0.8, 0.6, 0.0], dtype=np.float32)  # similarity 0.8 -> weight 0.512
    unrelated = np.array([0.0, 0.0, 1.0], dtype=np.float32)  # similarity 0 -> weight 0
    expanded = expand_query(query, np.stack([close, unrelated]), n=2, alpha=3.0)
    expected = query + 0.512 * close
    np.testing.assert_allclose(expanded, expected / np.linalg.norm(expected), atol=1e-6)
    plain = expand_query(query, np.stack([close, unrelated]), n=2, alpha=0.0)
    assert plain[2] > 0.3 and expanded[2] == 0.0
