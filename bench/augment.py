"""Refreshing a collection: `services.collection_augment` at growing collection sizes.

After uploads settle, a bulk worker recomputes every augmented vector of the collection (each
stored vector averaged with its SIMILAR_DBA nearest neighbours) and its near-duplicate pairs.
During a long import this runs again and again on the bulk lane, beside the embedding, so its
cost at a library's size is ingest throughput. Synthetic clustered unit vectors (as
bench/search.py makes them) are loaded into one collection per size through the app's own
code path, then the refresh is timed: in full with every augmented vector stale (as after an
import), in full again with nothing to change, and after 1% more images both as the worker now
runs it (only the new rows and those they come closer to) and in full.

  .venv/bin/python bench/augment.py --sizes 2000,5000,10000,20000

Compare commits by running it at each (docs/benchmarks.md#augment).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from search import CLUSTERS, DIM, clustered, setup, teardown  # noqa: E402


def load(size: int, vectors: np.ndarray, owner, version, collection=None) -> int:
    """`size` ready images with their vectors, in a new collection or `collection`; return its id."""
    from webapp import embeddings, services
    from webapp.models import Image, ImageStatus

    collection = collection or services.collection_create(owner=owner, name=f"refresh-{size}")
    images = []
    for i in range(size):
        sha = hashlib.sha256(f"{collection.pk}-{size}-{i}".encode()).hexdigest()
        images.append(Image(collection=collection, uploaded_by=owner, sha256=sha, file_path=f"originals/{sha}.jpg",
                            thumbnail_path=f"thumbnails/{sha}.jpg", original_name=f"{i}.jpg", mime_type="image/jpeg",
                            width=640, height=480, byte_size=100_000, status=ImageStatus.READY))
    created = Image.objects.bulk_create(images, batch_size=5000)
    for start in range(0, size, 5000):
        embeddings.embeddings_store(version=version, rows=[
            embeddings.VectorRow(image.pk, collection.pk, vectors[start + n], vectors[start + n])
            for n, image in enumerate(created[start:start + 5000])
        ])
    return collection.pk


def _timed(collection_id: int, *, full: bool) -> tuple[float, int]:
    from webapp import services

    started = time.perf_counter()
    changed = services.collection_augment(collection_id=collection_id, full=full)
    return time.perf_counter() - started, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,5000,10000,20000", help="collection sizes, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="simili-bench-augment-") as tmp:
        redis = setup(Path(tmp) / "var", max(sizes))
        try:
            from django.conf import settings
            from django.contrib.auth import get_user_model

            from webapp import embeddings
            from webapp.models import Collection

            owner = get_user_model().objects.create_user("bench")
            version = embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1",
                                                        backbone="efficientnet_lite0", dimensions=DIM)
            rng = np.random.default_rng(3)
            print(f"SIMILAR_DBA {settings.SIMILAR_DBA}, NEAR_DUPLICATE_DISTANCE {settings.NEAR_DUPLICATE_DISTANCE}")
            print(f"{'images':>7} {'stale s':>8} {'changed':>8} {'again s':>8} {'changed':>8} "
                  f"{'+1% s':>7} {'changed':>8} {'+1% full s':>10}")
            for size in sizes:
                centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
                collection_id = load(size, clustered(size, rng, centres), owner, version)
                timings = []
                for _ in range(2):  # every vector stale, then nothing to change
                    timings.append(_timed(collection_id, full=True))
                # 1% more images: what a refresh after an upload costs (only what they change),
                # then the same refresh in full, for comparison
                collection = Collection.objects.get(pk=collection_id)
                # from the same clusters: new photos of what the collection already shows
                load(max(1, size // 100), clustered(max(1, size // 100), rng, centres), owner, version, collection)
                timings.append(_timed(collection_id, full=False))
                timings.append(_timed(collection_id, full=True))
                (stale, stale_n), (again, again_n), (added, added_n), (added_full, _) = timings
                print(f"{size:>7} {stale:>8.2f} {stale_n:>8} {again:>8.2f} {again_n:>8} {added:>7.2f} {added_n:>8} "
                      f"{added_full:>10.2f}", flush=True)
        finally:
            teardown(redis)


if __name__ == "__main__":
    main()
