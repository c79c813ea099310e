"""The founding document's small CNN (two conv, two max-pool, one dense layer) as a backbone."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import nn

from retrieval.backbones import BackboneSpec, FeatureModel, register_backbone

#: 64 px squares: enough for colour and coarse shape, which is all two conv layers can use,
#: and an epoch over 800 images takes seconds on two CPU cores.
INPUT_SIZE = 64
CHANNELS = (32, 64)
KERNEL = 5
#: Dropout on the flattened features before the one dense layer; 800 images do not constrain
#: 16k x classes weights without it.
DROPOUT = 0.5


class SmallCNN(nn.Module):
    """conv5x5-ReLU-maxpool2, conv5x5-ReLU-maxpool2, flatten, (dropout), dense -> class logits."""

    def __init__(self, num_classes: int, *, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if input_size % 4:
            raise ValueError(f"expected input_size to be a multiple of 4, got {input_size}")
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, CHANNELS[0], KERNEL, padding=KERNEL // 2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(CHANNELS[0], CHANNELS[1], KERNEL, padding=KERNEL // 2)
        self.pool2 = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(DROPOUT)
        self.classifier = nn.Linear(feature_dim(input_size), num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool2(torch.relu(self.conv2(self.pool1(torch.relu(self.conv1(x))))))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Return the flattened map the dense layer reads: the features used for retrieval."""
        return torch.flatten(self.feature_map(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.penultimate(x)))


def feature_dim(input_size: int) -> int:
    return CHANNELS[1] * (input_size // 4) ** 2


def _features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.penultimate(x)  # type: ignore[operator]


def _head(trunk: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return trunk.classifier(pooled)  # type: ignore[operator]


def _feature_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.feature_map(x)  # type: ignore[operator]


def _pooled_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.feature_map(x).mean(dim=(2, 3))  # type: ignore[operator]


def _build(num_classes: int, input_size: int, pooled: bool = False) -> FeatureModel:
    if pooled:
        return FeatureModel(SmallCNN(num_classes, input_size=input_size), _pooled_features, None, _feature_map)
    return FeatureModel(SmallCNN(num_classes, input_size=input_size), _features, _head, _feature_map)


def save_checkpoint(
    model: SmallCNN,
    path: Path,
    *,
    classes: list[str],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    epoch: int,
) -> Path:
    """Write weights and everything needed to preprocess for them (`small_cnn_backbone` reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "architecture": "small_cnn",
        "classes": list(classes),
        "input_size": model.input_size,
        "mean": list(mean),
        "std": list(std),
        "epoch": epoch,
    }
    partial = path.with_suffix(".partial")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, partial)
    partial.replace(path)
    return path


def small_cnn_backbone(path: Path, *, name: str | None = None, pooled: bool = False) -> BackboneSpec:
    """Return a backbone spec for a small-CNN checkpoint written by `python -m retrieval.train`.

    Args:
        path: the checkpoint file.
        name: the registry name; default "small_cnn:<file stem>".
        pooled: describe images by the global average of the last feature map (one value per
            channel) instead of the flattened map the dense layer reads: small enough for a
            vector index, and no classifier output.

    Returns:
        A spec whose version is the checkpoint's content hash, so retrained weights get a new key.
    """
    path = Path(path).resolve()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    if meta.get("architecture") != "small_cnn":
        raise ValueError(f"{path}: expected a small_cnn checkpoint written by retrieval.train")
    size = int(meta["input_size"])
    return BackboneSpec(
        name=name or f"small_cnn:{path.stem}",
        version=hashlib.sha256(path.read_bytes()).hexdigest()[:12] + ("-gap" if pooled else ""),
        build=functools.partial(_build, len(meta["classes"]), size, pooled),
        weights=lambda: path,
        embedding_dim=CHANNELS[1] if pooled else feature_dim(size),
        input_size=size,
        mean=tuple(meta["mean"]),  # type: ignore[arg-type]
        std=tuple(meta["std"]),  # type: ignore[arg-type]
        resize="center_crop",  # the dense layer needs a fixed input size
        notes=f"small CNN trained on {len(meta['classes'])} classes ({', '.join(meta['classes'])}).",
    )


def register_small_cnn(path: Path, *, name: str | None = None, pooled: bool = False) -> BackboneSpec:
    """Register a small-CNN checkpoint so that `get_backbone(name)` and `Extractor` use it."""
    return register_backbone(small_cnn_backbone(path, name=name, pooled=pooled))
