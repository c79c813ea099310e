"""Labelled image folders (one sub-folder per class) and splits of them by image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval import imaging

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class LabelledFolder:
    """Image paths with the index of their class; classes are the sorted sub-folder names."""

    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]

    def subset(self, indices: np.ndarray) -> LabelledFolder:
        """Return the images at `indices`, keeping every class name."""
        return LabelledFolder(self.root, [self.paths[i] for i in indices], self.labels[indices], self.classes)


def read_labelled_folder(root: Path) -> LabelledFolder:
    """List the images of a folder with one sub-folder per class, in a stable order.

    Args:
        root: the folder; files directly inside it are ignored.

    Returns:
        The images, sorted by class then file name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"expected a folder with one sub-folder per class at {root}")
    classes = sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths.extend(files)
        labels.extend([label] * len(files))
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    if len(classes) < 2 or (counts < 2).any():
        raise ValueError(f"expected at least 2 class folders with at least 2 images each in {root}, got {counts}")
    return LabelledFolder(root, paths, np.asarray(labels, dtype=np.int64), classes)


def list_images(root: Path) -> list[Path]:
    """Return every image file under `root`, in any sub-folder, sorted: a folder with no labels.

    Args:
        root: the folder.

    Returns:
        The paths; hidden files and folders are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"expected a folder of images at {root}")
    return sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def open_rgb(path: Path) -> Image.Image:
    """Read an image file as the web app does: validated, EXIF-upright RGB."""
    return imaging.load_image(Path(path).read_bytes())


def stratified_folds(labels: np.ndarray, *, k: int, seed: int) -> list[np.ndarray]:
    """Split image indices into `k` disjoint folds, each class spread evenly over them.

    Args:
        labels: the class index of every image.
        k: the number of folds; every class needs at least `k` images.
        seed: the shuffle seed, so that a split can be repeated.

    Returns:
        `k` sorted index arrays that together hold every index once.
    """
    if k < 2:
        raise ValueError(f"expected k to be at least 2, got {k}")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < k:
            raise ValueError(f"class {label} has {len(members)} images, fewer than the {k} folds")
        for position, index in enumerate(members):
            folds[(position + offset) % k].append(int(index))
        offset += len(members)
    return [np.sort(np.asarray(fold, dtype=np.int64)) for fold in folds]
