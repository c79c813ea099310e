"""Reads: the one similar-image search, and how each query reaches pgvector.

Every query type (a stored image, an uploaded image or a crop of one, several positive and
negative examples) becomes one query vector and goes through `images_search`. What the viewer
may see is a list of collections resolved first and applied inside the SQL; the filter's size
picks the plan (docs/search.md):

- no filter (admins): the version's HNSW index;
- a filter over at most EXACT_SEARCH_MAX_ROWS rows: every distance computed exactly, through the
  (model_version, collection) btree: recall 1.0 in bounded time;
- a larger filter: HNSW with an iterative scan, which keeps walking the graph until k rows pass;
  should it still come back short, the exact plan answers instead, so k results always return.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Q

from retrieval.reranking import expand_query
from webapp.embeddings import binary_cursor, embedding_index_ready
from webapp.models import Collection, EmbeddingModel, Image, NearDuplicate
from webapp.selectors import Viewer, active_model_version, images_loaded, is_admin, listed_filter

if TYPE_CHECKING:
    from webapp.videos import Moment

logger = logging.getLogger(__name__)

#: What new_key() makes (token_urlsafe); anything else is no image's key.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,24}")

#: Weight of the mean negative example in a multi-example query (Rocchio's query
#: modification: move towards what is wanted, away from what is not, never past it).
NEGATIVE_WEIGHT = 0.5

Plan = Literal["hnsw", "exact"]

#: A stored image's cached lists: (image id, distance) and (video id, frame id, distance).
Rows = list[tuple[int, float]]
MomentRows = list[tuple[int, int, float]]


@dataclass(frozen=True)
class SimilarImage:
    image: Image
    similarity: float

    @property
    def percent(self) -> int:
        return max(0, min(100, round(self.similarity * 100)))


@dataclass(frozen=True)
class SearchQuery:
    """What to look for: vectors to move towards and away from, and images to leave out."""

    positives: Sequence[np.ndarray]
    negatives: Sequence[np.ndarray] = ()
    exclude_image_ids: Sequence[int] = ()

    def vector(self) -> np.ndarray:
        """Return the unit query vector: mean positive minus NEGATIVE_WEIGHT x mean negative."""
        if not len(self.positives):
            raise ValueError("expected at least one positive example")
        query = np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in self.positives]), axis=0)
        if len(self.negatives):
            negative = np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in self.negatives]), axis=0)
            query = query - NEGATIVE_WEIGHT * negative
        norm = float(np.linalg.norm(query))
        if norm == 0.0:
            raise ValueError("the examples cancel out: the query vector is zero")
        return (query / norm).astype(np.float32)


@dataclass
class Scope:
    """The rows a search may return: one version, optionally some collections, minus some images."""

    version: EmbeddingModel
    collection_ids: list[int] | None
    exclude_image_ids: list[int] = field(default_factory=list)


def search_scope(
    *, version: EmbeddingModel, viewer: Viewer, collection_ids: Sequence[int] | None = None,
    exclude_image_ids: Sequence[int] = (),
) -> Scope:
    """Resolve what the viewer may see (and asked for) into the collections a query filters on."""
    allowed: list[int] | None = None
    if not is_admin(viewer):
        allowed = list(Collection.objects.filter(listed_filter(viewer)).values_list("pk", flat=True))
    if collection_ids is not None:
        wanted = set(collection_ids)
        allowed = sorted(wanted if allowed is None else wanted.intersection(allowed))
    return Scope(version=version, collection_ids=allowed, exclude_image_ids=list(exclude_image_ids))


def _where(scope: Scope) -> tuple[str, dict[str, object]]:
    # The version id is inlined as the same integer literal as the partial index's WHERE: a bound
    # parameter arrives as bigint, and PostgreSQL then cannot prove the index's predicate.
    where = [f"model_version_id = {int(scope.version.pk)}"]
    params: dict[str, object] = {}
    if scope.collection_ids is not None:
        where.append("collection_id = ANY(%(collections)s)")
        params["collections"] = scope.collection_ids
    if scope.exclude_image_ids:
        where.append("image_id <> ALL(%(exclude)s)")
        params["exclude"] = scope.exclude_image_ids
    return " AND ".join(where), params


#: Share of a version's rows a filter must keep for HNSW to beat an exact scan of them: the
#: iterative scan reads about k / share graph tuples, the exact plan every visible row
#: (measured crossover: docs/benchmarks.md).
HNSW_MIN_SHARE = 0.05


def search_generation() -> str:
    """Return what moves whenever results may change (migration 0009's triggers).

    The counter's value, prefixed by the counter's own identity: a database created anew (a
    restore, a test run) makes a new counter, so a cache that outlived the old one never
    answers for the new one even where the numbers repeat.
    """
    with connection.cursor() as cursor:
        # last_value reads 1 both before and after the first nextval(); is_called tells them apart.
        cursor.execute("SELECT 'simili_search_generation'::regclass::oid::bigint, last_value + is_called::int "
                       "FROM simili_search_generation")
        identity, value = cursor.fetchone()
        return f"{int(identity)}.{int(value)}"


def _collections_digest(collection_ids: Sequence[int] | None) -> str:
    if collection_ids is None:
        return "all"
    joined = ",".join(str(int(pk)) for pk in sorted(collection_ids))
    return hashlib.blake2b(joined.encode(), digest_size=12).hexdigest()


#: Plans chosen per (generation, version, visible collections), in this process: the bounded
#: count behind a plan reads up to EXACT_SEARCH_MAX_ROWS index entries, and its answer holds
#: until an embedding is written. Bounded: the least recently used go first.
_PLANS: OrderedDict[tuple[str, int, str], Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()
PLAN_MEMORY = 1024


def choose_plan(scope: Scope, *, generation: str | None = None) -> Plan:
    """Exact for a filter over few rows (and a small share of the graph), HNSW otherwise.

    Exact too while the version has no index yet (HNSW_INDEX_MIN_ROWS). With the search
    generation, the answer is remembered until an embedding is written.
    """
    if scope.collection_ids is not None and not scope.collection_ids:
        return "exact"
    if not embedding_index_ready(version=scope.version):
        return "exact"  # no graph to walk yet
    if scope.collection_ids is None:
        return "hnsw"
    if generation is None:
        return _count_plan(scope)
    key = (generation, int(scope.version.pk), _collections_digest(scope.collection_ids))
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    plan = _count_plan(scope)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > PLAN_MEMORY:
            _PLANS.popitem(last=False)
    return plan


def _count_plan(scope: Scope) -> Plan:
    assert scope.collection_ids is not None
    limit = int(settings.EXACT_SEARCH_MAX_ROWS)
    where, params = _where(scope)
    with connection.cursor() as cursor:
        # An index-only scan of (model_version, collection) that reads at most limit + 1 entries,
        # and the version's row count as its index last recorded it (no scan).
        cursor.execute(
            f"""SELECT (SELECT count(*) FROM (SELECT 1 FROM simili_embedding WHERE {where} LIMIT %(limit)s) AS f),
                       (SELECT reltuples FROM pg_class WHERE relname = %(index)s)""",
            {**params, "limit": limit + 1, "index": scope.version.index_name},
        )
        rows, total = cursor.fetchone()
    if rows > limit:
        return "hnsw"
    if total is not None and total > 0 and rows / total >= HNSW_MIN_SHARE:
        return "hnsw"
    return "exact"


def nearest_sql(*, scope: Scope, k: int) -> tuple[str, dict[str, object]]:
    """Return the nearest-rows SQL for a scope and its parameters but the query vector."""
    dim = int(scope.version.dimensions)
    where, params = _where(scope)
    params["k"] = int(k)
    distance = f"augmented::halfvec({dim}) <=> %(query)s::halfvec({dim})"
    # The ORDER BY repeats the index's expression verbatim and has no tie-breaker: anything
    # else and PostgreSQL sorts every row instead of walking the graph. The vectors come back
    # with the rows (from the heap tuples the scan read anyway) for re-ranking and collapsing.
    sql = f"""
        WITH nearest AS MATERIALIZED (
            SELECT image_id, {distance} AS distance, augmented FROM simili_embedding
            WHERE {where} ORDER BY {distance} LIMIT %(k)s
        )
        SELECT image_id, distance, augmented FROM nearest ORDER BY distance
    """
    return sql, params


Hit = tuple[int, float, np.ndarray]


def nearest(*, vector: np.ndarray, scope: Scope, k: int, plan: Plan | None = None) -> list[tuple[int, float]]:
    """Return (image id, cosine distance) of the k nearest rows in scope, nearest first."""
    return [(image_id, distance) for image_id, distance, _ in nearest_hits(vector=vector, scope=scope, k=k, plan=plan)]


def nearest_hits(*, vector: np.ndarray, scope: Scope, k: int, plan: Plan | None = None) -> list[Hit]:
    """Return (image id, cosine distance, search vector) of the k nearest rows in scope, nearest first."""
    from pgvector import HalfVector

    dim = int(scope.version.dimensions)
    if len(vector) != dim:
        raise ValueError(f"expected a vector of {dim} dimensions, got {len(vector)}")
    if scope.collection_ids == []:
        return []
    plan = plan or choose_plan(scope)
    sql, params = nearest_sql(scope=scope, k=k)
    params["query"] = HalfVector(np.asarray(vector, dtype=np.float32))  # binary: no 1,280 floats as text
    with transaction.atomic(), binary_cursor() as cursor:
        # Settings local to this transaction, set in one round trip.
        if plan == "exact":
            # No index scans: HNSW cannot serve the ORDER BY, the btree still narrows the
            # rows through a bitmap scan, and a top-k sort computes every distance exactly.
            cursor.execute("SELECT set_config('enable_indexscan', 'off', true)")
        else:
            cursor.execute("SELECT set_config('hnsw.ef_search', %s, true), "
                           "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                           [str(int(settings.HNSW_EF_SEARCH))])
        cursor.execute(sql, params, binary=True)
        rows = [(int(image_id), float(d), np.asarray(v.to_numpy(), dtype=np.float32))
                for image_id, d, v in cursor.fetchall()]
    if plan == "hnsw" and len(rows) < k and scope.collection_ids is not None:
        # The iterative scan gave up (max_scan_tuples) before k rows passed the filter.
        return nearest_hits(vector=vector, scope=scope, k=k, plan="exact")
    return rows


def _vectors(*, version: EmbeddingModel, image_ids: Sequence[int], column: str) -> dict[int, np.ndarray]:
    """Return stored vectors by image id, in pgvector's binary format (no float text parsing)."""
    if not image_ids:
        return {}
    if column not in {"vector", "augmented"}:
        raise ValueError(f"expected column vector or augmented, got {column!r}")
    with binary_cursor() as raw:
        raw.execute(
            f"SELECT image_id, {column} FROM simili_embedding WHERE model_version_id = %s AND image_id = ANY(%s)",
            [version.pk, list(image_ids)], binary=True,
        )
        return {int(image_id): np.asarray(value.to_numpy(), dtype=np.float32) for image_id, value in raw.fetchall()}


#: Two results whose search vectors are closer than NEAR_DUPLICATE_DISTANCE / this are
#: checked on their raw vectors even without a recorded pair (copies in other collections, or
#: before the refresh ran). Only then: raw vectors live out of line and cost a TOAST read each,
#: and re-ranking pulls neighbours together, so search vectors alone would over-collapse.
UNRECORDED_FACTOR = 3.0


def _collapse(hits: list[Hit], *, version: EmbeddingModel, k: int) -> list[tuple[int, float]]:
    """Keep the best-ranked image of each group of near-duplicates among the results, up to k.

    Pairs come from the collection refresh, which compared raw vectors (NearDuplicate rows),
    plus results in different collections (or not yet refreshed) whose vectors say so. Pairs a
    reviewer marked "not duplicates" are never collapsed. A copy of the query photo itself still
    shows (once): finding it is what a search by a photo is for.
    """
    threshold = float(settings.NEAR_DUPLICATE_DISTANCE)
    rows = [(image_id, distance) for image_id, distance, _ in hits]
    if threshold <= 0 or len(hits) < 2:
        return rows[:k]
    ids = [image_id for image_id, _ in rows]
    searchable = np.stack([_unit(vector) for _, _, vector in hits])
    close = np.argwhere(np.triu(searchable @ searchable.T > 1.0 - threshold / UNRECORDED_FACTOR, 1))
    duplicates: set[tuple[int, int]] = set()
    if len(close):
        involved = sorted({ids[i] for pair in close for i in pair})
        raw = {i: _unit(v) for i, v in _vectors(version=version, image_ids=involved, column="vector").items()}
        duplicates = {
            (min(ids[i], ids[j]), max(ids[i], ids[j])) for i, j in close
            if ids[i] in raw and ids[j] in raw and 1.0 - float(raw[ids[i]] @ raw[ids[j]]) < threshold
        }
    for first, second, status in _pairs(ids):
        if status == NearDuplicate.Status.DISMISSED:
            duplicates.discard((first, second))
        else:
            duplicates.add((first, second))
    kept: list[tuple[int, float]] = []
    for image_id, distance in rows:
        if any((min(image_id, other), max(image_id, other)) in duplicates for other, _ in kept):
            continue
        kept.append((image_id, distance))
        if len(kept) == k:
            break
    return kept


def _pairs(image_ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """Return the recorded near-duplicate pairs among these images: (first id, second id, status).

    Plain SQL on the search's hot path: through the ORM the same query took 1.1 ms against
    0.3 (docs/benchmarks.md#search-1m-4).
    """
    table = NearDuplicate._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT first_id, second_id, status FROM {table} "
                       "WHERE first_id = ANY(%s) AND second_id = ANY(%s)", [list(image_ids), list(image_ids)])
        return [(int(first), int(second), str(status)) for first, second, status in cursor.fetchall()]


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


#: Extra candidates fetched so that k usually remain after near-duplicates are collapsed. Small
#: on purpose: with a filter, HNSW's walk yields about ef_search x the filter's share of rows
#: (20 at 200 x 10%) before the iterative scan must walk on, so asking 12 + 12 instead of
#: 12 + 4 doubled the filtered query (measured: docs/benchmarks.md). Should collapsing leave
#: fewer than k, the search runs once more with COLLAPSE_RETRY_FACTOR x k candidates.
COLLAPSE_MARGIN = 4
COLLAPSE_RETRY_FACTOR = 3
#: Query expansion re-ranks the first search's QE_POOL_FACTOR x (k + COLLAPSE_MARGIN) nearest rows
#: instead of searching again; a filtered graph walk's pool is k + COLLAPSE_MARGIN. On Corel-1k,
#: of a second search's top 12, a pool of 16 rows kept 94.0% (precision@12 0.9714), 32 rows (the
#: page's 2 x (12 + 4)) 99.75% (0.9722); the second search gave 0.9725 (docs/search.md).
QE_POOL_FACTOR = 2


def images_search(
    *,
    query: SearchQuery,
    version: EmbeddingModel,
    viewer: Viewer,
    k: int,
    collection_ids: Sequence[int] | None = None,
    expand: int | None = None,
) -> list[SimilarImage]:
    """Return the k images nearest to the query among those the viewer may see, re-ranked.

    With query expansion (`expand`, default SIMILAR_QE), the query is averaged with its first
    results' vectors — only ones the viewer may see — and re-ranks them (docs/search.md).
    Near-duplicates are collapsed to their best-ranked member.
    """
    scope = search_scope(version=version, viewer=viewer, collection_ids=collection_ids,
                         exclude_image_ids=query.exclude_image_ids)
    # The generation only keys the remembered plan of a filtered search: none to read otherwise.
    generation = search_generation() if scope.collection_ids else None
    rows = _search_rows(query=query, scope=scope, k=k, expand=expand, generation=generation)
    return _similar_images(rows, scope)


def _search_rows(
    *, query: SearchQuery, scope: Scope, k: int, expand: int | None, generation: str | None,
) -> list[tuple[int, float]]:
    """Return (image id, cosine distance) of the k results, re-ranked and collapsed.

    One search serves query expansion: it fetches a pool of rows with their vectors, the first
    `n` make the expanded query, and the expanded query re-ranks the pool (QE_POOL_FACTOR). A
    second search with the expanded query cost a whole graph walk or exact scan more.
    """
    plan = choose_plan(scope, generation=generation)
    vector = query.vector()
    n = settings.SIMILAR_QE if expand is None else expand
    collapsing = settings.NEAR_DUPLICATE_DISTANCE > 0
    wanted = k + COLLAPSE_MARGIN if collapsing else k
    if n > 0:
        # A filtered walk yields about ef_search x the filter's share per pass (20 at 10%); a
        # larger pool makes it walk on, which cost more than the second search saved (docs/search.md).
        filtered_walk = plan == "hnsw" and scope.collection_ids is not None
        size = max(n, wanted if filtered_walk else QE_POOL_FACTOR * wanted)
        pool = nearest_hits(vector=vector, scope=scope, k=size, plan=plan)
        if pool:
            vector = expand_query(vector, np.stack([v for _, _, v in pool[:n]]), n=n, alpha=settings.SIMILAR_ALPHA)
        hits, complete = rerank(pool, vector), len(pool) == size  # the whole pool: copies may use its spares
    else:
        hits = nearest_hits(vector=vector, scope=scope, k=wanted, plan=plan)
        complete = len(hits) == wanted
    rows = _collapse(hits, version=scope.version, k=k)
    if collapsing and len(rows) < k and complete:
        # More duplicates among the candidates than the margin: look deeper once.
        hits = nearest_hits(vector=vector, scope=scope, k=k * COLLAPSE_RETRY_FACTOR + COLLAPSE_MARGIN, plan=plan)
        rows = _collapse(hits, version=scope.version, k=k)
    return rows


def rerank(hits: Sequence[Hit], vector: np.ndarray) -> list[Hit]:
    """Return the hits nearest first to another query vector, with their distances to it.

    The distances are PostgreSQL's: cosine between the stored halfvec and the query cast to
    halfvec, so a re-ranked pool reads as a search with that vector would.
    """
    if not hits:
        return []
    query = np.asarray(vector, dtype=np.float16).astype(np.float32)
    stored = np.stack([v for _, _, v in hits])
    norms = np.linalg.norm(stored, axis=1) * float(np.linalg.norm(query))
    # pgvector clamps the cosine to [-1, 1]: an identical vector is at distance 0, never -1e-7.
    distances = np.clip(1.0 - (stored @ query) / np.where(norms > 0, norms, 1.0), 0.0, 2.0)
    order = np.argsort(distances, kind="stable")
    return [(hits[i][0], float(distances[i]), hits[i][2]) for i in order]


def _similar_images(rows: Sequence[tuple[int, float]], scope: Scope) -> list[SimilarImage]:
    """Load the result rows' images, keeping only ready ones the scope still allows.

    The SQL already filtered on the scope; the check here is what keeps a cached list from
    showing an image that has since left the viewer's collections or stopped being ready.
    """
    images = images_with_collections([image_id for image_id, _ in rows])
    allowed = None if scope.collection_ids is None else set(scope.collection_ids)
    excluded = set(scope.exclude_image_ids)
    return [
        SimilarImage(image=images[image_id], similarity=1.0 - distance)
        for image_id, distance in rows
        if image_id in images and images[image_id].is_ready and image_id not in excluded
        and (allowed is None or images[image_id].collection_id in allowed)
    ]


def images_with_collections(image_ids: Sequence[int]) -> dict[int, Image]:
    """Return images by id with their collections loaded, as `select_related("collection")` would.

    One statement, without compiling a queryset per call (`selectors.images_loaded`): on the
    search's hot path that compiling cost more than the query (ten rows: 2.1 ms through
    `in_bulk`, 0.8 ms this way; docs/benchmarks.md#search-1m-4).
    """
    if not image_ids:
        return {}
    return {image.pk: image for image in images_loaded(ids=image_ids)}


def vector_similar(
    *,
    vector: Sequence[float] | np.ndarray,
    version: EmbeddingModel,
    viewer: Viewer,
    k: int,
    collection_ids: Sequence[int] | None = None,
    expand: int | None = None,
) -> list[SimilarImage]:
    """Return the k images nearest to one query vector (an uploaded image or a crop)."""
    return images_search(query=SearchQuery(positives=[np.asarray(vector, dtype=np.float32)]), version=version,
                         viewer=viewer, k=k, collection_ids=collection_ids, expand=expand)


def examples_query(*, positives: Sequence[Image], negatives: Sequence[Image] = (),
                   version: EmbeddingModel) -> SearchQuery | None:
    """Build a query from stored example images (their search vectors); None if one has no vector."""
    chosen = [*positives, *negatives]
    searchable = _vectors(version=version, image_ids=[image.pk for image in chosen], column="augmented")
    if any(image.pk not in searchable for image in chosen):
        return None
    return SearchQuery(
        positives=[searchable[image.pk] for image in positives],
        negatives=[searchable[image.pk] for image in negatives],
        exclude_image_ids=[image.pk for image in chosen],
    )


def examples_search(
    *,
    positives: Sequence[Image],
    negatives: Sequence[Image] = (),
    version: EmbeddingModel | None,
    viewer: Viewer,
    k: int,
    collection_ids: Sequence[int] | None = None,
) -> list[SimilarImage]:
    """Return the images like the positive examples and unlike the negative ones, examples left out.

    Empty before any version exists or while an example has no vector of it; raises ValueError
    when the examples cancel out.
    """
    if version is None or not positives:
        return []
    query = examples_query(positives=positives, negatives=negatives, version=version)
    if query is None:
        return []
    return images_search(query=query, version=version, viewer=viewer, k=k, collection_ids=collection_ids)


def image_similar(
    *,
    image: Image,
    viewer: Viewer,
    k: int | None = None,
    collection_ids: Sequence[int] | None = None,
    version: EmbeddingModel | None = None,
) -> list[SimilarImage]:
    """Return the images most similar to a stored image, among those the viewer may see."""
    return image_results(image=image, viewer=viewer, k=k, collection_ids=collection_ids, version=version).similar


@dataclass(frozen=True)
class ImageResults:
    """What a stored image's page shows: similar images and, when asked, video moments."""

    similar: list[SimilarImage]
    moments: list[Moment]


def image_results(
    *,
    image: Image,
    viewer: Viewer,
    k: int | None = None,
    collection_ids: Sequence[int] | None = None,
    version: EmbeddingModel | None = None,
    moments: int = 0,
) -> ImageResults:
    """Return a stored image's similar images and (`moments` > 0) its best video moments.

    Both lists are cached together (SIMILAR_CACHE_SECONDS) under the search generation, the
    version, the image and the viewer's visible collections: any write to embeddings, frame
    embeddings or near-duplicate pairs moves the generation, so a cached list is never older
    than the data it was computed from, and its images and videos are re-checked against the
    viewer's collections when they are loaded.
    """
    prepared = _image_query(image=image, viewer=viewer, k=k, collection_ids=collection_ids, version=version,
                            moments=moments)
    if prepared is None:
        return ImageResults([], [])
    return _image_results(image, prepared)


def image_section(*, image: Image, viewer: Viewer, moments: int, render: Callable[[ImageResults], str]) -> str:
    """Return what `render` makes of `image_results` for the image's page, cached with the lists.

    A cached section is used only if the images and videos it shows are, right now, exactly
    those the viewer may see among its rows, with the same keys and names: one query, instead
    of loading the rows' objects and rendering them again. Anything else (a result made
    private, not ready, renamed, a frame re-indexed) renders the section anew. `render` must
    depend on nothing but the lists and the image's key (no per-request token).
    """
    prepared = _image_query(image=image, viewer=viewer, k=None, collection_ids=None, version=None, moments=moments)
    if prepared is None:
        return render(ImageResults([], []))
    key = f"{prepared.key}:section"
    entry = _cache_read(key)
    if isinstance(entry, dict) and isinstance(entry.get("html"), str):
        if _shown_now(entry.get("rows", []), entry.get("moments", []), prepared.scope) == entry.get("shown"):
            return entry["html"]
    found = _image_results(image, prepared)
    rows = [image_id for image_id, _ in prepared.rows]
    moment_rows = [(video_id, frame_id) for video_id, frame_id, _ in prepared.moment_rows]
    # What is visible is read before the objects are loaded and rendered: a change in between
    # makes the stored state older than the HTML, so the next visit renders again.
    shown = _shown_now(rows, moment_rows, prepared.scope)
    html = render(found)
    _cache_write(key, {"html": str(html), "rows": rows, "moments": moment_rows, "shown": shown})
    return html


@dataclass
class _ImageQuery:
    """A stored image's search, resolved: its scope and cache key; its rows once read."""

    scope: Scope
    key: str
    k: int
    moments: int
    generation: str
    rows: Rows = field(default_factory=list)
    moment_rows: MomentRows = field(default_factory=list)


def _image_query(*, image: Image, viewer: Viewer, k: int | None, collection_ids: Sequence[int] | None,
                 version: EmbeddingModel | None, moments: int) -> _ImageQuery | None:
    version = version or active_model_version()
    if version is None or not image.is_ready:
        return None
    k = k or settings.SIMILAR_K
    scope = search_scope(version=version, viewer=viewer, collection_ids=collection_ids,
                         exclude_image_ids=[image.pk])
    generation = search_generation()
    key = _similar_cache_key(image=image, scope=scope, k=k, generation=generation, moments=moments)
    return _ImageQuery(scope=scope, key=key, k=k, moments=moments, generation=generation)


def _image_results(image: Image, prepared: _ImageQuery) -> ImageResults:
    """Read the rows (cached, or searched and cached) into `prepared`; load what the scope allows."""
    from webapp import videos

    cached = _cache_get(prepared.key)
    if cached is None:
        query = examples_query(positives=[image], version=prepared.scope.version)
        if query is None:
            return ImageResults([], [])
        prepared.rows = _search_rows(query=query, scope=prepared.scope, k=prepared.k, expand=None,
                                     generation=prepared.generation)
        prepared.moment_rows = videos.moment_rows_for_image(image_id=image.pk, version=prepared.scope.version,
                                                            scope=prepared.scope, k=prepared.moments)
        _cache_set(prepared.key, prepared.rows, prepared.moment_rows)
    else:
        prepared.rows, prepared.moment_rows = cached
    return ImageResults(_similar_images(prepared.rows, prepared.scope),
                        videos.moments_load(prepared.moment_rows, prepared.scope))


def _shown_now(image_ids: Sequence[int], moments: Sequence[Sequence[int]], scope: Scope) -> list[list[object]]:
    """Of these rows, what the scope lets show now and what a page renders of it, in one query.

    The same conditions as `_similar_images` and `videos.moments_load`: ready, in an allowed
    collection, not excluded; frames that still exist.
    """
    allowed = "" if scope.collection_ids is None else " AND collection_id = ANY(%(collections)s)"
    sql = (
        "SELECT 'i', id, key, original_name FROM simili_image WHERE id = ANY(%(images)s) AND status = 'ready' "
        f"AND id <> ALL(%(exclude)s){allowed} "
        "UNION ALL SELECT 'v', id, key, original_name FROM simili_video WHERE id = ANY(%(videos)s) "
        f"AND status = 'ready'{allowed} "
        "UNION ALL SELECT 'f', id, '', '' FROM simili_videoframe WHERE id = ANY(%(frames)s) "
        "ORDER BY 1, 2"
    )
    params = {"images": [int(i) for i in image_ids], "exclude": [int(i) for i in scope.exclude_image_ids],
              "videos": [int(v) for v, _ in moments], "frames": [int(f) for _, f in moments],
              "collections": scope.collection_ids}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [list(row) for row in cursor.fetchall()]


#: Bump when the ranking code changes in a way no setting shows: lists cached by the old code
#: are then never read by the new.
CACHE_FORMAT = 3


def _similar_cache_key(*, image: Image, scope: Scope, k: int, generation: str, moments: int = 0) -> str:
    # The settings that shape a result list are part of the key: a restart with other values
    # never reads lists computed with the old ones.
    shape = (CACHE_FORMAT, settings.SIMILAR_QE, settings.SIMILAR_ALPHA, settings.HNSW_EF_SEARCH,
             settings.NEAR_DUPLICATE_DISTANCE, settings.EXACT_SEARCH_MAX_ROWS, COLLAPSE_MARGIN, NEGATIVE_WEIGHT,
             UNRECORDED_FACTOR, QE_POOL_FACTOR)
    digest = hashlib.blake2b(repr(shape).encode(), digest_size=6).hexdigest()
    return (f"similar:{generation}:{int(scope.version.pk)}:{int(image.pk)}:{k}:{int(moments)}:"
            f"{_collections_digest(scope.collection_ids)}:{digest}")



def _cache_read(key: str) -> object:
    """Return a cached value, or None: the cache is an optimisation, never a failure."""
    if settings.SIMILAR_CACHE_SECONDS <= 0:
        return None
    try:
        return cache.get(key)
    except Exception:  # noqa: BLE001 — Redis down: compute instead
        logger.warning("similar-image cache unavailable", exc_info=True)
        return None


def _cache_write(key: str, value: object) -> None:
    if settings.SIMILAR_CACHE_SECONDS <= 0:
        return
    try:
        cache.set(key, value, settings.SIMILAR_CACHE_SECONDS)
    except Exception:  # noqa: BLE001
        logger.warning("similar-image cache unavailable", exc_info=True)


def _cache_get(key: str) -> tuple[Rows, MomentRows] | None:
    value = _cache_read(key)
    if not isinstance(value, dict):
        return None
    return ([(int(i), float(d)) for i, d in value.get("rows", [])],
            [(int(v), int(f), float(d)) for v, f, d in value.get("moments", [])])


def _cache_set(key: str, rows: Rows, moments: MomentRows) -> None:
    _cache_write(key, {"rows": rows, "moments": moments})


def images_visible(*, keys: Sequence[str], viewer: Viewer) -> list[Image]:
    """Return the ready images among `keys` that the viewer may use as search examples, in order."""
    keys = [key for key in keys if KEY_PATTERN.fullmatch(key)][:50]  # a NUL byte would reach PostgreSQL
    images = Image.objects.filter(key__in=keys, status="ready").select_related("collection")
    if not is_admin(viewer):
        # Unlisted collections are reachable by link, so their images may be examples too.
        images = images.filter(listed_filter(viewer, prefix="collection__") | Q(collection__visibility="unlisted"))
    by_key = {image.key: image for image in images}
    return [by_key[key] for key in keys if key in by_key]
