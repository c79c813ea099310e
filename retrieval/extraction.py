"""Embed images with a backbone: load once, batch by shape, L2-normalise in one place."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval import onnx_runtime
from retrieval.backbones import BackboneSpec, FeatureModel
from retrieval.onnx_runtime import OnnxModel
from retrieval.pooling import POOLINGS, combine_scales
from retrieval.preprocessing import RESIZE_MODES, normalise_batch, to_pixels, to_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    """Unit-length float32 vectors, one row per image, and ImageNet logits where available."""

    vectors: np.ndarray
    logits: np.ndarray | None


@dataclass(frozen=True)
class EmbeddingConfig:
    """How a backbone turns an image into one vector: resize mode, pooling, input sizes.

    `EmbeddingConfig.for_backbone(spec)` is the spec's own recipe (what `Extractor.embed`
    does without a config); anything else is stored under a longer `key(spec)`.
    """

    resize: str = "short_side"
    pooling: str = "gap"
    scales: tuple[int, ...] = (224,)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; expected one of: {', '.join(RESIZE_MODES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of: {', '.join(POOLINGS)}")
        if not self.scales or any(size < 16 for size in self.scales):
            raise ValueError(f"expected one or more input sizes of at least 16 pixels, got {self.scales}")

    @classmethod
    def for_backbone(
        cls,
        spec: BackboneSpec,
        *,
        resize: str | None = None,
        pooling: str = "gap",
        scales: tuple[int, ...] | None = None,
    ) -> EmbeddingConfig:
        """Return the spec's own recipe, with the given fields replaced.

        Args:
            spec: the backbone.
            resize: "short_side" (whole image, aspect kept) or "center_crop"; default the spec's.
            pooling: "gap" (global average) or "gem" (generalised mean, p=3).
            scales: input sizes (short side) whose descriptors are averaged; default the spec's one.

        Returns:
            The configuration.
        """
        return cls(
            resize=spec.resize if resize is None else resize,
            pooling=pooling,
            scales=(spec.input_size,) if scales is None else tuple(scales),
        )

    def key(self, spec: BackboneSpec) -> str:
        """Return the identifier to store with vectors made this way; the spec's key for its own recipe."""
        if self == EmbeddingConfig.for_backbone(spec):
            return spec.key
        return f"{spec.key}/{self.resize}/{self.pooling}/{'+'.join(str(size) for size in self.scales)}"


@dataclass(frozen=True)
class PooledFeatures:
    """Raw (not normalised) float32 descriptors, one array per pooling, and logits if any."""

    by_pooling: dict[str, np.ndarray]
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


