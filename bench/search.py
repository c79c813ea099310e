"""Similar-image search at scale: the app's own query against an exact scan and numpy, same run.

Synthetic clustered unit vectors at the product's dimension (1280) are loaded into the app's
own tables through its own code path (Image rows, then `embeddings.embeddings_store`), the
version's HNSW index is built after the load (`embeddings.embedding_index_build`), and queries
go through `similarity.images_search` (the function every page and API call uses) as three
viewers: an admin (no filter), a user who may see 10% of the rows, one who may see 1%.

For each: p50/p95 latency and recall@10 against the exact answer over the same half-precision
vectors (without query expansion; its latency as pages search, k 12, is timed too); the same
queries as a forced exact scan (`similarity.nearest(plan="exact")`) and as
numpy in memory (the reference floor); the ratios. Optionally (--storage) a side experiment
on scratch tables: `vector` vs `halfvec` storage, built and queried with the same settings.
Optionally (--pages) the image page under 8 concurrent clients (Django test client, processes),
with the similar-list cache off, on first visits, on repeat visits and under a Zipf mix.

  .venv/bin/python bench/search.py --rows 100000 --storage --pages
  .venv/bin/python bench/search.py --rows 1000000 --sweep 40,100,200
  HNSW_EF_CONSTRUCTION=64 .venv/bin/python bench/search.py --rows 1000000 --sweep 40,100,200

It runs its own PostgreSQL under a temporary directory, removed after, or under --var DIR, kept:
`--var DIR --reuse` measures that database again without loading it (same --rows).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIM = 1280
CLUSTERS = 1000
COLLECTIONS = 100  # each holds 1% of the rows: a viewer's filter is a whole number of them
K = 10
PAGE_K = 12  # what the image page shows
EXACT_QUERIES = 20


def setup(var_dir: Path, rows: int) -> object:
    os.environ["SIMILI_VAR_DIR"] = str(var_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    # The build's graph should fit in memory: about 3 GB at 1M x 1280-d halfvec.
    os.environ.setdefault("HNSW_BUILD_MEMORY", "6GB" if rows > 300_000 else "1GB")
    sys.path.insert(0, str(ROOT))
    import django
    from django.conf import settings

    from webapp import embedded

    embedded.start_postgres(settings.EMBEDDED, database="simili", options={
        "shared_buffers": "4GB" if rows > 300_000 else "2GB",
        "max_wal_size": "20GB",
        "checkpoint_timeout": "1h",
        "max_parallel_maintenance_workers": "1",  # two cores: the leader and one worker
    })
    redis = embedded.start_redis(settings.EMBEDDED)
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return redis


def teardown(redis: object) -> None:
    """Close the connections and stop what `setup` started."""
    from django.conf import settings
    from django.db import connections

    from webapp import embedded

    connections.close_all()
    embedded.stop_postgres(settings.EMBEDDED)
    embedded.stop_process(redis)


def clustered(rows: int, rng: np.random.Generator, centres: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors shaped like a CNN's pooled features: non-negative (post-ReLU), in clusters.

    relu(centre + 0.7 noise): two members of a cluster have cosine ~0.77 with their nearest
    neighbour and two random vectors ~0.32, close to EfficientNet-Lite0 on Corel-1k (0.73 and
    0.30), so clusters overlap as real photos do; zero-mean clusters would be separated islands,
    which no real embedding looks like and which strand a graph walk in the wrong island.
    """
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32) if centres is None else centres
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        noise = rng.standard_normal((n, DIM)).astype(np.float32)
        block = np.maximum(0, centres[rng.integers(0, CLUSTERS, n)] + 0.7 * noise)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        # Rounded to half precision here, so the numpy reference compares exactly what halfvec stores.
        out[start:start + n] = block.astype(np.float16).astype(np.float32)
    return out


