"""Embed images with a backbone: load once, batch by shape, L2-normalise in one place."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from retrieval.backbones import BackboneSpec, FeatureModel
from retrieval.preprocessing import to_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    """Unit-length float32 vectors, one row per image, and ImageNet logits where available."""

    vectors: np.ndarray
    logits: np.ndarray | None


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Return `vectors` (n, d) scaled to unit length as float32; zero rows stay zero.

    Args:
        vectors: a 2-d array of feature rows.

    Returns:
        A float32 array of the same shape.
    """
    if vectors.ndim != 2:
        raise ValueError(f"expected ndim to be 2, got {vectors.ndim}")
    vectors = vectors.astype(np.float32, copy=False)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def resolve_device(name: str) -> torch.device:
    """Map "auto", "cpu", "cuda" or "cuda:N" to a torch device; "auto" prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


class Extractor:
    """A backbone loaded once, on one device, that embeds batches of PIL images."""

    def __init__(self, spec: BackboneSpec, *, device: str = "auto") -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.model: FeatureModel = spec.load().to(self.device)
        logger.info("loaded backbone %s on %s", spec.key, self.device)

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        """Embed RGB images; images whose tensors share a shape run as one batch.

        Args:
            images: upright RGB images of any size.

        Returns:
            `Embeddings` with rows in the order of `images`.
        """
        tensors = [to_tensor(self.spec, image) for image in images]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, tensor in enumerate(tensors):
            by_shape[tuple(tensor.shape)].append(index)
        features = np.zeros((len(tensors), self.spec.embedding_dim), dtype=np.float32)
        logits: np.ndarray | None = None
        with torch.inference_mode():
            for indices in by_shape.values():
                batch = torch.stack([tensors[i] for i in indices]).to(self.device)
                pooled, batch_logits = self.model(batch)
                features[indices] = pooled.float().cpu().numpy()
                if batch_logits is not None:
                    if logits is None:
                        logits = np.zeros((len(tensors), batch_logits.shape[1]), dtype=np.float32)
                    logits[indices] = batch_logits.float().cpu().numpy()
        return Embeddings(vectors=l2_normalize(features), logits=logits)


def imagenet_labels(logits: np.ndarray, *, top: int = 5) -> list[list[tuple[str, float]]]:
    """Return the `top` ImageNet (description, probability) pairs for each row of logits."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    result = []
    for row in probs:
        best = np.argsort(row)[::-1][:top]
        result.append([(info.index_to_description(int(i)), float(row[i])) for i in best])
    return result
