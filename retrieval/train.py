"""Train on a labelled folder: `python -m retrieval.train FOLDER --method cnn|projection`.

cnn: the small CNN from scratch on a stratified train/test split by image; reports test
accuracy and the retrieval mAP of its penultimate features among the test images.
projection: a linear or MLP head on frozen, cached backbone features with a supervised
contrastive loss, cross-validated by image (k folds; every image is scored once, by a head that
never saw it), then refitted on every image and saved for deployment.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.backbones import DEFAULT_BACKBONE, get_backbone
from retrieval.evaluate import DEFAULT_CACHE_DIR, parse_config
from retrieval.extraction import Extractor
from retrieval.features import FeatureCache, FolderFeatures
from retrieval.folders import LabelledFolder, read_labelled_folder, stratified_folds
from retrieval.projection import Projection, fit_pca_whitening
from retrieval.report import write_json
from retrieval.reranking import DEFAULT_QE_NEIGHBOURS
from retrieval.training import (
    PROJECTION_DIM,
    History,
    held_out_map,
    plot_history,
    train_projection,
    train_small_cnn,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("var/training")


def run_cnn(folder: LabelledFolder, args: argparse.Namespace) -> dict[str, object]:
    folds = stratified_folds(folder.labels, k=round(1 / args.test_fraction), seed=args.seed)
    test = folds[0]
    train = np.setdiff1d(np.arange(len(folder.paths)), test)
    result = train_small_cnn(
        folder,
        train_indices=train,
        test_indices=test,
        out_dir=args.out,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    plot_history(result.history, args.out / "curves.png", title="small CNN")
    return {
        "method": "cnn",
        "train_images": len(train),
        "test_images": len(test),
        "test_accuracy": result.test_accuracy,
        "test_mAP": result.test_map,
        "checkpoint": str(result.checkpoint),
        "seconds": round(result.seconds, 1),
        "history": result.history.columns,
    }


def _fold_scores(
    vectors: np.ndarray, folder: LabelledFolder, test: np.ndarray, projection: Projection, *, source_key: str, qe: int
) -> dict[str, float]:
    train = np.setdiff1d(np.arange(len(vectors)), test)
    held_labels = folder.labels[test]
    held = vectors[test]
    centre = fit_pca_whitening(vectors[train], source_key=source_key, shrinkage=1.0).apply(held)
    projected = projection.apply(held)
    return {
        "baseline_mAP": held_out_map(held, held_labels, folder.classes),
        "baseline_qe_mAP": held_out_map(held, held_labels, folder.classes, qe=qe),
        "centred_qe_mAP": held_out_map(centre, held_labels, folder.classes, qe=qe),
        "projection_mAP": held_out_map(projected, held_labels, folder.classes),
        "projection_qe_mAP": held_out_map(projected, held_labels, folder.classes, qe=qe),
    }


def run_projection(folder: LabelledFolder, args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    config = parse_config(args.config)
    spec = get_backbone(config.backbone)
    embedding = config.embedding()
    features = FolderFeatures(
        folder.paths,
        spec,
        None if args.no_cache else FeatureCache(args.cache_dir),
        functools.cache(functools.partial(Extractor, spec, device=args.device)),
        progress=not args.no_progress,
    )
    vectors = features.vectors(embedding)
    source_key = embedding.key(spec)
    qe = args.qe
    folds = stratified_folds(folder.labels, k=args.folds, seed=args.seed)
    per_fold = []
    curves = History()
    for number, test in enumerate(folds, start=1):
        train = np.setdiff1d(np.arange(len(vectors)), test)
        held, held_labels = vectors[test], folder.labels[test]

        def monitor(projection: Projection, held: np.ndarray = held, held_labels: np.ndarray = held_labels) -> dict:
            return {"held_out_mAP": held_out_map(projection.apply(held), held_labels, folder.classes)}

        run = train_projection(
            vectors[train],
            folder.labels[train],
            source_key=source_key,
            kind=args.kind,
            out_dim=args.dim,
            epochs=args.epochs,
            seed=args.seed + number,
            monitor=monitor,
            progress=not args.no_progress,
        )
        scores = _fold_scores(vectors, folder, test, run.projection, source_key=source_key, qe=qe)
        logger.info("fold %d/%d: %s", number, len(folds), ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        per_fold.append(scores)
        for name, values in run.history.columns.items():
            if number == 1:
                curves.columns[name] = list(values)
            else:
                curves.columns[name] = [a + b for a, b in zip(curves.columns[name], values, strict=True)]
    mean_curves = History({k: [v / len(folds) for v in vs] for k, vs in curves.columns.items()})
    plot_history(mean_curves, args.out / "curves.png", title=f"{args.kind} projection (mean of {len(folds)} folds)")
    final = train_projection(
        vectors,
        folder.labels,
        source_key=source_key,
        kind=args.kind,
        out_dim=args.dim,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
    ).projection
    path = final.save(args.out / "projection.npz")
    summary = {k: float(np.mean([fold[k] for fold in per_fold])) for k in per_fold[0]}
    return {
        "method": "projection",
        "kind": args.kind,
        "source_key": source_key,
        "folds": args.folds,
        "qe": qe,
        "cross_validated": summary,
        "per_fold": per_fold,
        "projection": str(path),
        "identifier": final.identifier,
        "seconds": round(time.perf_counter() - started, 1),
        "history": mean_curves.columns,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval.train", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="labelled folder: one sub-folder of images per class")
    parser.add_argument("--method", choices=("cnn", "projection"), default="cnn")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (cnn) or 40 (projection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    cnn = parser.add_argument_group("cnn")
    cnn.add_argument("--test-fraction", type=float, default=0.2, help="images held out, per class (default 0.2)")
    projection = parser.add_argument_group("projection")
    projection.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    projection.add_argument("--dim", type=int, default=PROJECTION_DIM, help="output size (default %(default)s)")
    projection.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    projection.add_argument(
        "--config", default=f"backbone={DEFAULT_BACKBONE}", help="embedding config, as in retrieval.evaluate"
    )
    projection.add_argument("--qe", type=int, default=DEFAULT_QE_NEIGHBOURS, help="QE neighbours for *_qe_mAP")
    projection.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    projection.add_argument("--no-cache", action="store_true")
    projection.add_argument("--device", default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.epochs is None:
        args.epochs = 30 if args.method == "cnn" else 40
    if not 0.0 < args.test_fraction < 1.0:
        raise SystemExit(f"expected --test-fraction in (0, 1), got {args.test_fraction}")
    folder = read_labelled_folder(args.folder)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_cnn(folder, args) if args.method == "cnn" else run_projection(folder, args)
    result["command"] = "python -m retrieval.train " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out / "metrics.json", result)
    shown = {k: v for k, v in result.items() if k not in ("history", "per_fold")}
    for key, value in shown.items():
        sys.stdout.write(f"{key}: {value}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