def load(vectors: np.ndarray) -> dict[str, object]:
    """Create users, 100 collections and one image + embedding per vector; return the fixtures."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from webapp import embeddings, services
    from webapp.models import Image, ImageStatus, Visibility

    users = get_user_model().objects
    admin = users.create_superuser("admin", password="x")
    bulk = users.create_user("bulk")
    ten, one = users.create_user("ten_percent"), users.create_user("one_percent")
    owners = [one] + [ten] * 10 + [bulk] * (COLLECTIONS - 11)
    collections = [services.collection_create(owner=o, name=f"c{i}", visibility=Visibility.PRIVATE)
                   for i, o in enumerate(owners)]
    version = embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1", backbone="efficientnet_lite0",
                                                dimensions=DIM)
    embeddings.embedding_index_drop(version=version)  # built once after the load, not grown insert by insert
    rows = len(vectors)
    owner_of = np.arange(rows) % COLLECTIONS  # row i lives in collection i % 100
    started = time.perf_counter()
    ids = np.empty(rows, dtype=np.int64)
    chunk = 5000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            batch.append(Image(collection=collections[owner_of[i]], uploaded_by=bulk, sha256=sha,
                               file_path=f"originals/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                               thumbnail_path=f"thumbnails/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                               original_name=f"{i}.jpg", mime_type="image/jpeg", width=640, height=480,
                               byte_size=100_000, status=ImageStatus.READY))
        created = Image.objects.bulk_create(batch)
        ids[start:start + len(created)] = [image.pk for image in created]
        embeddings.embeddings_store(version=version, rows=[
            embeddings.VectorRow(int(ids[i]), collections[owner_of[i]].pk, vectors[i], vectors[i])
            for i in range(start, start + len(created))
        ])
        if start % 100_000 == 0:
            print(f"  loaded {start + len(created)} rows in {time.perf_counter() - started:.0f} s", flush=True)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    embeddings.embedding_index_build(version=version)
    build_s = time.perf_counter() - started
    services.images_analyze()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_table_size('simili_embedding'), pg_relation_size(%s)", [version.index_name])
        table_bytes, index_bytes = cursor.fetchone()
    return {"version": version, "ids": ids, "owner_of": owner_of, "admin": admin, "ten": ten, "one": one,
            "load_s": load_s, "build_s": build_s, "table_bytes": table_bytes, "index_bytes": index_bytes}


def reload(rows: int) -> dict[str, object]:
    """Return the fixtures of a database that `load` filled earlier with the same --rows (--reuse)."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from webapp.models import Collection, EmbeddingModel, Image, Visibility

    users = get_user_model().objects
    version = EmbeddingModel.objects.get()
    Collection.objects.update(visibility=Visibility.PRIVATE)  # as loaded: --pages made some public
    # bulk_create inserted row i as the i-th id; the vectors are regenerated from the same seed.
    ids = np.fromiter(Image.objects.order_by("pk").values_list("pk", flat=True), dtype=np.int64)
    if len(ids) != rows:
        raise SystemExit(f"--reuse: the database holds {len(ids)} images, not --rows {rows}")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_table_size('simili_embedding'), pg_relation_size(%s)", [version.index_name])
        table_bytes, index_bytes = cursor.fetchone()
        # The index as built then, not as this run's settings would build it (the header's m
        # and ef_construction are this environment's).
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [version.index_name])
        print(f"reusing the database at --var: index built with {cursor.fetchone()[0]}", flush=True)
    return {"version": version, "ids": ids, "owner_of": np.arange(rows) % COLLECTIONS,
            "admin": users.get(username="admin"), "ten": users.get(username="ten_percent"),
            "one": users.get(username="one_percent"), "load_s": 0.0, "build_s": 0.0,
            "table_bytes": table_bytes, "index_bytes": index_bytes}


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(round(0.95 * (len(ordered) - 1)))]


