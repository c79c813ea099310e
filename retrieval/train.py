"""Train on a folder: `python -m retrieval.train FOLDER --method cnn|projection|dcgan`.

cnn: the small CNN from scratch on a stratified train/test split by image; reports test
accuracy and the retrieval mAP of its penultimate features among the test images.
projection: a linear or MLP head on frozen, cached backbone features with a supervised
contrastive loss, cross-validated by image (k folds; every image is scored once, by a head that
never saw it), then refitted on every image and saved for deployment.
dcgan: a DCGAN on every image under FOLDER, no labels needed; its discriminator is a backbone
(`gan:OUT/discriminator.pt`).
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

from retrieval import gan
from retrieval.backbones import DEFAULT_BACKBONE, get_backbone
from retrieval.evaluate import DEFAULT_CACHE_DIR, parse_config
from retrieval.evaluation import evaluate_ranking, rank_by_similarity
from retrieval.extraction import EmbeddingConfig, Extractor, resolve_device
from retrieval.features import FeatureCache, FolderFeatures
from retrieval.folders import LabelledFolder, list_images, read_labelled_folder, stratified_folds
from retrieval.projection import Projection, fit_pca_whitening
from retrieval.report import write_json
from retrieval.reranking import DEFAULT_QE_NEIGHBOURS
from retrieval.training import (
    PROJECTION_DIM,
    Generated,
    History,
    held_out_map,
    plot_history,
    train_projection,
    train_small_cnn,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("var/training")
#: A Corel class has 80 training images: batches of 16 give 5 steps an epoch, and 40 epochs give
#: each per-class GAN 200 steps, under a minute per class on one CPU core.
GAN_CLASS_BATCH = 16
GAN_CLASS_EPOCHS = 40


def run_cnn(folder: LabelledFolder, args: argparse.Namespace) -> dict[str, object]:
    folds = stratified_folds(folder.labels, k=round(1 / args.test_fraction), seed=args.seed)
    test = folds[0]
    train = np.setdiff1d(np.arange(len(folder.paths)), test)
    options = {"train_indices": train, "test_indices": test, "epochs": args.epochs, "seed": args.seed,
               "progress": not args.no_progress}
    result = train_small_cnn(folder, out_dir=args.out, **options)  # type: ignore[arg-type]
    plot_history(result.history, args.out / "curves.png", title="small CNN")
    summary: dict[str, object] = {
        "method": "cnn",
        "train_images": len(train),
        "test_images": len(test),
        "test_accuracy": result.test_accuracy,
        "test_mAP": result.test_map,
        "checkpoint": str(result.checkpoint),
        "seconds": round(result.seconds, 1),
        "history": result.history.columns,
    }
    if args.gan_ratio > 0:
        generated = _generated(folder, train, args)
        # Same split, same seed, same epochs: the generated images are the only difference.
        augmented = train_small_cnn(folder, out_dir=args.out / "augmented", generated=generated,
                                    **options)  # type: ignore[arg-type]
        plot_history(augmented.history, args.out / "augmented" / "curves.png", title="small CNN + GAN images")
        summary.update(_augmentation_summary(args, augmented.real_images, augmented.generated_images))
        summary.update({
            "augmented_test_accuracy": augmented.test_accuracy,
            "augmented_test_mAP": augmented.test_map,
            "augmented_checkpoint": str(augmented.checkpoint),
            "augmented_history": augmented.history.columns,
        })
    return summary


def _generated(folder: LabelledFolder, train: np.ndarray, args: argparse.Namespace) -> Generated:
    """Return `--gan-ratio` times the training images, made by one GAN per class that saw only those."""
    train_paths = [folder.paths[int(i)] for i in train]
    if args.gan_checkpoint is not None:
        generators = gan.find_class_gans(args.gan_checkpoint, folder.classes, train_paths)
    else:
        generators = gan.train_class_gans(
            train_paths, folder.labels[train], folder.classes, args.out / "gan", seed=args.seed,
            progress=not args.no_progress, size=args.size, width=args.width, epochs=args.gan_epochs,
            batch_size=args.gan_batch_size,
        )
    counts = gan.generated_counts(folder.labels[train], args.gan_ratio)
    images, labels = gan.generate_labelled(generators, counts, seed=args.seed)
    return Generated(images, labels)


def _augmentation_summary(args: argparse.Namespace, real: int, generated: int) -> dict[str, object]:
    return {
        "gan_ratio": args.gan_ratio,
        "gan_checkpoint": str(args.gan_checkpoint or args.out / "gan"),
        "augmented_real_images": real,
        "augmented_generated_images": generated,
    }


def _held_out_scores(vectors: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Return the mAP of held-out unit vectors querying each other, and their 1-NN accuracy (P@1)."""
    ranking = rank_by_similarity(vectors, vectors, exclude=np.arange(len(vectors)))
    report = evaluate_ranking(ranking, labels, labels, classes=classes, ks=(1,))
    return {"mAP": report.mean_ap, "nn_accuracy": report.precision[1]}


