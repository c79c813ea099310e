"""Building a version's HNSW index while uploads write vectors: plain CREATE INDEX vs CONCURRENTLY.

A new model version's index is built once its re-index is complete (and the first version's
once it holds HNSW_INDEX_MIN_ROWS vectors), while the site keeps taking uploads. The script
loads synthetic rows as bench/search.py does (or reuses a database it kept with --var), then,
alternating, drops the active version's index and builds it

- **plain**: `CREATE INDEX` in a transaction, what Simili did before (the baseline), and
- **concurrent**: `embeddings.embedding_index_build`, the product's build (CONCURRENTLY),

while a second connection stores one vector every 50 ms through `embeddings.embeddings_store`
(the workers' write path; rows of a scratch version, removed at the end). It prints the build's
wall time and the writes' latency during it: how long an upload's vector waits for the build.

  .venv/bin/python bench/index_build.py --rows 100000
  .venv/bin/python bench/search.py --rows 100000 --var /tmp/s100k       # load once, then:
  .venv/bin/python bench/index_build.py --rows 100000 --var /tmp/s100k --reuse --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search  # noqa: E402 - bench/search.py: the same database, rows and set-up

WRITE_EVERY = 0.05


def writes_during(build, version_id: int, image_ids: np.ndarray, collection_id: int) -> dict[str, float]:
    """Run `build()` while another thread stores a vector every WRITE_EVERY s; return the timings."""
    from django.db import connection

    from webapp import embeddings
    from webapp.models import EmbeddingModel

    scratch = EmbeddingModel.objects.get(pk=version_id)
    rng = np.random.default_rng(len(image_ids))
    latencies: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            while not stop.is_set():
                vector = rng.standard_normal(scratch.dimensions).astype(np.float32)
                vector /= np.linalg.norm(vector)
                image_id = int(rng.choice(image_ids))
                started = time.perf_counter()
                embeddings.embeddings_store(version=scratch, rows=[
                    embeddings.VectorRow(image_id, collection_id, vector, vector)])
                latencies.append(time.perf_counter() - started)
                time.sleep(WRITE_EVERY)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.0)  # writes under way before the build starts
    started = time.perf_counter()
    build()
    build_s = time.perf_counter() - started
    stop.set()
    thread.join()
    ordered = sorted(latencies)
    return {"build_s": build_s, "writes": len(ordered), "write_p50_ms": 1000 * statistics.median(ordered),
            "write_p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))], "write_max_ms": 1000 * ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1, help="plain/concurrent pairs, alternating")
    parser.add_argument("--var", type=Path, help="keep the database here instead of a temporary directory")
    parser.add_argument("--reuse", action="store_true", help="with --var: the database bench/search.py kept there")
    args = parser.parse_args()
    if args.reuse and not args.var:
        parser.error("--reuse needs --var DIR")
    with tempfile.TemporaryDirectory(prefix="simili-bench-index-") as tmp:
        redis = search.setup(args.var or Path(tmp) / "var", args.rows)
        from django.conf import settings
        from django.db import connection, transaction

        from webapp import embeddings, vector_index
        from webapp.models import Collection, Embedding, EmbeddingModel

        try:
            if args.reuse:
                world = search.reload(args.rows)
            else:
                rng = np.random.default_rng(0)
                centres = rng.standard_normal((search.CLUSTERS, search.DIM)).astype(np.float32)
                world = search.load(search.clustered(args.rows, rng, centres))
            version = world["version"]
            scratch, _ = EmbeddingModel.objects.get_or_create(
                key="bench-writes@1", defaults={"backbone": "bench", "dimensions": search.DIM})
            # The writer's rows need a real collection id (the search filters on it).
            collection_id = Collection.objects.values_list("pk", flat=True).first()
            Embedding.objects.filter(model_version=scratch).delete()
            print(f"{args.rows} rows x {search.DIM}, m={settings.HNSW_M}, ef_construction="
                  f"{settings.HNSW_EF_CONSTRUCTION}, maintenance_work_mem {settings.HNSW_BUILD_MEMORY}; "
                  f"one vector stored every {WRITE_EVERY * 1000:.0f} ms during each build", flush=True)

            def plain() -> None:
                with transaction.atomic(), connection.cursor() as cursor:
                    vector_index.build(cursor, version_id=version.pk, dimensions=version.dimensions,
                                       m=settings.HNSW_M, ef_construction=settings.HNSW_EF_CONSTRUCTION,
                                       memory=settings.HNSW_BUILD_MEMORY)

            def concurrent() -> None:
                embeddings.embedding_index_build(version=version)

            rows = []
            for _ in range(args.rounds):
                for name, build in (("plain", plain), ("concurrent", concurrent)):
                    embeddings.embedding_index_drop(version=version)
                    result = {"build": name, **writes_during(build, scratch.pk, world["ids"], collection_id)}
                    with connection.cursor() as cursor:
                        assert vector_index.exists(cursor, version_id=version.pk), "the build left no valid index"
                    print(f"  {result}", flush=True)
                    rows.append(result)
            Embedding.objects.filter(model_version=scratch).delete()
            scratch.delete()
            print("\n| build | seconds | writes during it | write p50 ms | write p99 ms | longest write ms |")
            print("|---|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['build']} | {r['build_s']:.1f} | {r['writes']} | {r['write_p50_ms']:.1f} | "
                      f"{r['write_p99_ms']:.1f} | {r['write_max_ms']:.0f} |")
        finally:
            search.teardown(redis)


if __name__ == "__main__":
    main()