def measure(world: dict, vectors: np.ndarray, queries: np.ndarray) -> list[dict[str, object]]:
    from django.db import connection

    from webapp import similarity
    from webapp.similarity import SearchQuery

    version, ids, owner_of = world["version"], world["ids"], world["owner_of"]
    viewers = [("admin: no filter", world["admin"], None), ("10% of rows", world["ten"], range(1, 11)),
               ("1% of rows", world["one"], range(0, 1))]
    report = []
    for label, viewer, visible_collections in viewers:
        if visible_collections is None:
            mask, subset, subset_ids = np.ones(len(ids), bool), vectors, ids  # a view, not a 5 GB copy
        else:
            mask = np.isin(owner_of, list(visible_collections))
            subset, subset_ids = vectors[mask], ids[mask]
        scope = similarity.search_scope(version=version, viewer=viewer)
        plan = similarity.choose_plan(scope)
        # One untimed pass first: otherwise whichever method runs first for a query pays for
        # reading its pages into shared_buffers (measured: 88 ms cold vs 4 ms warm at 1M).
        for q in queries:
            similarity.images_search(query=SearchQuery(positives=[q]), version=version, viewer=viewer, k=K, expand=0)
        app_t, exact_t, numpy_t, recalls, exact_recalls, short = [], [], [], [], [], 0
        hnsw_t: list[float] = []
        hnsw_recalls: list[float] = []
        # Each method in its own pass over the queries, right after the warm pass, as a server
        # answers a stream of searches. Interleaved, every app query ran right after numpy had
        # streamed 5 GB through the CPU's caches (and, for the first 20, after an exact scan of
        # the table), while the bare walk that followed it re-read the path the app had just
        # warmed: app p95 14.5 ms against 8.5 in a pass of its own (docs/benchmarks.md).
        answers = []
        for q in queries:
            started = time.perf_counter()
            results = similarity.images_search(query=SearchQuery(positives=[q]), version=version, viewer=viewer,
                                               k=K, expand=0)
            app_t.append((time.perf_counter() - started) * 1000)
            answers.append([r.image.pk for r in results])
        # As pages and the API search: with query expansion (SIMILAR_QE) and k 12.
        expanded_t = []
        for q in queries:
            started = time.perf_counter()
            similarity.images_search(query=SearchQuery(positives=[q]), version=version, viewer=viewer, k=PAGE_K)
            expanded_t.append((time.perf_counter() - started) * 1000)
        walks = []
        for q in queries:
            started = time.perf_counter()
            walks.append(similarity.nearest(vector=q, scope=scope, k=K, plan="hnsw"))
            hnsw_t.append((time.perf_counter() - started) * 1000)
        truths = []
        for q in queries:
            qh = q.astype(np.float16).astype(np.float32)
            started = time.perf_counter()
            scores = subset @ qh
            top = np.argpartition(-scores, K)[:K]
            truths.append(set(subset_ids[top[np.argsort(-scores[top])]].tolist()))
            numpy_t.append((time.perf_counter() - started) * 1000)
        for truth, got, walked in zip(truths, answers, walks, strict=True):
            short += len(got) < K
            recalls.append(len(truth.intersection(got)) / K)
            hnsw_recalls.append(len(truth.intersection(i for i, _ in walked)) / K)
        # A full exact scan of a million rows takes seconds: the first EXACT_QUERIES only.
        for q, truth in list(zip(queries, truths, strict=True))[:EXACT_QUERIES]:
            started = time.perf_counter()
            exact = similarity.nearest(vector=q, scope=scope, k=K, plan="exact")
            exact_t.append((time.perf_counter() - started) * 1000)
            exact_recalls.append(len(truth.intersection(i for i, _ in exact)) / K)
        connection.close()
        app, ex, npy, hn = percentiles(app_t), percentiles(exact_t), percentiles(numpy_t), percentiles(hnsw_t)
        qe = percentiles(expanded_t)
        report.append({"filter": label, "rows": int(mask.sum()), "plan": plan, "app_p50": app[0], "app_p95": app[1],
                       "app_qe_p50": qe[0], "app_qe_p95": qe[1],
                       "recall": float(np.mean(recalls)), "min_recall": float(np.min(recalls)), "short": short,
                       "exact_p50": ex[0], "exact_p95": ex[1], "exact_recall": float(np.mean(exact_recalls)),
                       "numpy_p50": npy[0], "numpy_p95": npy[1], "hnsw_p50": hn[0], "hnsw_p95": hn[1],
                       "hnsw_recall": float(np.mean(hnsw_recalls))})
        print(f"  {label}: {report[-1]}", flush=True)
    return report


def sweep(world: dict, vectors: np.ndarray, queries: np.ndarray, values: list[int]) -> None:
    """Recall@10 and latency of the unfiltered graph walk at several ef_search values."""
    from django.conf import settings

    from webapp import similarity

    scope = similarity.search_scope(version=world["version"], viewer=world["admin"])
    truths = []
    for q in queries:
        scores = vectors @ q.astype(np.float16).astype(np.float32)
        truths.append(set(world["ids"][np.argpartition(-scores, K)[:K]].tolist()))
    for ef in values:
        settings.HNSW_EF_SEARCH = ef
        for q in queries:  # warm
            similarity.nearest(vector=q, scope=scope, k=K, plan="hnsw")
        times, recalls = [], []
        for q, truth in zip(queries, truths, strict=True):
            started = time.perf_counter()
            got = similarity.nearest(vector=q, scope=scope, k=K, plan="hnsw")
            times.append((time.perf_counter() - started) * 1000)
            recalls.append(len(truth.intersection(i for i, _ in got)) / K)
        p50, p95 = percentiles(times)
        print(f"  ef_search {ef}: recall@10 {np.mean(recalls):.3f} (queries at 0: {recalls.count(0.0)}), "
              f"p50 {p50:.1f} ms, p95 {p95:.1f} ms", flush=True)


