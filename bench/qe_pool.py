"""How big a pool one graph walk must fetch so that query expansion can re-rank it instead of walking again.

Embeds a labelled folder with the default recipe's backbone, builds the web app's search vectors
(α-DBA over `--dba` neighbours, rounded to halfvec), then for every image as the query compares
the app's old way (expand the query with its first `--qe` results, search everything again) with
re-ranking only the first walk's pool of P rows by the expanded query. It prints, per pool
size, how many of the second search's top k the pool keeps and precision@k against the labels.
docs/search.md records a run on Corel-1k.

  .venv/bin/python bench/qe_pool.py ../shared/datasets/corel1k_wang
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.backbones import get_backbone  # noqa: E402
from retrieval.evaluate import DEFAULT_CACHE_DIR, SearchConfig, search_vectors  # noqa: E402
from retrieval.evaluation import rank_by_similarity  # noqa: E402
from retrieval.extraction import Extractor  # noqa: E402
from retrieval.features import FeatureCache, FolderFeatures  # noqa: E402
from retrieval.folders import read_labelled_folder  # noqa: E402
from retrieval.reranking import augment_database, expand_queries  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="labelled folder: one sub-folder of images per class")
    parser.add_argument("--k", type=int, default=12, help="results shown (default %(default)s: the image page)")
    parser.add_argument("--qe", type=int, default=10, help="query expansion neighbours (SIMILAR_QE)")
    parser.add_argument("--dba", type=int, default=10, help="database-side augmentation neighbours (SIMILAR_DBA)")
    parser.add_argument("--alpha", type=float, default=3.0, help="neighbour weight exponent (SIMILAR_ALPHA)")
    parser.add_argument("--pools", default="12,16,20,24,32,48", help="pool sizes to try, comma-separated")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / DEFAULT_CACHE_DIR, help="feature cache")
    args = parser.parse_args(argv)

    folder = read_labelled_folder(args.folder)
    config = SearchConfig()
    spec = get_backbone(config.backbone)
    features = FolderFeatures(folder.paths, spec, FeatureCache(args.cache_dir),
                              functools.cache(functools.partial(Extractor, spec, device="cpu")), progress=False)
    embedding = config.embedding()
    vectors = search_vectors(config, features.vectors(embedding), source_key=embedding.key(spec))
    itself = np.arange(len(vectors))
    stored = augment_database(vectors, rank_by_similarity(vectors, vectors, exclude=itself), n=args.dba,
                              alpha=args.alpha)
    stored = stored.astype(np.float16).astype(np.float32)  # the app stores and compares halfvec
    first = rank_by_similarity(stored, stored, exclude=itself)
    expanded = expand_queries(stored, stored, first, n=args.qe, alpha=args.alpha)
    second = rank_by_similarity(expanded, stored, exclude=itself)[:, :args.k]
    labels = np.asarray(folder.labels)

    def precision(top: np.ndarray) -> float:
        return float((labels[top] == labels[:, None]).mean())

    print(f"{len(labels)} queries, k {args.k}, qe {args.qe}, dba {args.dba}, alpha {args.alpha}")
    print(f"no expansion: precision@{args.k} {precision(first[:, :args.k]):.4f}")
    print(f"expansion, second walk (the baseline): precision@{args.k} {precision(second):.4f}")
    print(f"| pool | of the second walk's top {args.k} kept | precision@{args.k} |")
    print("|---:|---:|---:|")
    for size in (int(part) for part in args.pools.split(",")):
        pool = first[:, :size]
        scores = np.einsum("qd,qpd->qp", expanded, stored[pool])
        top = np.take_along_axis(pool, np.argsort(-scores, axis=1, kind="stable"), axis=1)[:, :args.k]
        kept = np.mean([len(set(top[i]) & set(second[i])) / args.k for i in range(len(top))])
        print(f"| {size} | {100 * kept:.2f}% | {precision(top):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
