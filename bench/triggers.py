"""What the search-generation triggers (migration 0009) cost a bulk insert, against none, same run.

A scratch table shaped like the vectors (id, halfvec(1280)) gets 100,000 rows in 20 transactions
of 5,000, three times without the triggers and three times with the statement trigger and the
deferred per-row trigger that `simili_embedding` carries, twice in alternation. Prints the seconds.

  .venv/bin/python bench/triggers.py

It runs its own PostgreSQL under a temporary directory and removes it after.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search  # noqa: E402  (bench/search.py: the embedded servers and migrations)

ROWS_PER_TRANSACTION = 5000
TRANSACTIONS = 20


def run(*, triggers: bool) -> list[float]:
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_scratch; CREATE TABLE bench_scratch (id bigint, v halfvec(1280))")
        if triggers:
            cursor.execute("CREATE TRIGGER s1 AFTER INSERT OR UPDATE OR DELETE ON bench_scratch "
                           "FOR EACH STATEMENT EXECUTE FUNCTION simili_search_changed()")
            cursor.execute("CREATE CONSTRAINT TRIGGER s2 AFTER INSERT OR UPDATE OR DELETE ON bench_scratch "
                           "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION simili_search_committed()")
    seconds = []
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE bench_scratch")
        started = time.perf_counter()
        for _ in range(TRANSACTIONS):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO bench_scratch SELECT g, (SELECT array_agg(random())::real[] "
                    "FROM generate_series(1, 1280))::halfvec(1280) FROM generate_series(1, %s) g",
                    [ROWS_PER_TRANSACTION],
                )
        seconds.append(round(time.perf_counter() - started, 2))
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="simili-bench-triggers-") as tmp:
        redis = search.setup(Path(tmp) / "var", 1000)
        try:
            rows = ROWS_PER_TRANSACTION * TRANSACTIONS
            for triggers in (False, True, False, True):
                label = "generation triggers" if triggers else "no triggers (baseline)"
                print(f"{label}: {rows} rows in {TRANSACTIONS} transactions, seconds: {run(triggers=triggers)}",
                      flush=True)
        finally:
            search.teardown(redis)


if __name__ == "__main__":
    main()