def storage_experiment(vectors: np.ndarray, queries: np.ndarray) -> list[dict[str, object]]:
    """vector vs halfvec on scratch tables: build time, size, latency and recall at ef_search 40 and 100."""
    from django.conf import settings
    from django.db import connection

    out = []
    for kind in ("vector", "halfvec"):
        table = f"bench_{kind}"
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
            cursor.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v {kind}({DIM}))")
            cursor.execute(f"ALTER TABLE {table} ALTER COLUMN v SET STORAGE MAIN")
        from webapp.embeddings import binary_cursor

        with binary_cursor() as cursor:
            from pgvector import HalfVector

            wrap = (lambda v: HalfVector(v)) if kind == "halfvec" else (lambda v: v)
            with cursor.copy(f"COPY {table} (id, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", kind])
                for i, v in enumerate(vectors):
                    copy.write_row((i, wrap(v)))
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(f"SET maintenance_work_mem = '{settings.HNSW_BUILD_MEMORY}'")
            cursor.execute(f"CREATE INDEX {table}_hnsw ON {table} USING hnsw (v {kind}_cosine_ops) "
                           f"WITH (m = {settings.HNSW_M}, ef_construction = {settings.HNSW_EF_CONSTRUCTION})")
            build_s = time.perf_counter() - started
            cursor.execute(f"ANALYZE {table}")
            cursor.execute(f"SELECT pg_table_size('{table}'), pg_relation_size('{table}_hnsw')")
            table_bytes, index_bytes = cursor.fetchone()
        reference = vectors.astype(np.float16).astype(np.float32) if kind == "halfvec" else vectors
        for ef in (40, 100):
            times, recalls = [], []
            for q in queries:
                truth = set(np.argsort(-(reference @ q))[:K].tolist())
                literal = "[" + ",".join(repr(float(x)) for x in q) + "]"
                with connection.cursor() as cursor:
                    cursor.execute(f"SET hnsw.ef_search = {ef}")
                    started = time.perf_counter()
                    cursor.execute(f"SELECT id FROM {table} ORDER BY v <=> %s::{kind}({DIM}) LIMIT {K}", [literal])
                    got = [row[0] for row in cursor.fetchall()]
                    times.append((time.perf_counter() - started) * 1000)
                recalls.append(len(truth.intersection(got)) / K)
            p50, p95 = percentiles(times)
            out.append({"storage": kind, "ef_search": ef, "build_s": build_s, "table_mb": table_bytes / 2**20,
                        "index_mb": index_bytes / 2**20, "p50": p50, "p95": p95, "recall": float(np.mean(recalls))})
            print(f"  {out[-1]}", flush=True)
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")
    return out


