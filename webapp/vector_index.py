"""The per-version HNSW index over `augmented::halfvec(dim)`: its name, its DDL and its build."""

from __future__ import annotations

from typing import Any

#: pgvector's HNSW index takes halfvec vectors of at most 4,000 dimensions.
MAX_INDEXED_DIMENSIONS = 4000


def index_name(version_id: int) -> str:
    return f"embedding_augmented_hnsw_v{int(version_id)}"


def search_expression(dimensions: int) -> str:
    """The indexed expression; a query must repeat it verbatim for the planner to use the index."""
    return f"augmented::halfvec({int(dimensions)})"


def build(cursor: Any, *, version_id: int, dimensions: int, m: int, ef_construction: int, memory: str,
          concurrently: bool = False) -> None:
    """Create the version's partial HNSW cosine index unless it exists (a build, not inserts).

    `concurrently` builds without blocking writes to the table (CREATE INDEX CONCURRENTLY:
    outside a transaction only, and a failure leaves an invalid index to drop before a retry).
    """
    # SET LOCAL would end with a surrounding transaction; outside one it must not leak into the
    # pooled connection, so reset afterwards.
    cursor.execute(f"SET maintenance_work_mem = '{memory}'")
    try:
        cursor.execute(
            f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {index_name(version_id)} "
            f"ON simili_embedding USING hnsw (({search_expression(dimensions)}) halfvec_cosine_ops) "
            f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) "
            # The same integer literal the similarity query inlines: a bound bigint parameter
            # would keep the planner from proving this predicate.
            f"WHERE model_version_id = {int(version_id)}"
        )
    finally:
        cursor.execute("RESET maintenance_work_mem")


def drop(cursor: Any, *, version_id: int, concurrently: bool = False) -> None:
    cursor.execute(f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS {index_name(version_id)}")


def state(cursor: Any, *, version_id: int) -> str:
    """Return "valid", "invalid" (a concurrent build under way, or one that failed) or "absent"."""
    # to_regclass reads one catalog cache entry; searches ask this until the index is built.
    cursor.execute("SELECT (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)::oid)",
                   [index_name(version_id)])
    valid = cursor.fetchone()[0]
    return "absent" if valid is None else "valid" if valid else "invalid"


def exists(cursor: Any, *, version_id: int) -> bool:
    """Whether the version has an index that searches can use (built and valid)."""
    return state(cursor, version_id=version_id) == "valid"


def rows_reach(cursor: Any, *, version_id: int, rows: int) -> bool:
    """Whether the version holds at least `rows` vectors: an index-only scan that stops there."""
    if rows <= 0:
        return True
    cursor.execute("SELECT count(*) FROM (SELECT 1 FROM simili_embedding WHERE model_version_id = %s LIMIT %s) AS v",
                   [int(version_id), int(rows)])
    return int(cursor.fetchone()[0]) >= rows
