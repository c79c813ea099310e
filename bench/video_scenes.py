"""Calibrate DEFAULT_SCENE_THRESHOLD: how far a cut moves the scene signal, how far a pan does.

Makes synthetic videos from a labelled photo folder (`retrieval.synthetic_video`, a draw of its
own, seed 5, apart from `retrieval.evaluate_video`'s seed 0), decodes every frame, and prints
percentiles of the frame-to-frame distance at the cuts and everywhere else, for the YUV
histogram `retrieval.video` uses and for 32x32 luma thumbnails (mean absolute difference), plus
how far each shot drifts from its first frame. Also times sampling a 10 s 640x480 30 fps video.
docs/quality.md (Video) records a run on Corel-1k.

  .venv/bin/python bench/video_scenes.py ../shared/datasets/corel1k_wang
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval import video  # noqa: E402
from retrieval.folders import open_rgb, read_labelled_folder  # noqa: E402
from retrieval.synthetic_video import ken_burns, make_video_set, plan_videos  # noqa: E402


def luma_thumbnail(frame: av.VideoFrame, side: int = 32) -> np.ndarray:
    luma = np.asarray(frame.to_ndarray(format="gray"), dtype=np.float32)
    bh, bw = luma.shape[0] // side, luma.shape[1] // side
    return luma[: bh * side, : bw * side].reshape(side, bh, side, bw).mean(axis=(1, 3))


def percentiles(values: list[float]) -> str:
    return " ".join(f"{q}%:{v:.3f}" for q, v in zip((0, 5, 50, 95, 100), np.percentile(values, [0, 5, 50, 95, 100]),
                                                     strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--videos-per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    folder = read_labelled_folder(args.folder)
    signals: dict[str, dict[str, list[float]]] = {
        name: {"cut": [], "other": [], "drift": []} for name in ("histogram", "thumbnail")
    }
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_videos(folder.labels, videos_per_class=args.videos_per_class, seed=args.seed)
        videos = make_video_set(folder.paths, plan, Path(scratch), seed=args.seed)
        for item in videos:
            with av.open(str(item.path)) as container:
                frames = list(container.decode(video=0))
            stamps = [float(f.pts * f.time_base) for f in frames]
            cuts = {round(cut * 1000) for cut in item.cuts}
            features = {
                "histogram": ([video.frame_histogram(f) for f in frames], video.scene_difference),
                "thumbnail": ([luma_thumbnail(f) for f in frames], lambda a, b: float(np.abs(a - b).mean() / 255)),
            }
            for name, (values, distance) in features.items():
                for i in range(1, len(frames)):
                    kind = "cut" if round(stamps[i] * 1000) in cuts else "other"
                    signals[name][kind].append(distance(values[i], values[i - 1]))
                for shot in item.shots:
                    inside = [i for i, t in enumerate(stamps) if shot.start - 1e-6 <= t < shot.end - 1e-6]
                    signals[name]["drift"].append(max(distance(values[i], values[inside[0]]) for i in inside))
        print(f"{len(videos)} videos, {len(signals['histogram']['cut'])} cuts")
        for name, kinds in signals.items():
            for kind, values in kinds.items():
                print(f"{name:9} {kind:5} {percentiles(values)}")
        clip = Path(scratch) / "ten-seconds.mp4"
        frames = ken_burns(open_rgb(folder.paths[0]), frames=300, size=(640, 480), rng=np.random.default_rng(0))
        video.write_mp4(frames, clip, fps=30)
        scene = video.DEFAULT_SCENE_THRESHOLD
        for every, threshold in ((1.0, None), (None, scene), (1.0, scene)):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                kept = video.sample_frames(clip, every_seconds=every, scene_threshold=threshold)
                best = min(best, time.perf_counter() - started)
            print(f"sample 10 s 640x480 30 fps, every={every} scene={threshold}: {len(kept)} frames, {best:.2f} s")
        started = time.perf_counter()
        video.probe(clip)
        print(f"probe the same: {time.perf_counter() - started:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
