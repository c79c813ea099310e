"""Retrieval metrics over ranked relevance: mAP, mAP@R, precision@k, recall@k, PR curves.

Every function takes `relevance`, a boolean (queries, ranked items) array whose row holds, best
first, whether each returned item is relevant to that query, and `n_relevant`, how many
relevant items each query has in the whole database (so a relevant item the ranking missed
still counts against recall and AP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Recall levels of the interpolated precision-recall curve (the classic 11-point curve, finer).
RECALL_LEVELS = np.linspace(0.0, 1.0, 21)
#: Cut-offs reported by default: P@1 is "is the first answer right", P@10 and P@20 a first
#: page of results, P@100 the size of a Corel-1k class.
DEFAULT_KS = (1, 10, 20, 100)


def _check(relevance: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    relevance = np.asarray(relevance, dtype=bool)
    if relevance.ndim != 2:
        raise ValueError(f"expected relevance ndim to be 2, got {relevance.ndim}")
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if n_relevant.shape != (relevance.shape[0],):
        raise ValueError(f"expected n_relevant of shape ({relevance.shape[0]},), got {n_relevant.shape}")
    if (relevance.sum(axis=1) > n_relevant).any():
        raise ValueError("a ranking holds more relevant items than n_relevant says exist")
    return relevance, n_relevant


def _precision_at_each_rank(relevance: np.ndarray) -> np.ndarray:
    return np.cumsum(relevance, axis=1) / np.arange(1, relevance.shape[1] + 1)


def average_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Return each query's AP: the mean, over its relevant items, of precision at their rank.

    Args:
        relevance: (queries, ranked) booleans, best first.
        n_relevant: relevant items per query in the database; a query with none gets AP 0.

    Returns:
        A (queries,) float array.
    """
    relevance, n_relevant = _check(relevance, n_relevant)
    hits = (_precision_at_each_rank(relevance) * relevance).sum(axis=1)
    return np.where(n_relevant > 0, hits / np.maximum(n_relevant, 1), 0.0)


