"""Calibrate NEAR_DUPLICATE_DISTANCE: how far copies of a photo move, how close distinct photos get.

Embeds every image of a folder with the default recipe's backbone (EfficientNet-Lite0), then a
sample of them after each kind of copy (JPEG re-encode, centre crop, resize, a "light copy"), and
prints the cosine distance of each copy to its original next to how many pairs of distinct
photos fall under each candidate threshold. docs/search.md records a run on Corel-1k.

  .venv/bin/python bench/near_duplicates.py ../shared/datasets/corel1k_wang
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (0.10, 0.12, 0.15, 0.20)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def _crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "JPEG quality 40": lambda im: _jpeg(im, 40),
    "90% centre crop": lambda im: _crop(im, 0.9),
    "50% size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "light copy (2.5% crop, 75% size, JPEG 60)": lambda im: _jpeg(
        _crop(im, 0.95).resize((im.width * 3 // 4, im.height * 3 // 4)), 60
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sample", type=int, default=200, help="originals to copy")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from retrieval.backbones import get_backbone
    from retrieval.extraction import Extractor

    paths = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    extractor = Extractor(get_backbone("efficientnet_lite0"), device="cpu")

    def embed(images: list[Image.Image]) -> np.ndarray:
        return np.concatenate([extractor.embed(images[i:i + 32]).vectors for i in range(0, len(images), 32)])

    vectors = embed([Image.open(p).convert("RGB") for p in paths])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1.0)
    distance = 1.0 - similarity
    nearest = distance.min(axis=1)
    pairs = len(paths) * (len(paths) - 1) // 2
    print(f"{len(paths)} photos; nearest other photo: p1 {np.percentile(nearest, 1):.3f}, "
          f"p5 {np.percentile(nearest, 5):.3f}, p50 {np.median(nearest):.3f}")
    for threshold in THRESHOLDS:
        print(f"  under {threshold}: {int((distance < threshold).sum() // 2)} of {pairs} distinct pairs; "
              f"{(nearest < threshold).mean():.1%} of photos have one")

    sample = random.Random(1).sample(paths, min(args.sample, len(paths)))
    originals = [Image.open(p).convert("RGB") for p in sample]
    base = embed(originals)
    print(f"\ncopies of {len(sample)} photos: distance to the original, and the share under each threshold")
    for name, make in COPIES.items():
        moved = 1.0 - np.sum(base * embed([make(image) for image in originals]), axis=1)
        shares = ", ".join(f"{threshold}: {(moved < threshold).mean():.0%}" for threshold in THRESHOLDS)
        print(f"  {name}: p50 {np.median(moved):.3f}, p95 {np.percentile(moved, 95):.3f}; {shares}")


if __name__ == "__main__":
    main()
