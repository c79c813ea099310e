"""Compare retrieval configurations on a labelled folder: `python -m retrieval.evaluate FOLDER`.

Every image queries all the others; an answer is relevant when it has the query's class.
Several configurations run side by side on features cached by (file hash, backbone,
preprocessing), so changing the pooling, projection or re-ranking does not re-embed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from retrieval import onnx_runtime
from retrieval.backbones import DEFAULT_BACKBONE, get_backbone
from retrieval.evaluation import evaluate_ranking, rank_by_similarity
from retrieval.extraction import EmbeddingConfig, Extractor
from retrieval.features import BATCH_SIZE, FeatureCache, FolderFeatures
from retrieval.folders import LabelledFolder, open_rgb, read_labelled_folder
from retrieval.projection import fit_pca_whitening, load_projection
from retrieval.report import ConfigResult, format_markdown, format_table, plot_results, write_json
from retrieval.reranking import DEFAULT_ALPHA, DEFAULT_QE_NEIGHBOURS, augment_database, expand_queries

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("var/cache/features")
DEFAULT_ONNX_CACHE_DIR = Path("var/cache/onnx")  # where the web app's worker keeps its exports
#: torch: pooled from the feature map, every configuration; onnx, onnx-int8: the worker's own
#: `Extractor.embed` in ONNX Runtime, the backbone's own recipe only.
RUNTIMES = ("torch", "onnx", "onnx-int8")
DEFAULT_OUT_DIR = Path("var/evaluation")
#: (1/sqrt 2, 1, sqrt 2) x 224, rounded to multiples of 32: the usual three-scale pyramid.
MULTI_SCALES = (160, 224, 320)


@dataclass(frozen=True)
class SearchConfig:
    """One end-to-end retrieval recipe: embedding, optional projection, optional query expansion."""

    name: str = ""
    backbone: str = DEFAULT_BACKBONE
    resize: str | None = None
    pooling: str = "gap"
    scales: tuple[int, ...] | None = None
    whiten: str | None = None
    projection: Path | None = None
    dba: int = 0
    qe: int = 0
    alpha: float = 0.0

    def embedding(self) -> EmbeddingConfig:
        return EmbeddingConfig.for_backbone(
            get_backbone(self.backbone), resize=self.resize, pooling=self.pooling, scales=self.scales
        )

    def describe(self) -> str:
        parts = [f"backbone={self.backbone}", f"resize={self.embedding().resize}", f"pool={self.pooling}"]
        parts.append("scales=" + "+".join(str(s) for s in self.embedding().scales))
        if self.whiten:
            parts.append(f"whiten={self.whiten}")
        if self.projection is not None:
            parts.append(f"projection={self.projection}")
        if self.dba:
            parts.append(f"dba={self.dba}")
        if self.qe:
            parts.append(f"qe={self.qe}")
        if self.alpha:
            parts.append(f"alpha={self.alpha:g}")
        return ",".join(parts)

    def label(self) -> str:
        if self.name:
            return self.name
        embedding = self.embedding()
        parts = ["crop" if embedding.resize == "center_crop" else "whole", self.pooling]
        if len(embedding.scales) > 1:
            parts.append("ms")
        if self.backbone != DEFAULT_BACKBONE:
            parts.insert(0, self.backbone)
        if self.whiten:
            parts.append("centre" if self.whiten == "centre" else f"whiten:{self.whiten}")
        if self.projection is not None:
            parts.append(f"proj:{self.projection.stem}")
        if self.dba:
            parts.append(f"dba{self.dba}")
        if self.qe:
            parts.append(f"qe{self.qe}")
        if self.alpha:
            parts.append(f"a{self.alpha:g}")
        return "+".join(parts)


def parse_config(text: str) -> SearchConfig:
    """Parse "key=value,..." with keys name, backbone, resize, pool, scales (a+b+c), whiten
    (lw|centre|SHRINKAGE|none), projection (a .npz path), dba and qe (neighbours); others keep defaults."""
    config = SearchConfig()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {text!r}, got {item!r}")
        if key == "name":
            config = replace(config, name=value)
        elif key == "backbone":
            config = replace(config, backbone=value)
        elif key == "resize":
            config = replace(config, resize=value)
        elif key == "pool":
            config = replace(config, pooling=value)
        elif key == "scales":
            config = replace(config, scales=tuple(int(s) for s in value.split("+")))
        elif key == "whiten":
            whitening_shrinkage(value)
            config = replace(config, whiten=None if value == "none" else value)
        elif key == "projection":
            config = replace(config, projection=Path(value))
        elif key == "qe":
            config = replace(config, qe=int(value))
        elif key == "dba":
            config = replace(config, dba=int(value))
        elif key == "alpha":
            config = replace(config, alpha=float(value))
        else:
            raise ValueError(
                f"unknown config key {key!r}; expected one of: name, backbone, resize, pool, scales, whiten, "
                "projection, dba, qe, alpha"
            )
    config.embedding()  # fail on a bad backbone, resize or pooling before any work
    return config


def default_configs() -> list[SearchConfig]:
    """Return the standard comparison: each change alone against the baseline, then combined."""
    n = DEFAULT_QE_NEIGHBOURS
    return [
        SearchConfig(),
        SearchConfig(resize="center_crop"),
        SearchConfig(pooling="gem"),
        SearchConfig(scales=MULTI_SCALES),
        SearchConfig(pooling="gem", scales=MULTI_SCALES),
        SearchConfig(whiten="lw"),
        SearchConfig(whiten="centre"),
        SearchConfig(qe=n),
        SearchConfig(dba=n, qe=n),
        SearchConfig(whiten="centre", dba=n, qe=n),
        SearchConfig(pooling="gem", scales=MULTI_SCALES, whiten="centre", dba=n, qe=n),
        SearchConfig(scales=MULTI_SCALES, whiten="centre", dba=n, qe=n),
        SearchConfig(dba=10, qe=10, alpha=DEFAULT_ALPHA),  # the web app's default
    ]


def whitening_shrinkage(value: str) -> float | None:
    """Map a whiten= value to `fit_pca_whitening`'s shrinkage: lw estimates it, centre is 1 (no whitening)."""
    if value in ("lw", "none"):
        return None
    if value == "centre":
        return 1.0
    try:
        shrinkage = float(value)
    except ValueError:
        raise ValueError(f"expected whiten=lw, centre, none or a shrinkage in [0, 1], got {value!r}") from None
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"expected a whitening shrinkage in [0, 1], got {value!r}")
    return shrinkage


