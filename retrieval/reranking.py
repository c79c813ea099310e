"""Re-ranking by average query expansion (Chum et al. 2007), as pure functions on numpy arrays."""

from __future__ import annotations

import numpy as np

#: Neighbours averaged into the query. Five is the usual choice in the literature (Chum et al.;
#: Radenović et al. report AQE with n in 5..10) and small next to any class we hope to find:
#: on a collection with fewer than ~20 similar images per subject, a larger n drags in strangers.
DEFAULT_QE_NEIGHBOURS = 5

#: alpha-weighted expansion (Radenovic et al. 2018, "alpha-QE"): each neighbour counts with
#: weight max(similarity, 0) ** alpha. With alpha = 3 a neighbour at 0.9 counts 0.73 and an
#: unrelated one at 0.2 counts 0.008, so expansion is safe where a collection holds only a few
#: similar images; alpha = 0 is the plain average.
DEFAULT_ALPHA = 3.0


def _weights(queries: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """Return (q, n) weights of each query's neighbours; queries (q, d), neighbours (q, n, d)."""
    if alpha == 0:
        return np.ones(neighbours.shape[:2], dtype=np.float32)
    similarity = np.einsum("qd,qnd->qn", queries, neighbours)
    return np.maximum(similarity, 0.0) ** alpha


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def expand_query(
    query: np.ndarray, neighbours: np.ndarray, *, n: int = DEFAULT_QE_NEIGHBOURS, alpha: float = 0.0
) -> np.ndarray:
    """Return the unit-length average of a query and its first `n` neighbours.

    Search again with the result to get the re-ranked list. The web app's database version
    must follow the same semantics: neighbours are the stored unit vectors of the first `n`
    results of the original search, best first, with the query image itself left out.

    Args:
        query: (d,) unit vector of the query.
        neighbours: (k, d) unit vectors of the query's results, best first; when k < n all are used.
        n: how many neighbours to average in; 0 returns the query unchanged.
        alpha: weight each neighbour by max(similarity to the query, 0) ** alpha; 0 = plain average.

    Returns:
        A (d,) float32 unit vector.
    """
    query = np.asarray(query, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.float32)
    if query.ndim != 1:
        raise ValueError(f"expected query ndim to be 1, got {query.ndim}")
    if neighbours.ndim != 2 or (len(neighbours) and neighbours.shape[1] != query.shape[0]):
        raise ValueError(f"expected neighbours of shape (k, {query.shape[0]}), got {neighbours.shape}")
    if n < 0:
        raise ValueError(f"expected n >= 0, got {n}")
    chosen = neighbours[:n]
    weights = _weights(query[None], chosen[None], alpha)[0]
    return _unit(query + (weights[:, None] * chosen).sum(axis=0))


def expand_queries(
    queries: np.ndarray, database: np.ndarray, ranking: np.ndarray, *, n: int = DEFAULT_QE_NEIGHBOURS,
    alpha: float = 0.0,
) -> np.ndarray:
    """Apply `expand_query` to many queries at once, given their first ranking.

    Args:
        queries: (q, d) unit vectors.
        database: (m, d) unit vectors.
        ranking: (q, k) database indices per query, best first, without the query itself.
        n: neighbours averaged in.
        alpha: neighbour weighting, as in `expand_query`.

    Returns:
        (q, d) unit vectors, row i equal to `expand_query(queries[i], database[ranking[i]], n=n, alpha=alpha)`.
    """
    if n < 0:
        raise ValueError(f"expected n >= 0, got {n}")
    neighbours = database[ranking[:, :n]]
    weights = _weights(queries, neighbours, alpha)
    return _unit(queries + (weights[..., None] * neighbours).sum(axis=1))


def augment_database(
    database: np.ndarray, ranking: np.ndarray, *, n: int = DEFAULT_QE_NEIGHBOURS, alpha: float = 0.0
) -> np.ndarray:
    """Return database-side augmentation (DBA): every stored vector replaced by its own expansion.

    Row i is `expand_query(database[i], database[ranking[i]], n=n)`: the same average as query
    expansion, applied once to each stored vector with neighbours found among the original (not
    yet augmented) vectors. Queries are then searched against the augmented rows (and may be
    expanded again with `expand_query` over those rows). Recompute when the collection changes.

    Args:
        database: (m, d) unit vectors.
        ranking: (m, k) each row's nearest database indices, best first, itself left out.
        n: neighbours averaged in.

    Returns:
        (m, d) unit vectors.
    """
    return expand_queries(database, database, ranking, n=n, alpha=alpha)