def pages(world: dict, clients: int, requests: int) -> list[dict[str, object]]:
    """The image page (similar images with re-ranking, as deployed) under concurrent clients.

    Each client is its own process (forked, its own database connection), like a server with one
    worker per client; the time is the Django handler's, middleware included (server time). Each
    client makes one untimed request first, as a running server's workers are connected already.
    Phases, in one run: the cache off (the baseline), first visits (every page a miss, which
    fills the cache), the same pages again (every page a hit), and a popularity mix: page keys
    drawn from a Zipf distribution (s = 1.1) over 2,000 images after the cache is emptied.
    """
    import multiprocessing

    from django.conf import settings
    from django.core.cache import cache
    from django.db import connections
    from django.test import Client

    from webapp.models import Collection, Image, Visibility

    # The page as an anonymous visitor sees it: the 10% viewer's collections made public.
    Collection.objects.filter(owner=world["ten"]).update(visibility=Visibility.PUBLIC)
    keys = list(Image.objects.filter(collection__owner=world["ten"]).values_list("key", flat=True)[:2000])
    Client().get(f"/i/{keys[-1]}/")  # warm
    connections.close_all()

    def worker(sequence: list[str], queue: multiprocessing.Queue) -> None:
        client = Client()
        # Untimed: a server's worker holds its database connection (CONN_MAX_AGE) and a warm
        # backend; a fresh process's first request pays the connection and PostgreSQL's catalog
        # caches, which with 25 requests a client would be the p95 itself.
        client.get(f"/i/{keys[-1]}/")
        times, errors = [], 0
        for key in sequence:
            started = time.perf_counter()
            response = client.get(f"/i/{key}/")
            times.append((time.perf_counter() - started) * 1000)
            errors += response.status_code != 200
        queue.put((times, errors))

    def run(name: str, sequences: list[list[str]], cache_seconds: int) -> dict[str, object]:
        settings.SIMILAR_CACHE_SECONDS = cache_seconds
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        processes = [context.Process(target=worker, args=(seq, queue)) for seq in sequences]
        started = time.perf_counter()
        for process in processes:
            process.start()
        results = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        wall = time.perf_counter() - started
        times = [t for chunk, _ in results for t in chunk]
        requested = [key for seq in sequences for key in seq]
        p50, p95 = percentiles(times)
        row = {"phase": name, "clients": clients, "requests": len(times), "errors": sum(e for _, e in results),
               "p50": round(p50, 1), "p95": round(p95, 1), "per_second": round(len(times) / wall, 1),
               "distinct pages": len(set(requested))}
        print(f"  {row}", flush=True)
        return row

    distinct = [[keys[(n * requests + i) % len(keys)] for i in range(requests)] for n in range(clients)]
    rng = np.random.default_rng(1)
    weights = 1.0 / np.arange(1, len(keys) + 1) ** 1.1
    zipf = [list(rng.choice(keys, size=requests * 2, p=weights / weights.sum())) for _ in range(clients)]
    out = [run("cache off", distinct, 0)]
    cache.clear()
    out.append(run("first visits", distinct, 3600))
    out.append(run("repeat visits", distinct, 3600))
    cache.clear()
    out.append(run("popular (Zipf 1.1)", zipf, 3600))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--storage", action="store_true", help="also compare vector and halfvec storage")
    parser.add_argument("--pages", action="store_true", help="also time the image page under 8 clients")
    parser.add_argument("--page-requests", type=int, default=25, help="timed requests per client and phase")
    parser.add_argument("--sweep", default="", help="ef_search values to sweep unfiltered, e.g. 40,100,200")
    parser.add_argument("--var", type=Path, help="keep the database here instead of a temporary directory")
    parser.add_argument("--reuse", action="store_true",
                        help="with --var: measure the database an earlier run loaded there (same --rows) again")
    args = parser.parse_args()
    if args.reuse and not args.var:
        parser.error("--reuse needs --var DIR")
    with tempfile.TemporaryDirectory(prefix="simili-bench-search-") as tmp:
        var = args.var or Path(tmp) / "var"
        redis = setup(var, args.rows)
        from django.conf import settings

        try:
            rng = np.random.default_rng(0)
            centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
            vectors = clustered(args.rows, rng, centres)
            # Queries: new members of the same clusters, as a new photo of a subject already in the library.
            queries = clustered(args.queries, rng, centres)
            print(f"rows {args.rows} x {DIM}, m={settings.HNSW_M}, ef_construction={settings.HNSW_EF_CONSTRUCTION}, "
                  f"ef_search={settings.HNSW_EF_SEARCH}, exact below {settings.EXACT_SEARCH_MAX_ROWS} rows", flush=True)
            world = reload(args.rows) if args.reuse else load(vectors)
            timing = "" if args.reuse else (f"load {world['load_s']:.0f} s ({args.rows / world['load_s']:.0f} "
                                            f"rows/s), index build {world['build_s']:.0f} s, ")
            print(f"{timing}table {world['table_bytes'] / 2**20:.0f} MB, index "
                  f"{world['index_bytes'] / 2**20:.0f} MB", flush=True)
            report = measure(world, vectors, queries)
            print("\n| filter | rows | plan | app p50 / p95 ms | app + QE, k 12: p50 / p95 ms | app recall@10 (min) | "
                  "short | HNSW p50 / p95 ms (recall) | exact p50 / p95 ms | numpy p50 ms | exact / app (p50) | "
                  "app / numpy (p50) |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in report:
                print(f"| {r['filter']} | {r['rows']} | {r['plan']} | {r['app_p50']:.1f} / {r['app_p95']:.1f} | "
                      f"{r['app_qe_p50']:.1f} / {r['app_qe_p95']:.1f} | "
                      f"{r['recall']:.3f} ({r['min_recall']:.1f}) | {r['short']} | {r['hnsw_p50']:.1f} / "
                      f"{r['hnsw_p95']:.1f} ({r['hnsw_recall']:.3f}) | {r['exact_p50']:.1f} / {r['exact_p95']:.1f} | "
                      f"{r['numpy_p50']:.1f} | {r['exact_p50'] / r['app_p50']:.1f}x | "
                      f"{r['app_p50'] / r['numpy_p50']:.1f}x |")
            if args.sweep:
                print("\nunfiltered graph walk by ef_search:", flush=True)
                sweep(world, vectors, queries, [int(v) for v in args.sweep.split(",")])
            if args.pages:
                print("\nimage page, 8 clients:", flush=True)
                pages(world, clients=8, requests=args.page_requests)
            if args.storage:
                print("\nstorage experiment (scratch tables, same vectors):", flush=True)
                storage_experiment(vectors[: min(args.rows, 100_000)], queries)
        finally:
            teardown(redis)


if __name__ == "__main__":
    main()