def search_vectors(config: SearchConfig, vectors: np.ndarray, *, source_key: str) -> np.ndarray:
    """Apply the configuration's whitening (fitted on these vectors, no labels) or projection."""
    if config.whiten:
        shrinkage = whitening_shrinkage(config.whiten)
        vectors = fit_pca_whitening(vectors, source_key=source_key, shrinkage=shrinkage).apply(vectors)
    if config.projection is not None:
        projection = load_projection(config.projection)
        if projection.source_key != source_key:
            raise ValueError(
                f"projection {config.projection} was fitted on {projection.source_key!r} vectors, "
                f"not {source_key!r}"
            )
        vectors = projection.apply(vectors)
    return vectors


def rank_all_against_all(vectors: np.ndarray, *, qe: int, dba: int = 0, alpha: float = 0.0) -> np.ndarray:
    """Rank every vector against all the others: database-side augmentation, then query expansion."""
    itself = np.arange(len(vectors))
    ranking = rank_by_similarity(vectors, vectors, exclude=itself)
    if dba:
        vectors = augment_database(vectors, ranking, n=dba, alpha=alpha)
        ranking = rank_by_similarity(vectors, vectors, exclude=itself)
    if qe:
        expanded = expand_queries(vectors, vectors, ranking, n=qe, alpha=alpha)
        ranking = rank_by_similarity(expanded, vectors, exclude=itself)
    return ranking


@dataclass
class RuntimeFolderFeatures(FolderFeatures):
    """Vectors as the web app's CPU worker makes them, in ONNX Runtime at one precision; not cached on disk."""

    precision: str = "fp32"
    onnx_cache: Path = DEFAULT_ONNX_CACHE_DIR
    _vectors: np.ndarray | None = field(default=None, init=False)

    def vectors(self, config: EmbeddingConfig) -> np.ndarray:
        if config != EmbeddingConfig.for_backbone(self.spec):
            raise ValueError(
                f"ONNX Runtime runs only the backbone's own recipe ({EmbeddingConfig.for_backbone(self.spec)}), "
                f"not {config}; use --runtime torch for other poolings and scales"
            )
        if self._vectors is None:
            started = time.perf_counter()
            extractor = self.extractor()
            extractor.onnx = onnx_runtime.load(self.spec, extractor.model, self.onnx_cache, precision=self.precision)
            logger.info("embedding in ONNX Runtime, %s", extractor.onnx.precision)
            self._vectors = np.concatenate([
                extractor.embed([open_rgb(path) for path in self.paths[start:start + BATCH_SIZE]]).vectors
                for start in range(0, len(self.paths), BATCH_SIZE)
            ])
            self.embed_seconds += time.perf_counter() - started
        return self._vectors


