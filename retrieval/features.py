"""Pooled CNN features of image files, cached on disk by (file hash, backbone, preprocessing)."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retrieval.backbones import BackboneSpec
from retrieval.extraction import EmbeddingConfig, Extractor, l2_normalize
from retrieval.folders import open_rgb
from retrieval.pooling import POOLINGS, combine_scales

logger = logging.getLogger(__name__)

#: Images per forward pass: 16 landscape images at 224 use about 0.5 GB on the CPU and keep
#: both cores busy; larger batches are no faster there.
BATCH_SIZE = 16


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes, the cache's notion of "the same image"."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class FeatureCache:
    """One .npz per (backbone key, resize mode, input size, file digest), holding every pooling."""

    root: Path
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)

    def path(self, spec: BackboneSpec, *, resize: str, size: int, digest: str) -> Path:
        safe_key = re.sub(r"[^A-Za-z0-9_.@-]+", "_", spec.key)
        return Path(self.root) / safe_key / f"{resize}-{size}" / digest[:2] / f"{digest}.npz"

    def get(self, spec: BackboneSpec, *, resize: str, size: int, digest: str) -> dict[str, np.ndarray] | None:
        path = self.path(spec, resize=resize, size=size, digest=digest)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as stored:
            found = {name: stored[name] for name in stored.files}
        return found if set(POOLINGS) <= set(found) else None

    def put(
        self, spec: BackboneSpec, *, resize: str, size: int, digest: str, pooled: dict[str, np.ndarray]
    ) -> None:
        path = self.path(spec, resize=resize, size=size, digest=digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **pooled)  # type: ignore[arg-type]
        partial.replace(path)  # a reader never sees half a file


@dataclass
class FolderFeatures:
    """Computes, caches and combines features for a fixed list of image files."""

    paths: Sequence[Path]
    spec: BackboneSpec
    cache: FeatureCache | None
    extractor: Callable[[], Extractor]
    progress: bool = True
    embed_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.digests = [file_digest(path) for path in self.paths]

    def pooled(self, *, resize: str, size: int) -> dict[str, np.ndarray]:
        """Return raw descriptors for every pooling, embedding only the files not cached yet."""
        rows: list[dict[str, np.ndarray] | None] = [
            self.cache.get(self.spec, resize=resize, size=size, digest=d) if self.cache else None
            for d in self.digests
        ]
        missing = [i for i, row in enumerate(rows) if row is None]
        if self.cache is not None:
            self.cache.hits += len(rows) - len(missing)
            self.cache.misses += len(missing)
        if missing:
            started = time.perf_counter()
            extractor = self.extractor()
            label = f"{self.spec.name} {resize} {size}px"
            with tqdm(total=len(missing), desc=label, unit="img", disable=not self.progress) as bar:
                for start in range(0, len(missing), BATCH_SIZE):
                    chunk = missing[start : start + BATCH_SIZE]
                    result = extractor.pooled([open_rgb(self.paths[i]) for i in chunk], size=size, resize=resize)
                    for offset, index in enumerate(chunk):
                        row = {name: values[offset] for name, values in result.by_pooling.items()}
                        rows[index] = row
                        if self.cache is not None:
                            self.cache.put(self.spec, resize=resize, size=size, digest=self.digests[index], pooled=row)
                    bar.update(len(chunk))
            self.embed_seconds += time.perf_counter() - started
        return {name: np.stack([row[name] for row in rows if row is not None]) for name in POOLINGS}

    def vectors(self, config: EmbeddingConfig) -> np.ndarray:
        """Return unit-length vectors for every file, made as `config` says."""
        per_scale = [self.pooled(resize=config.resize, size=size)[config.pooling] for size in config.scales]
        return l2_normalize(combine_scales(per_scale))
