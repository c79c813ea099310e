"""Server time of the main pages with a 10,000-image collection, against a 100-image baseline.

Rows and vectors are synthetic (random unit vectors, no files): the pages read only rows, the
HNSW index and thumbnails' URLs. Requests go through Django's full middleware stack in process
(django.test.Client), so the figures are server time without network or gunicorn.

  python bench/pages.py                     # 10,000 images vs 100
  python bench/pages.py --images 50000 --requests 30
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

ROOT = Path(__file__).resolve().parent.parent


def setup(var_dir: Path) -> object:
    os.environ["SIMILI_VAR_DIR"] = str(var_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    sys.path.insert(0, str(ROOT))
    import django
    from django.conf import settings

    from webapp import embedded

    embedded.start_postgres(settings.EMBEDDED, database="simili")
    redis = embedded.start_redis(settings.EMBEDDED)
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return redis


def populate(owner, name: str, count: int, version, rng) -> list[str]:
    import numpy as np

    from webapp import embeddings, services
    from webapp.models import Image, ImageStatus

    collection = services.collection_create(owner=owner, name=name, visibility="public")
    rows = []
    for index in range(count):
        sha = hashlib.sha256(f"{name}-{index}".encode()).hexdigest()
        rows.append(Image(collection=collection, uploaded_by=owner, sha256=sha,
                          file_path=f"originals/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                          thumbnail_path=f"thumbnails/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                          original_name=f"photo-{index:05d}.jpg", mime_type="image/jpeg", width=4000, height=3000,
                          byte_size=3_000_000, status=ImageStatus.READY))
    images = Image.objects.bulk_create(rows, batch_size=2000)
    centres = rng.standard_normal((50, 1280)).astype(np.float32)  # clustered, like real photos
    vectors = centres[rng.integers(0, 50, count)] + 0.6 * rng.standard_normal((count, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [embeddings.VectorRow(image.pk, collection.pk, v, v) for image, v in zip(images, vectors, strict=True)]
    embeddings.embeddings_store(version=version, rows=rows)
    return [collection.key, *(image.key for image in images[:: max(1, count // 50)])]


def timed(client, url: str, requests: int) -> tuple[float, float]:
    client.get(url)  # warm
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
    ordered = sorted(times)
    return statistics.median(times), ordered[int(round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="simili-bench-pages-") as tmp:
        redis = setup(Path(tmp) / "var")
        import numpy as np
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.test import Client

        from webapp import embedded, embeddings

        owner = get_user_model().objects.create_user("bench")
        version = embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1", backbone="efficientnet_lite0",
                                                  dimensions=1280)
        rng = np.random.default_rng(1)
        started = time.perf_counter()
        big = populate(owner, "big", args.images, version, rng)
        print(f"loaded {args.images} rows with vectors in {time.perf_counter() - started:.0f} s")
        small = populate(owner, "small", args.baseline, version, rng)
        embeddings.embedding_index_build(version=version)  # as after a re-index: the graph, whatever the size
        from django.db import connection

        with connection.cursor() as cursor:  # as autovacuum would after a bulk load
            cursor.execute("ANALYZE simili_image; ANALYZE simili_embedding; ANALYZE simili_collection")
        client = Client()
        pages = [
            ("home", lambda keys: "/"),
            ("collection, page 1", lambda keys: f"/c/{keys[0]}/"),
            ("collection, last page", lambda keys: f"/c/{keys[0]}/?page=last"),
            ("collection, by name", lambda keys: f"/c/{keys[0]}/?sort=name&page=3"),
            ("image + 12 similar", lambda keys: f"/i/{keys[1]}/"),
            ("API similar k=12", lambda keys: f"/api/v1/images/{keys[2]}/similar"),
        ]
        print(f"\n{'page':<24} {f'{args.baseline} img p50':>13} {'p95':>7} {f'{args.images} img p50':>15} {'p95':>7}"
              f" {'ratio':>6}")
        for name, url in pages:
            base50, base95 = timed(client, url(small), args.requests)
            big50, big95 = timed(client, url(big), args.requests)
            print(f"{name:<24} {base50:>10.1f} ms {base95:>4.1f} ms {big50:>12.1f} ms {big95:>4.1f} ms"
                  f" {big50 / base50:>5.1f}x")
        embedded.stop_process(redis)
        embedded.stop_postgres(settings.EMBEDDED)


if __name__ == "__main__":
    main()