def run_config(config: SearchConfig, folder: LabelledFolder, features: FolderFeatures) -> ConfigResult:
    """Embed (or read from cache), project, rank and score one configuration."""
    started = time.perf_counter()
    embedded_before = features.embed_seconds
    embedding = config.embedding()
    source_key = embedding.key(features.spec)
    vectors = search_vectors(config, features.vectors(embedding), source_key=source_key)
    ranking = rank_all_against_all(vectors, qe=config.qe, dba=config.dba, alpha=config.alpha)
    report = evaluate_ranking(ranking, folder.labels, folder.labels, classes=folder.classes)
    return ConfigResult(
        name=config.label(),
        description=config.describe(),
        report=report,
        seconds=time.perf_counter() - started,
        embed_seconds=features.embed_seconds - embedded_before,
    )


def evaluate_folder(
    folder: LabelledFolder,
    configs: Sequence[SearchConfig],
    *,
    cache_dir: Path | None,
    device: str = "auto",
    progress: bool = True,
    runtime: str = "torch",
    onnx_cache: Path = DEFAULT_ONNX_CACHE_DIR,
) -> list[ConfigResult]:
    """Run every configuration on the folder, sharing features between those of one backbone.

    Args:
        folder: the labelled images.
        configs: the configurations, reported in this order.
        cache_dir: where features are cached; None keeps them in memory for this run only.
        device: torch device for embedding.
        progress: show a progress bar while embedding.
        runtime: "torch", or "onnx" / "onnx-int8" to embed as the CPU worker does (the
            backbone's own recipe only; `cache_dir` is not used).
        onnx_cache: where ONNX exports are kept (and made the first time).

    Returns:
        One result per configuration.
    """
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    by_backbone: dict[str, FolderFeatures] = {}
    results = []
    for config in configs:
        if config.backbone not in by_backbone:
            spec = get_backbone(config.backbone)
            if runtime == "torch":
                by_backbone[config.backbone] = FolderFeatures(
                    folder.paths,
                    spec,
                    cache,
                    functools.cache(functools.partial(Extractor, spec, device=device)),
                    progress=progress,
                )
            else:
                by_backbone[config.backbone] = RuntimeFolderFeatures(
                    folder.paths,
                    spec,
                    None,
                    functools.partial(Extractor, spec, device="cpu", onnx_cache=onnx_cache),
                    progress=progress,
                    precision="int8" if runtime == "onnx-int8" else "fp32",
                    onnx_cache=onnx_cache,
                )
        result = run_config(config, folder, by_backbone[config.backbone])
        logger.info("%s: mAP %.4f in %.1f s", result.name, result.report.mean_ap, result.seconds)
        results.append(result)
    return results


def write_outputs(results: Sequence[ConfigResult], out_dir: Path, *, folder: LabelledFolder, command: str) -> None:
    """Write results.json, results.md and results.png into `out_dir`."""
    context = [
        f"Folder: `{folder.root}` ({len(folder.paths)} images, {len(folder.classes)} classes); "
        "every image queries all the others.",
        f"Command: `{command}`",
    ]
    payload = {"folder": str(folder.root), "images": len(folder.paths), "classes": folder.classes}
    write_json(out_dir / "results.json", {**payload, "command": command, "results": [r.as_dict() for r in results]})
    (out_dir / "results.md").write_text(format_markdown(results, title="Retrieval evaluation", context=context))
    plot_results(results, out_dir / "results.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="labelled folder: one sub-folder of images per class")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="K=V,...",
        help="a configuration, e.g. 'pool=gem,scales=160+224+320,whiten=lw,qe=5' (repeatable); "
        "keys: name, backbone, resize (short_side|center_crop), pool (gap|gem), scales, whiten (lw|none), "
        "projection (.npz), qe (neighbours). Default: the standard comparison.",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache (default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="torch",
        help="torch (default), or embed as the web app's CPU worker does in ONNX Runtime, fp32 or int8 "
        "(the backbone's own recipe only)",
    )
    parser.add_argument("--onnx-cache", type=Path, default=DEFAULT_ONNX_CACHE_DIR,
                        help="ONNX exports for --runtime onnx* (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configs = [parse_config(text) for text in args.config] or default_configs()
    folder = read_labelled_folder(args.folder)
    results = evaluate_folder(
        folder,
        configs,
        cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device,
        progress=not args.no_progress,
        runtime=args.runtime,
        onnx_cache=args.onnx_cache,
    )
    command = "python -m retrieval.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(results, args.out, folder=folder, command=command)
    sys.stdout.write(format_table(results) + "\n")
    sys.stdout.write(f"wrote {args.out / 'results.json'}, results.md and results.png\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
