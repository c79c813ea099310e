"""Measure video search on videos made from a labelled photo folder: `python -m retrieval.evaluate_video FOLDER`.

Each video pans and zooms across two or three photos of one class, with cuts, noise and lossy
H.264 (`retrieval.synthetic_video`). Two measurements:

- **Moments**: every source photo, lightly cropped, resized and recoloured, queries the frames
  of all videos; each video counts with its best frame. A query is right when the top video is
  the one that shows the photo *and* that frame's timestamp lies within 1 s of the photo's shot.
  Run for each way of sampling frames (fixed rate, scene changes, both).
- **Videos**: the test videos query each other with one vector per video; relevant = same
  class. Mean pooling against the GRU encoder, trained without labels either on a disjoint set
  of training videos (other photos: the honest number) or on the test videos themselves (what the
  web app does with a collection's own videos; still no labels).

The videos are written to a temporary folder and deleted (`--keep-videos` keeps them).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval import video, video_encoder
from retrieval.backbones import DEFAULT_BACKBONE, get_backbone
from retrieval.evaluation import evaluate_ranking, rank_by_similarity
from retrieval.extraction import Extractor
from retrieval.folders import LabelledFolder, open_rgb, read_labelled_folder
from retrieval.synthetic_video import SyntheticVideo, jittered_view, make_video_set, plan_videos

logger = logging.getLogger(__name__)

#: A moment is found when the best frame is within this many seconds of the photo's shot.
MOMENT_TOLERANCE = 1.0
#: Images per embedding call: the ONNX model's batch, and a progress line every few seconds.
EMBED_BATCH = 32
#: GRU trainings per protocol; the table gives their mean and spread.
GRU_SEEDS = (0, 1, 2)
#: The encoder's temperature, and SimCLR's 0.1 to show why it is not the default.
TEMPERATURES = (video_encoder.TEMPERATURE, 0.1)

#: name -> (every_seconds, scene_threshold) of the sampling modes compared.
SAMPLING_MODES: dict[str, tuple[float | None, float | None]] = {
    f"every {video.DEFAULT_EVERY_SECONDS:g} s": (video.DEFAULT_EVERY_SECONDS, None),
    f"scene changes (> {video.DEFAULT_SCENE_THRESHOLD:g})": (None, video.DEFAULT_SCENE_THRESHOLD),
    "both (default)": (video.DEFAULT_EVERY_SECONDS, video.DEFAULT_SCENE_THRESHOLD),
}
DEFAULT_MODE = "both (default)"


@dataclass(frozen=True)
class SampledSet:
    """Frame vectors of every video under one sampling mode."""

    vectors: list[np.ndarray]
    timestamps: list[np.ndarray]
    seconds: float


@dataclass(frozen=True)
class MomentScore:
    mode: str
    queries: int
    class_accuracy: float
    video_accuracy: float
    moment_accuracy: float
    frames_per_video: float
    sampling_seconds: float


@dataclass(frozen=True)
class VideoScore:
    name: str
    mean_ap: float
    map_sd: float
    p_at_1: float
    seconds: float


def best_frame_per_video(scores: np.ndarray, owners: np.ndarray, n_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """Collapse frame scores to videos: each video's best score and the index of that frame.

    Args:
        scores: (F,) similarity of one query to every frame.
        owners: (F,) the video of each frame.
        n_videos: videos in all; one without frames scores -inf.

    Returns:
        (n_videos,) best scores and (n_videos,) frame indices (-1 where a video has no frame).
    """
    best = np.full(n_videos, -np.inf)
    where = np.full(n_videos, -1, dtype=np.int64)
    order = np.argsort(scores, kind="stable")  # ascending: the last write per video is its best
    best[owners[order]] = scores[order]
    where[owners[order]] = order
    return best, where


def moment_accuracy(
    queries: np.ndarray,
    query_shots: Sequence[tuple[int, float, float]],
    frames: SampledSet,
    labels: np.ndarray,
) -> tuple[float, float, float]:
    """Return (right class, right video, right video and moment) rates of image queries against video frames.

    Args:
        queries: (q, D) unit vectors.
        query_shots: per query, (video index, shot start, shot end) of the photo it was made from.
        frames: every video's frame vectors and timestamps.
        labels: every video's class.

    Returns:
        The fractions whose top video has the right class, is the right video, and is the right
        video with its best frame within `MOMENT_TOLERANCE` seconds of the shot.
    """
    database = np.concatenate(frames.vectors)
    stamps = np.concatenate(frames.timestamps)
    owners = np.concatenate([np.full(len(v), i) for i, v in enumerate(frames.vectors)])
    right_class = right_video = right_moment = 0
    for query, (target, start, end) in zip(queries, query_shots, strict=True):
        best, where = best_frame_per_video(database @ query, owners, len(frames.vectors))
        top = int(np.argmax(best))
        right_class += int(labels[top] == labels[target])
        if top == target:
            right_video += 1
            stamp = stamps[where[top]]
            right_moment += int(start - MOMENT_TOLERANCE <= stamp <= end + MOMENT_TOLERANCE)
    return right_class / len(queries), right_video / len(queries), right_moment / len(queries)


def video_map(vectors: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> tuple[float, float]:
    """Return the mAP and P@1 of video vectors querying each other (self excluded), by class."""
    itself = np.arange(len(vectors))
    report = evaluate_ranking(rank_by_similarity(vectors, vectors, exclude=itself), labels, labels, classes=classes)
    return report.mean_ap, report.precision[1]


def _embed(extractor: Extractor, images: Sequence[Image.Image], *, progress: bool) -> np.ndarray:
    rows = []
    started = time.perf_counter()
    for start in range(0, len(images), EMBED_BATCH):
        rows.append(extractor.embed(images[start : start + EMBED_BATCH]).vectors)
        if progress:
            done = min(start + EMBED_BATCH, len(images))
            logger.info("embedded %s/%s images, %.0f s", done, len(images), time.perf_counter() - started)
    return np.concatenate(rows)


def sample_all(
    videos: Sequence[SyntheticVideo], extractor: Extractor, *, progress: bool
) -> tuple[dict[str, SampledSet], float]:
    """Sample every video in every mode, embedding each distinct (video, timestamp) frame once.

    Returns:
        The frame vectors per mode, and the seconds spent embedding.
    """
    chosen: dict[str, list[list[video.Frame]]] = {}
    seconds: dict[str, float] = {}
    for mode, (every, threshold) in SAMPLING_MODES.items():
        started = time.perf_counter()
        chosen[mode] = [video.sample_frames(v.path, every_seconds=every, scene_threshold=threshold) for v in videos]
        seconds[mode] = time.perf_counter() - started
    unique: dict[tuple[int, float], int] = {}
    images: list[Image.Image] = []
    for per_video in chosen.values():
        for number, frames in enumerate(per_video):
            for frame in frames:
                key = (number, round(frame.timestamp, 4))
                if key not in unique:
                    unique[key] = len(images)
                    images.append(frame.image)
    started = time.perf_counter()
    vectors = _embed(extractor, images, progress=progress)
    embed_seconds = time.perf_counter() - started
    sets = {}
    for mode, per_video in chosen.items():
        rows = [[unique[(n, round(f.timestamp, 4))] for f in frames] for n, frames in enumerate(per_video)]
        sets[mode] = SampledSet(
            vectors=[vectors[r] for r in rows],
            timestamps=[np.array([f.timestamp for f in frames]) for frames in per_video],
            seconds=seconds[mode],
        )
    return sets, embed_seconds


def _gru_scores(
    name: str, train_on: Sequence[np.ndarray], test: Sequence[np.ndarray], labels: np.ndarray,
    classes: Sequence[str], *, source_key: str, epochs: int, temperature: float, device: str,
) -> VideoScore:
    started = time.perf_counter()
    maps, p1s = [], []
    for seed in GRU_SEEDS:
        model, _ = video_encoder.train(train_on, epochs=epochs, temperature=temperature, seed=seed, device=device,
                                       source_key=source_key)
        mean_ap, p1 = video_map(video_encoder.encode_many(model, test), labels, classes)
        maps.append(mean_ap)
        p1s.append(p1)
    return VideoScore(name, float(np.mean(maps)), float(np.std(maps)), float(np.mean(p1s)),
                      (time.perf_counter() - started) / len(GRU_SEEDS))


def run(
    folder: LabelledFolder,
    *,
    videos_per_class: int,
    seed: int,
    work_dir: Path,
    device: str,
    onnx_cache: Path | None,
    epochs: int,
    progress: bool,
) -> tuple[list[MomentScore], list[VideoScore], dict[str, float]]:
    """Build the set, embed it, and score moments and video vectors; see the module docstring."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    plan = plan_videos(folder.labels, videos_per_class=2 * videos_per_class, seed=seed)
    # Within each class, the first half of the videos are test videos, the second half train the GRU.
    is_test = np.array([i % (2 * videos_per_class) < videos_per_class for i in range(len(plan))])
    videos = make_video_set(folder.paths, plan, work_dir, seed=seed)
    timings["render"] = time.perf_counter() - started
    spec = get_backbone(DEFAULT_BACKBONE)
    extractor = Extractor(spec, device=device, onnx_cache=onnx_cache)
    sets, timings["embed frames"] = sample_all(videos, extractor, progress=progress)

    rng = np.random.default_rng(seed)
    query_images: list[Image.Image] = []
    query_shots: list[tuple[int, float, float]] = []
    for number, item in enumerate(videos):
        for shot in item.shots:
            query_images.append(jittered_view(open_rgb(folder.paths[shot.source]), rng))
            query_shots.append((number, shot.start, shot.end))
    started = time.perf_counter()
    queries = _embed(extractor, query_images, progress=progress)
    timings["embed queries"] = time.perf_counter() - started
    video_labels = np.array([v.label for v in videos])
    moments = []
    for mode, frames in sets.items():
        right_class, right_video, right_moment = moment_accuracy(queries, query_shots, frames, video_labels)
        moments.append(MomentScore(mode, len(queries), right_class, right_video, right_moment,
                                   float(np.mean([len(v) for v in frames.vectors])), frames.seconds))

    default = sets[DEFAULT_MODE].vectors
    test = [default[i] for i in np.flatnonzero(is_test)]
    train_set = [default[i] for i in np.flatnonzero(~is_test)]
    labels = video_labels[is_test]
    started = time.perf_counter()
    pooled = np.stack([video_encoder.mean_pool(v) for v in test])
    mean_ap, p1 = video_map(pooled, labels, folder.classes)
    scores = [VideoScore("mean pooling", mean_ap, 0.0, p1, time.perf_counter() - started)]
    untrained = video_encoder.VideoEncoder(spec.embedding_dim)
    mean_ap, p1 = video_map(video_encoder.encode_many(untrained, test), labels, folder.classes)
    scores.append(VideoScore("GRU, untrained (zero output layer)", mean_ap, 0.0, p1, 0.0))
    for temperature in TEMPERATURES:
        for name, train_on in ((f"the {len(train_set)} other videos", train_set),
                               (f"the {len(test)} test videos themselves", test)):
            scores.append(_gru_scores(
                f"GRU (τ={temperature:g}) trained on {name}", train_on, test, labels, folder.classes,
                source_key=spec.key, epochs=epochs, temperature=temperature, device=device,
            ))
    return moments, scores, timings