#: CUDA autocast precisions; "fp32" runs without autocast.
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    """Map "auto", "cpu", "cuda" or "cuda:N" to a torch device; "auto" prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def _by_shape(inputs: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the inputs of each shape: each group runs as one batch."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, array in enumerate(inputs):
        groups[array.shape].append(index)
    return groups


class Extractor:
    """A backbone loaded once, on one device, that embeds batches of PIL images."""

    def __init__(
        self,
        spec: BackboneSpec,
        *,
        device: str = "auto",
        config: EmbeddingConfig | None = None,
        onnx_cache: Path | None = None,
        amp: str = "fp16",
    ) -> None:
        """Load a backbone once.

        Args:
            spec: the backbone.
            device: "auto", "cpu", "cuda" or "cuda:N".
            config: an embedding recipe other than the spec's own.
            onnx_cache: on the CPU, run the spec's own recipe with ONNX Runtime, exporting the
                model into this folder once (7x faster per image than eager PyTorch here).
            amp: on CUDA, the autocast precision: "fp16" (the default), "bf16" or "fp32" (none).
        """
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp {amp!r}; expected one of: {', '.join(AMP_DTYPES)}")
        self.amp = amp
        self.spec = spec
        self.config = config
        self.device = resolve_device(device)
        self.model: FeatureModel = spec.load().to(self.device)
        self.cuda = self.device.type == "cuda"
        self.onnx: OnnxModel | None = None
        if onnx_cache is not None and config is None and not self.cuda:
            self.onnx = onnx_runtime.load(spec, self.model, onnx_cache)
        self.runtime = "onnxruntime" if self.onnx is not None else "torch"
        if self.cuda:
            # Tensor cores want NHWC; convolutions in channels_last skip a layout change per layer.
            self.model = self.model.to(memory_format=torch.channels_last)
        logger.info("loaded backbone %s on %s", spec.key, self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        """Autocast on CUDA in `amp`'s precision (outputs are cast back to float32); nothing on the CPU."""
        dtype = AMP_DTYPES[self.amp]
        if self.cuda and dtype is not None:
            return torch.autocast(device_type="cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _inputs(self, images: Sequence[Image.Image], *, size: int | None = None,
                resize: str | None = None) -> list[np.ndarray]:
        """Per image: 8-bit HWC pixels on CUDA (normalised there), else the normalised float32 CHW array."""
        if self.cuda:
            return [to_pixels(self.spec, image, size=size, resize=resize) for image in images]
        return [to_tensor(self.spec, image, size=size, resize=resize).numpy() for image in images]

    def _batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        """Stack same-shaped inputs into the model's input on this extractor's device."""
        batch = torch.from_numpy(np.stack(inputs))
        if not self.cuda:
            return batch
        # Pinned host memory lets the copy run asynchronously with the previous batch's kernels;
        # 8-bit pixels are a quarter of float32's bytes, and the GPU normalises them.
        return normalise_batch(self.spec, batch.pin_memory().to(self.device, non_blocking=True))

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        """Embed RGB images; images whose tensors share a shape run as one batch.

        Args:
            images: upright RGB images of any size.

        Returns:
            `Embeddings` with rows in the order of `images`; with a config, the pooling and
            scales it names, and logits from the average pooling at the first scale.
        """
        if self.config is not None:
            return self._embed_with_config(images, self.config)
        inputs = self._inputs(images)
        by_shape = _by_shape(inputs)
        features = np.zeros((len(inputs), self.spec.embedding_dim), dtype=np.float32)
        logits: np.ndarray | None = None
        with torch.inference_mode(), self._autocast():
            for indices in by_shape.values():
                if self.onnx is not None:
                    # numpy, not torch.stack: torch's OpenMP threads spin after each op and, beside
                    # ORT's threads and the decode threads, burned 4.6 ms of CPU per image on 2 cores.
                    onnx_features, onnx_logits = self.onnx(np.stack([inputs[i] for i in indices]))
                    features[indices] = onnx_features
                    if onnx_logits is not None:
                        if logits is None:
                            logits = np.zeros((len(inputs), onnx_logits.shape[1]), dtype=np.float32)
                        logits[indices] = onnx_logits
                    continue
                pooled, batch_logits = self.model(self._batch([inputs[i] for i in indices]))
                features[indices] = pooled.float().cpu().numpy()
                if batch_logits is not None:
                    if logits is None:
                        logits = np.zeros((len(inputs), batch_logits.shape[1]), dtype=np.float32)
                    logits[indices] = batch_logits.float().cpu().numpy()
        return Embeddings(vectors=l2_normalize(features), logits=logits)


    def _embed_with_config(self, images: Sequence[Image.Image], config: EmbeddingConfig) -> Embeddings:
        per_scale = []
        logits = None
        for index, size in enumerate(config.scales):
            pooled = self.pooled(images, size=size, resize=config.resize, with_logits=index == 0)
            per_scale.append(pooled.by_pooling[config.pooling])
            logits = pooled.logits if index == 0 else logits
        return Embeddings(vectors=l2_normalize(combine_scales(per_scale)), logits=logits)

    def pooled(
        self, images: Sequence[Image.Image], *, size: int, resize: str, with_logits: bool = False
    ) -> PooledFeatures:
        """Return every pooling of the feature map, raw, for images resized to one input size.

        Args:
            images: upright RGB images of any size.
            size: the input size (short side, or square side for "center_crop").
            resize: "short_side" or "center_crop".
            with_logits: also run the classifier on the average-pooled features.

        Returns:
            One (n, C) float32 array per pooling in `retrieval.pooling.POOLINGS`, rows in input order.
        """
        inputs = self._inputs(images, size=size, resize=resize)
        by_shape = _by_shape(inputs)
        out: dict[str, np.ndarray] = {}
        logits: np.ndarray | None = None
        with torch.inference_mode(), self._autocast():
            for indices in by_shape.values():
                fmap = self.model.feature_map(self._batch([inputs[i] for i in indices])).float()
                for name, pool in POOLINGS.items():
                    pooled = pool(fmap).cpu().numpy()
                    out.setdefault(name, np.zeros((len(inputs), pooled.shape[1]), dtype=np.float32))[indices] = pooled
                if with_logits:
                    batch_logits = self.model.head(POOLINGS["gap"](fmap))
                    if batch_logits is not None:
                        if logits is None:
                            logits = np.zeros((len(inputs), batch_logits.shape[1]), dtype=np.float32)
                        logits[indices] = batch_logits.float().cpu().numpy()
        return PooledFeatures(by_pooling=out, logits=logits)


@functools.cache
def _imagenet_info() -> Any:
    # Parsing timm's class-name files takes 30 ms: once per process, not once per image.
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def imagenet_labels(logits: np.ndarray, *, top: int = 5) -> list[list[tuple[str, float]]]:
    """Return the `top` ImageNet (description, probability) pairs for each row of logits."""
    info = _imagenet_info()
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    result = []
    for row in probs:
        best = np.argsort(row)[::-1][:top]
        result.append([(info.index_to_description(int(i)), float(row[i])) for i in best])
    return result
