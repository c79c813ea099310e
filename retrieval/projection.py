"""Projections applied after L2 normalisation: PCA-whitening (no labels) and learned heads.

A projection is data: arrays and a few fields, saved to one .npz file and applied with
numpy alone, so the web app can store it with a model version and use it without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.extraction import l2_normalize

FORMAT_VERSION = 1
KINDS = ("pca_whitening", "linear", "mlp")


@dataclass(frozen=True)
class Projection:
    """y = normalise(f(x - mean)), f linear or a one-hidden-layer ReLU MLP.

    `source_key` is the embedding-config key of the vectors it was fitted on; applying it to
    vectors made any other way gives meaningless results, so callers should check it.
    """

    kind: str
    source_key: str
    mean: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; expected one of: {', '.join(KINDS)}")
        if len(self.weights) != len(self.biases) or len(self.weights) != (2 if self.kind == "mlp" else 1):
            raise ValueError(f"a {self.kind} projection has the wrong number of layers: {len(self.weights)}")

    @property
    def input_dim(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.weights[-1].shape[1])

    @property
    def identifier(self) -> str:
        """Return a stable id, e.g. "pca_whitening-1280x1280-3f2a9c01b7de": kind, shape, content hash."""
        digest = hashlib.sha256()
        digest.update(self.source_key.encode())
        for array in (self.mean, *self.weights, *self.biases):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return f"{self.kind}-{self.input_dim}x{self.output_dim}-{digest.hexdigest()[:12]}"

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Project (n, d) unit vectors and return (n, output_dim) float32 unit vectors.

        Args:
            vectors: rows made with the embedding config named by `source_key`.

        Returns:
            The projected rows, L2-normalised.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(f"expected vectors of shape (n, {self.input_dim}), got {vectors.shape}")
        out = vectors - self.mean
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            out = out @ weight + bias
            if layer < len(self.weights) - 1:
                out = np.maximum(out, 0.0)
        return l2_normalize(out)

    def save(self, path: Path) -> Path:
        """Write the projection to one .npz file (no pickle) and return its path."""
        meta = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "source_key": self.source_key,
            "identifier": self.identifier,
            "notes": self.notes,
        }
        arrays = {"mean": self.mean}
        arrays.update({f"weight{i}": w for i, w in enumerate(self.weights)})
        arrays.update({f"bias{i}": b for i, b in enumerate(self.biases)})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **{k: v.astype(np.float32) for k, v in arrays.items()})  # type: ignore[arg-type]
        return path


def load_projection(path: Path) -> Projection:
    """Read a projection written by `Projection.save`, checking its identifier.

    Args:
        path: the .npz file.

    Returns:
        The projection; `ValueError` when the file is of another format or was altered.
    """
    with np.load(Path(path), allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: expected projection format {FORMAT_VERSION}, got {meta.get('format')}")
        layers = 2 if meta["kind"] == "mlp" else 1
        projection = Projection(
            kind=meta["kind"],
            source_key=meta["source_key"],
            mean=stored["mean"],
            weights=tuple(stored[f"weight{i}"] for i in range(layers)),
            biases=tuple(stored[f"bias{i}"] for i in range(layers)),
            notes=meta.get("notes", ""),
        )
    if projection.identifier != meta["identifier"]:
        raise ValueError(f"{path}: contents do not match the identifier {meta['identifier']}")
    return projection


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Return the Ledoit-Wolf (2004) weight of the identity target for centred data (n, d).

    This is the shrinkage that minimises the expected error of the covariance estimate, computed
    from the data alone: near 0 when samples are plentiful, towards 1 when d is large next to n.
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    covariance = x.T @ x / n
    mu = np.trace(covariance) / d
    delta = np.sum((covariance - mu * np.eye(d)) ** 2) / d
    x2 = x**2
    beta = np.sum(x2.T @ x2 / n - covariance**2) / (d * n)
    if delta <= 0:
        return 1.0
    return float(min(beta, delta) / delta)


def fit_pca_whitening(
    vectors: np.ndarray, *, source_key: str, shrinkage: float | None = None, dim: int | None = None
) -> Projection:
    """Learn PCA-whitening from unlabelled unit vectors, the covariance shrunk towards a multiple of I.

    Whitening divides each principal direction by its standard deviation, which boosts rare
    directions (bursty, frequent visual patterns stop dominating the dot product); shrinkage keeps
    directions that the data barely constrain (d can exceed n) from being blown up.

    Args:
        vectors: (n, d) unit vectors, e.g. every image of the collection.
        source_key: the embedding-config key the vectors were made with.
        shrinkage: weight of the identity target in [0, 1]; None estimates it (Ledoit-Wolf).
        dim: keep the first `dim` principal directions; None keeps all d.

    Returns:
        A "pca_whitening" projection.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected at least 2 rows of shape (n, d), got {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    weight = ledoit_wolf_shrinkage(centred) if shrinkage is None else float(shrinkage)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"expected shrinkage in [0, 1], got {weight}")
    covariance = centred.T @ centred / x.shape[0]
    d = covariance.shape[0]
    covariance = (1.0 - weight) * covariance + weight * (np.trace(covariance) / d) * np.eye(d)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][: dim or d]
    floor = np.finfo(np.float64).eps * max(float(eigenvalues.max()), 1.0)
    weight_matrix = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], floor))
    return Projection(
        kind="pca_whitening",
        source_key=source_key,
        mean=mean.astype(np.float32),
        weights=(weight_matrix.astype(np.float32),),
        biases=(np.zeros(len(order), dtype=np.float32),),
        notes=f"shrinkage={weight:.4f}; fitted on {x.shape[0]} vectors",
    )