def format_report(
    moments: Sequence[MomentScore], scores: Sequence[VideoScore], *, context: Sequence[str]
) -> str:
    """Return the results as markdown tables."""
    out = [*context, "",
           f"| frames sampled | frames a video | sampling s | top video's class | right video "
           f"| right video and moment (±{MOMENT_TOLERANCE:g} s) |",
           "|---|---|---|---|---|---|"]
    for m in moments:
        out.append(f"| {m.mode} | {m.frames_per_video:.1f} | {m.sampling_seconds:.1f} | {m.class_accuracy:.3f} "
                   f"| {m.video_accuracy:.3f} | {m.moment_accuracy:.3f} |")
    out += ["", "| video vector | mAP | P@1 | seconds |", "|---|---|---|---|"]
    for s in scores:
        spread = f" ± {s.map_sd:.4f}" if s.map_sd else ""
        out.append(f"| {s.name} | {s.mean_ap:.4f}{spread} | {s.p_at_1:.3f} | {s.seconds:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval.evaluate_video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="one sub-folder of photos per class")
    parser.add_argument("--videos-per-class", type=int, default=6,
                        help="test videos per class; as many again train the GRU (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=video_encoder.DEFAULT_EPOCHS, help="GRU training epochs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--onnx-cache", type=Path, default=Path("var/cache/onnx"),
                        help="on the CPU, embed with ONNX Runtime as the web app does (default var/cache/onnx)")
    parser.add_argument("--torch", action="store_true", help="embed with eager PyTorch instead of ONNX Runtime")
    parser.add_argument("--keep-videos", type=Path, help="write the videos here and keep them")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    folder = read_labelled_folder(args.folder)
    with tempfile.TemporaryDirectory(prefix="simili-videos-") as scratch:
        work_dir = args.keep_videos or Path(scratch)
        moments, scores, timings = run(
            folder, videos_per_class=args.videos_per_class, seed=args.seed, work_dir=work_dir, device=args.device,
            onnx_cache=None if args.torch else args.onnx_cache, epochs=args.epochs, progress=not args.no_progress,
        )
    total = time.perf_counter() - started
    command = " ".join(["python -m retrieval.evaluate_video", *(argv if argv is not None else sys.argv[1:])])
    context = [
        f"Command: `{command}`",
        f"Date: {date.today().isoformat()}; machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}; {total:.0f} s in all ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()) + ").",
        f"{len(folder.classes)} classes x {2 * args.videos_per_class} videos (half test, half GRU training), "
        f"backbone {DEFAULT_BACKBONE}.",
    ]
    report = format_report(moments, scores, context=context)
    sys.stdout.write(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
