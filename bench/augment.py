"""Refreshing a collection: `services.collection_augment` at growing collection sizes.

After uploads settle, a bulk worker recomputes every augmented vector of the collection (each
stored vector averaged with its SIMILAR_DBA nearest neighbours) and its near-duplicate pairs.
During a long import this runs again and again on the bulk lane, beside the embedding, so its
cost at a library's size is ingest throughput. Synthetic clustered unit vectors (as
bench/search.py makes them) are loaded into one collection per size through the app's own
code path, then the refresh is timed twice: first with every augmented vector stale (as after
an import), then again with nothing to change (a refresh with no new image).

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

from search import DIM, clustered, setup, teardown  # noqa: E402


def load(size: int, vectors: np.ndarray, owner, version) -> int:
    """One collection of `size` ready images with their vectors; return its id."""
    from webapp import embeddings, services
    from webapp.models import Image, ImageStatus

    collection = services.collection_create(owner=owner, name=f"refresh-{size}")
    images = []
    for i in range(size):
        sha = hashlib.sha256(f"{size}-{i}".encode()).hexdigest()
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

            from webapp import embeddings, services

            owner = get_user_model().objects.create_user("bench")
            version = embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1",
                                                        backbone="efficientnet_lite0", dimensions=DIM)
            rng = np.random.default_rng(3)
            print(f"SIMILAR_DBA {settings.SIMILAR_DBA}, NEAR_DUPLICATE_DISTANCE {settings.NEAR_DUPLICATE_DISTANCE}")
            print(f"{'images':>7} {'stale s':>8} {'changed':>8} {'again s':>8} {'changed':>8}")
            for size in sizes:
                collection_id = load(size, clustered(size, rng), owner, version)
                timings = []
                for _ in range(2):
                    started = time.perf_counter()
                    changed = services.collection_augment(collection_id=collection_id)
                    timings.append((time.perf_counter() - started, changed))
                (first, first_changed), (again, again_changed) = timings
                print(f"{size:>7} {first:>8.2f} {first_changed:>8} {again:>8.2f} {again_changed:>8}", flush=True)
        finally:
            teardown(redis)


if __name__ == "__main__":
    main()