def average_precision_at_r(relevance: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Return each query's AP@R (Musgrave et al. 2020): AP counted over the first R ranks only,
    R being that query's number of relevant items, so 1.0 means the first R answers are the R relevant.
    """
    relevance, n_relevant = _check(relevance, n_relevant)
    precision = _precision_at_each_rank(relevance)
    ranks = np.arange(1, relevance.shape[1] + 1)
    within_r = ranks[None, :] <= n_relevant[:, None]
    hits = (precision * relevance * within_r).sum(axis=1)
    return np.where(n_relevant > 0, hits / np.maximum(n_relevant, 1), 0.0)


def precision_at(relevance: np.ndarray, k: int) -> np.ndarray:
    """Return each query's fraction of relevant items among its first `k` answers."""
    relevance = np.asarray(relevance, dtype=bool)
    if not 1 <= k <= relevance.shape[1]:
        raise ValueError(f"expected 1 <= k <= {relevance.shape[1]}, got {k}")
    return relevance[:, :k].sum(axis=1) / k


def recall_at(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Return each query's fraction of all its relevant items found among its first `k` answers.

    This is the IR recall@k, not the "at least one hit in k" rate some metric-learning papers call recall.
    """
    relevance, n_relevant = _check(relevance, n_relevant)
    if not 1 <= k <= relevance.shape[1]:
        raise ValueError(f"expected 1 <= k <= {relevance.shape[1]}, got {k}")
    return np.where(n_relevant > 0, relevance[:, :k].sum(axis=1) / np.maximum(n_relevant, 1), 0.0)


def interpolated_pr_curve(relevance: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Return the mean interpolated precision at each of `RECALL_LEVELS`.

    Interpolated precision at recall r is the best precision at any rank whose recall is >= r.
    """
    relevance, n_relevant = _check(relevance, n_relevant)
    precision = _precision_at_each_rank(relevance)
    recall = np.cumsum(relevance, axis=1) / np.maximum(n_relevant, 1)[:, None]
    # Best precision from each rank to the end of the ranking.
    best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    curve = np.zeros((relevance.shape[0], len(RECALL_LEVELS)))
    for j, level in enumerate(RECALL_LEVELS):
        reached = recall >= level - 1e-12
        first = np.where(reached.any(axis=1), reached.argmax(axis=1), -1)
        curve[:, j] = np.where(first >= 0, best_after[np.arange(len(first)), np.maximum(first, 0)], 0.0)
    return curve.mean(axis=0)


def rank_by_similarity(
    queries: np.ndarray, database: np.ndarray, *, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Return, per query, database indices sorted by descending dot product.

    Args:
        queries: (q, d) unit vectors.
        database: (n, d) unit vectors.
        exclude: optional (q,) database index to drop from each query's ranking (the query itself).

    Returns:
        A (q, n) int array, or (q, n - 1) when `exclude` is given; ties keep database order.
    """
    scores = queries @ database.T
    order = np.argsort(-scores, axis=1, kind="stable")
    if exclude is None:
        return order
    keep = order != np.asarray(exclude)[:, None]
    return order[keep].reshape(order.shape[0], order.shape[1] - 1)


@dataclass(frozen=True)
class RetrievalReport:
    """The scores of one configuration on one labelled collection."""

    mean_ap: float
    map_at_r: float
    precision: dict[int, float]
    recall: dict[int, float]
    per_class_ap: dict[str, float]
    pr_curve: list[float]
    per_class_pr_curve: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "mAP": self.mean_ap,
            "mAP@R": self.map_at_r,
            "precision": {f"P@{k}": v for k, v in self.precision.items()},
            "recall": {f"R@{k}": v for k, v in self.recall.items()},
            "per_class_AP": self.per_class_ap,
            "recall_levels": [float(level) for level in RECALL_LEVELS],
            "pr_curve": self.pr_curve,
            "per_class_pr_curve": self.per_class_pr_curve,
        }


def evaluate_ranking(
    ranking: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    classes: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    query_in_database: bool = True,
) -> RetrievalReport:
    """Score rankings where an item is relevant when it has the query's label.

    Args:
        ranking: (q, m) database indices per query, best first.
        query_labels: (q,) class index of each query.
        database_labels: (n,) class index of each database item.
        classes: class names, indexed by label.
        ks: cut-offs for precision and recall; those beyond the ranking's length are skipped.
        query_in_database: each query is also in the database (and excluded from its own
            ranking), so it has one relevant item fewer.

    Returns:
        The report, every metric averaged over the queries that have at least one relevant item.
    """
    counts = np.bincount(database_labels, minlength=len(classes))
    n_relevant = counts[query_labels] - (1 if query_in_database else 0)
    answerable = n_relevant > 0
    if not answerable.any():
        raise ValueError("expected at least one query with a relevant item in the database")
    ranking, query_labels, n_relevant = ranking[answerable], query_labels[answerable], n_relevant[answerable]
    relevance = database_labels[ranking] == query_labels[:, None]
    ap = average_precision(relevance, n_relevant)
    ks = [k for k in ks if k <= relevance.shape[1]]
    per_class_ap = {}
    per_class_curve = {}
    for label, name in enumerate(classes):
        rows = query_labels == label
        if rows.any():
            per_class_ap[name] = float(ap[rows].mean())
            per_class_curve[name] = interpolated_pr_curve(relevance[rows], n_relevant[rows]).tolist()
    return RetrievalReport(
        mean_ap=float(ap.mean()),
        map_at_r=float(average_precision_at_r(relevance, n_relevant).mean()),
        precision={k: float(precision_at(relevance, k).mean()) for k in ks},
        recall={k: float(recall_at(relevance, n_relevant, k).mean()) for k in ks},
        per_class_ap=per_class_ap,
        pr_curve=interpolated_pr_curve(relevance, n_relevant).tolist(),
        per_class_pr_curve=per_class_curve,
    )
