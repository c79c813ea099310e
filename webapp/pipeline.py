"""The configured embedding recipe: backbone, preprocessing, pooling and optional projection.

One `Recipe` per process (the CNN is loaded once); its `key` names the model version whose
vectors are comparable, so changing any part of the recipe starts a new version.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from PIL import Image

from retrieval import onnx_runtime
from retrieval.backbones import BackboneSpec, get_backbone
from retrieval.extraction import EmbeddingConfig, Extractor
from retrieval.projection import Projection, load_projection


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray
    logits: np.ndarray | None


class Recipe:
    """An extractor with its embedding config and projection, loaded once per process."""

    def __init__(
        self, spec: BackboneSpec, config: EmbeddingConfig, projection: Projection | None, device: str,
        onnx_cache: Path | None = None, onnx_precision: str = "fp32",
    ):
        self.spec = spec
        self.config = config
        self.projection = projection
        source_key = config.key(spec)
        if projection is not None and projection.source_key != source_key:
            raise ValueError(
                f"EMBEDDING_PROJECTION was fitted on vectors {projection.source_key!r}, "
                f"but this recipe makes {source_key!r}"
            )
        self.key = source_key if projection is None else f"{source_key}+{projection.identifier}"
        self.dimensions = spec.embedding_dim if projection is None else projection.output_dim
        native = config == EmbeddingConfig.for_backbone(spec)
        self.extractor = Extractor(spec, device=device, config=None if native else config, onnx_cache=onnx_cache)
        if self.extractor.onnx is not None and onnx_precision != "fp32" and onnx_cache is not None:
            # The extractor decided ONNX Runtime applies (CPU, the spec's own recipe); swap in the
            # quantised session, which falls back to fp32 where quantisation is unavailable.
            self.extractor.onnx = onnx_runtime.load(spec, self.extractor.model, onnx_cache, precision=onnx_precision)

    @property
    def runtime(self) -> str:
        """Return what runs the CNN: "torch", "onnxruntime fp32" or "onnxruntime int8"."""
        onnx = self.extractor.onnx
        return "torch" if onnx is None else f"onnxruntime {onnx.precision}"

    @property
    def single_native_scale(self) -> bool:
        """Whether images can be resized for the CNN ahead of time (one scale, the spec's recipe)."""
        return self.config == EmbeddingConfig.for_backbone(self.spec)

    @property
    def min_input_side(self) -> int:
        return max(self.config.scales)

    def embed(self, images: Sequence[Image.Image]) -> Embedded:
        """Embed upright RGB images into unit vectors of this recipe's dimension."""
        result = self.extractor.embed(images)
        vectors = result.vectors if self.projection is None else self.projection.apply(result.vectors)
        return Embedded(vectors=vectors, logits=result.logits)


@functools.cache
def _recipe(
    backbone: str, resize: str, pooling: str, scales: tuple[int, ...], projection: str, device: str, runtime: str,
    precision: str = "fp32",
) -> Recipe:
    spec = _backbone(backbone)
    config = EmbeddingConfig.for_backbone(
        spec, resize=resize or None, pooling=pooling, scales=scales or None
    )
    loaded = load_projection(Path(projection)) if projection else None
    use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_runtime.available())
    onnx_cache = Path(settings.VAR_DIR) / "cache" / "onnx" if use_onnx else None
    return Recipe(spec, config, loaded, device, onnx_cache, onnx_precision=precision)


SMALL_CNN_PREFIX = "small_cnn:"


def _backbone(name: str) -> BackboneSpec:
    """A registry name, torchvision:ARCH / timm:ARCH, or small_cnn:/path/to/small_cnn.pt (trained here)."""
    path = Path(name.removeprefix(SMALL_CNN_PREFIX))
    if name.startswith(SMALL_CNN_PREFIX) and path.suffix == ".pt":
        from retrieval.small_cnn import register_small_cnn

        try:
            return get_backbone(name)
        except KeyError:
            return register_small_cnn(path, name=name, pooled=True)  # 64-d: fits the vector index
    return get_backbone(name)


def recipe() -> Recipe:
    """Return this process's recipe, as the settings describe it."""
    return _recipe(
        settings.EMBEDDING_BACKBONE,
        settings.EMBEDDING_RESIZE,
        settings.EMBEDDING_POOLING,
        tuple(settings.EMBEDDING_SCALES),
        settings.EMBEDDING_PROJECTION,
        settings.EMBEDDING_DEVICE,
        settings.EMBEDDING_RUNTIME,
        settings.ONNX_PRECISION,
    )
