"""Labelled videos made from still photos: Ken Burns pans and zooms, cuts, noise, lossy H.264.

Each video shows two or three photos of one class, one shot each, so it has cuts (scene
changes) and known moments: `Shot(start, end, source)` says which photo is on screen when.
Tests make them from scikit-image's bundled photos; `retrieval.evaluate_video` from a labelled
folder (Corel-1k, evaluation only: the videos are written to a temporary folder, never kept).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from retrieval.video.writing import write_mp4

#: Frame size of the synthetic videos: Corel's own 384x256 (3:2), so a shot crops little; sides in
#: multiples of 16 keep libx264's output the same from run to run (`write_mp4`).
DEFAULT_SIZE = (384, 256)
DEFAULT_FPS = 10.0
#: Shot lengths are drawn from this range (seconds), so cuts fall at irregular times.
DEFAULT_SHOT_SECONDS = (3.0, 5.0)
#: Gaussian noise added to every frame (standard deviation, 0-255): sensor noise, which also
#: makes H.264 work for it.
DEFAULT_NOISE = 4.0
#: libx264 quality of the synthetic videos: visibly lossy, as phone uploads re-encoded by a site are.
DEFAULT_CRF = 28


@dataclass(frozen=True)
class Shot:
    """One photo on screen from `start` to `end` seconds; `source` indexes the photos given."""

    start: float
    end: float
    source: int


@dataclass(frozen=True)
class SyntheticVideo:
    """A written video, its class and its shots in time order."""

    path: Path
    label: int
    shots: tuple[Shot, ...]

    @property
    def duration(self) -> float:
        return self.shots[-1].end

    @property
    def cuts(self) -> list[float]:
        """Return the seconds at which a new shot starts (the first shot's start excluded)."""
        return [shot.start for shot in self.shots[1:]]


def _crop_box(width: int, height: int, aspect: float, zoom: float, rng: np.random.Generator) -> np.ndarray:
    """Return a (left, top, right, bottom) box of the given aspect, `zoom` times the largest that fits."""
    box_w = min(float(width), height * aspect) * zoom
    box_h = box_w / aspect
    left = rng.uniform(0, width - box_w)
    top = rng.uniform(0, height - box_h)
    return np.array([left, top, left + box_w, top + box_h])


def ken_burns(
    photo: Image.Image,
    *,
    frames: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    noise: float = DEFAULT_NOISE,
    rng: np.random.Generator,
) -> Iterator[np.ndarray]:
    """Yield `frames` HxWx3 uint8 frames panning and zooming smoothly across a photo.

    The shot starts on a box of 75-100% of the largest crop of the frame's aspect and ends on
    one of 55-85% elsewhere (or the reverse: zooming out), eased in and out.
    """
    photo = photo.convert("RGB")
    aspect = size[0] / size[1]
    first = _crop_box(photo.width, photo.height, aspect, rng.uniform(0.75, 1.0), rng)
    last = _crop_box(photo.width, photo.height, aspect, rng.uniform(0.55, 0.85), rng)
    if rng.random() < 0.5:
        first, last = last, first
    for index in range(frames):
        t = index / max(frames - 1, 1)
        eased = t * t * (3 - 2 * t)
        box = first + (last - first) * eased
        view = photo.transform(size, Image.Transform.EXTENT, tuple(box.tolist()), Image.Resampling.BILINEAR)
        pixels = np.array(view, dtype=np.float32)
        if noise:
            pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(noise)
        yield pixels.clip(0, 255).astype(np.uint8)


def render_video(
    photos: Sequence[Image.Image],
    path: Path,
    *,
    shot_seconds: Sequence[float],
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = DEFAULT_SIZE,
    noise: float = DEFAULT_NOISE,
    crf: int = DEFAULT_CRF,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Write one video, a Ken Burns shot per photo with hard cuts between them, as a lossy MP4.

    Args:
        photos: the photos, in screen order.
        path: the MP4 to write.
        shot_seconds: each shot's length; rounded to whole frames.
        fps: frames per second.
        size: frame (width, height); multiples of 16 for repeatable bytes.
        noise: Gaussian noise standard deviation (0-255).
        crf: libx264 constant rate factor.
        seed: seeds the pans and the noise.

    Returns:
        The (start, end) seconds of each shot.
    """
    if len(photos) != len(shot_seconds):
        raise ValueError(f"expected one shot length per photo, got {len(shot_seconds)} for {len(photos)}")
    rng = np.random.default_rng(seed)
    counts = [max(1, round(seconds * fps)) for seconds in shot_seconds]

    def frames() -> Iterator[np.ndarray]:
        for photo, count in zip(photos, counts, strict=True):
            yield from ken_burns(photo, frames=count, size=size, noise=noise, rng=rng)

    write_mp4(frames(), path, fps=fps, crf=crf)
    bounds = np.concatenate([[0], np.cumsum(counts)]) / fps
    return [(float(bounds[i]), float(bounds[i + 1])) for i in range(len(counts))]


def plan_videos(
    labels: np.ndarray,
    *,
    videos_per_class: int,
    photos_per_video: tuple[int, int] = (2, 3),
    seed: int = 0,
) -> list[tuple[int, list[int]]]:
    """Group photos into videos of one class each, every photo used at most once.

    Args:
        labels: the class of each photo.
        videos_per_class: videos made of each class.
        photos_per_video: the (least, most) photos a video shows; drawn uniformly.
        seed: the draw's seed.

    Returns:
        (label, photo indices) per video, classes in order.
    """
    low, high = photos_per_video
    if not 1 <= low <= high:
        raise ValueError(f"expected 1 <= least <= most photos per video, got {photos_per_video}")
    rng = np.random.default_rng(seed)
    plan = []
    for label in np.unique(labels):
        members = list(rng.permutation(np.flatnonzero(labels == label)))
        counts = rng.integers(low, high + 1, size=videos_per_class)
        if counts.sum() > len(members):
            raise ValueError(f"class {label} has {len(members)} photos, fewer than the {counts.sum()} its videos need")
        for count in counts:
            plan.append((int(label), [int(members.pop()) for _ in range(count)]))
    return plan


def make_video_set(
    photos: Sequence[Image.Image | Path],
    plan: Sequence[tuple[int, Sequence[int]]],
    out_dir: Path,
    *,
    shot_seconds: tuple[float, float] = DEFAULT_SHOT_SECONDS,
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = DEFAULT_SIZE,
    noise: float = DEFAULT_NOISE,
    crf: int = DEFAULT_CRF,
    seed: int = 0,
) -> list[SyntheticVideo]:
    """Render every planned video into `out_dir` (video-000.mp4, ...), deterministically for a seed.

    Args:
        photos: images or image files; a plan's indices refer to them.
        plan: (label, photo indices) per video, e.g. from `plan_videos`.
        out_dir: created if needed.
        shot_seconds: the (shortest, longest) shot; each is drawn uniformly.
        fps, size, noise, crf: as `render_video`.
        seed: seeds shot lengths, pans and noise.

    Returns:
        One `SyntheticVideo` per plan entry, with its shots' times and source photo indices.
    """
    from retrieval.folders import open_rgb

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    videos = []
    for number, (label, sources) in enumerate(plan):
        images = [open_rgb(p) if isinstance(p, Path) else p for p in (photos[i] for i in sources)]
        lengths = rng.uniform(shot_seconds[0], shot_seconds[1], size=len(sources)).tolist()
        path = out_dir / f"video-{number:03d}.mp4"
        bounds = render_video(images, path, shot_seconds=lengths, fps=fps, size=size, noise=noise, crf=crf,
                              seed=seed * 100_003 + number)
        shots = tuple(Shot(start, end, source) for (start, end), source in zip(bounds, sources, strict=True))
        videos.append(SyntheticVideo(path=path, label=label, shots=shots))
    return videos


def jittered_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Return a query made from a photo as a person would have it: cropped, resized, recoloured.

    Keeps 80-95% of each side at a random place, scales to 60-100%, and changes brightness,
    contrast and saturation by up to 15% each.
    """
    photo = photo.convert("RGB")
    keep_w, keep_h = rng.uniform(0.8, 0.95, size=2)
    width, height = round(photo.width * keep_w), round(photo.height * keep_h)
    left = int(rng.integers(0, photo.width - width + 1))
    top = int(rng.integers(0, photo.height - height + 1))
    view = photo.crop((left, top, left + width, top + height))
    scale = rng.uniform(0.6, 1.0)
    view = view.resize((max(16, round(width * scale)), max(16, round(height * scale))), Image.Resampling.BILINEAR)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(rng.uniform(0.85, 1.15))
    return view