def run_projection_augmentation(
    folder: LabelledFolder, args: argparse.Namespace, vectors: np.ndarray, test: np.ndarray, *, source_key: str,
    extractor: Extractor,
) -> dict[str, object]:
    """Train the head on the first fold's training images without and with GAN images; score both on its test images."""
    train = np.setdiff1d(np.arange(len(vectors)), test)
    generated = _generated(folder, train, args)
    made = extractor.embed(list(generated.images)).vectors
    sets = {
        "without": (vectors[train], folder.labels[train]),
        "with": (np.concatenate([vectors[train], made]), np.concatenate([folder.labels[train], generated.labels])),
    }
    scores = {}
    for name, (x, y) in sets.items():
        projection = train_projection(x, y, source_key=source_key, kind=args.kind, out_dim=args.dim,
                                      epochs=args.epochs, seed=args.seed, progress=not args.no_progress).projection
        scores[name] = _held_out_scores(projection.apply(vectors[test]), folder.labels[test], folder.classes)
    return {
        **_augmentation_summary(args, len(train), len(generated.labels)),
        "augmentation_fold": 1,
        "augmentation_test_images": len(test),
        "test_mAP": scores["without"]["mAP"],
        "test_nn_accuracy": scores["without"]["nn_accuracy"],
        "augmented_test_mAP": scores["with"]["mAP"],
        "augmented_test_nn_accuracy": scores["with"]["nn_accuracy"],
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
    augmentation = {}
    if args.gan_ratio > 0:
        native = embedding == EmbeddingConfig.for_backbone(spec)
        extractor = Extractor(spec, device=args.device, config=None if native else embedding)
        augmentation = run_projection_augmentation(folder, args, vectors, folds[0], source_key=source_key,
                                                   extractor=extractor)
    return {
        **augmentation,
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


def run_dcgan(args: argparse.Namespace) -> dict[str, object]:
    paths = list_images(args.folder)
    run = gan.train_dcgan(
        paths,
        args.out,
        size=args.size,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        source=args.folder.resolve().name,
        device=args.device,
        progress=not args.no_progress,
    )
    return {
        "method": "dcgan",
        "images": len(paths),
        "size": args.size,
        "generator": str(run.generator),
        "discriminator": str(run.discriminator),
        "backbone": f"gan:{run.discriminator.resolve()}",
        "samples": str(run.samples),
        "final": {name: values[-1] for name, values in run.history.columns.items()},
        "seconds": round(run.seconds, 1),
        "history": run.history.columns,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", type=Path, help="one sub-folder of images per class (dcgan: any folder of images, no labels)"
    )
    parser.add_argument("--method", choices=("cnn", "projection", "dcgan"), default="cnn")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"default 30 (cnn), 40 (projection) or {gan.EPOCHS} (dcgan)"
    )
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
    projection.add_argument("--device", default="auto", help="also for dcgan (default %(default)s)")
    augment = parser.add_argument_group("GAN augmentation (cnn, projection)")
    augment.add_argument("--gan-ratio", type=float, default=0.0,
                         help="generated / real training images; above 0, the run also trains with them and "
                         "reports both (default %(default)s: off)")
    augment.add_argument("--gan-checkpoint", type=Path, default=None,
                         help="a folder with <class>/generator.pt from an earlier run on the same split "
                         "(default: train one DCGAN per class here, into OUT/gan)")
    augment.add_argument("--gan-epochs", type=int, default=GAN_CLASS_EPOCHS,
                         help="epochs of each per-class DCGAN (default %(default)s)")
    augment.add_argument("--gan-batch-size", type=int, default=GAN_CLASS_BATCH,
                         help="batch of each per-class DCGAN (default %(default)s)")
    dcgan = parser.add_argument_group("dcgan (and the per-class DCGANs)")
    dcgan.add_argument("--size", type=int, default=gan.DEFAULT_SIZE, help="side, a power of two (default %(default)s)")
    dcgan.add_argument("--width", type=int, default=gan.WIDTH, help="first D block's channels (default %(default)s)")
    dcgan.add_argument("--batch-size", type=int, default=gan.BATCH_SIZE, help="images per step (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.epochs is None:
        args.epochs = {"cnn": 30, "projection": 40, "dcgan": gan.EPOCHS}[args.method]
    if not 0.0 < args.test_fraction < 1.0:
        raise SystemExit(f"expected --test-fraction in (0, 1), got {args.test_fraction}")
    if args.gan_ratio < 0:
        raise SystemExit(f"expected --gan-ratio of at least 0, got {args.gan_ratio}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method == "dcgan":
        if args.device == "auto":
            args.device = str(resolve_device("auto"))
        result = run_dcgan(args)
    else:
        folder = read_labelled_folder(args.folder)
        result = run_cnn(folder, args) if args.method == "cnn" else run_projection(folder, args)
    result["command"] = "python -m retrieval.train " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out / "metrics.json", result)
    shown = {k: v for k, v in result.items() if k not in ("history", "per_fold", "augmented_history")}
    for key, value in shown.items():
        sys.stdout.write(f"{key}: {value}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
