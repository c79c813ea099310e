"""Backbones for any torchvision or timm architecture whose weights file is already on disk."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.backbones import (
    BackboneSpec,
    FeatureModel,
    _timm_feature_map,
    _timm_features,
    _timm_head,
    _torch_cache,
)
from retrieval.errors import UnknownBackbone


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _tv_resnet_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(trunk, name)(x)
    return x


def _tv_resnet_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _gap(_tv_resnet_map(trunk, x))


def _tv_resnet_head(trunk: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return trunk.fc(pooled)  # type: ignore[operator]


def _tv_features_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.features(x)  # type: ignore[operator]


def _tv_features_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _gap(_tv_features_map(trunk, x))


def _tv_classifier_head(trunk: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return trunk.classifier(pooled)  # type: ignore[operator]


def _torchvision_model(arch: str) -> FeatureModel:
    from torchvision import models

    trunk = models.get_model(arch, weights=None)
    if all(hasattr(trunk, name) for name in ("layer4", "fc")):
        return FeatureModel(trunk, _tv_resnet_features, _tv_resnet_head, _tv_resnet_map)
    # EfficientNet, MobileNet v2/v3: features -> global average -> classifier on the flat vector.
    classifier = getattr(trunk, "classifier", None)
    if (
        isinstance(getattr(trunk, "features", None), nn.Module)
        and isinstance(classifier, nn.Sequential)
        and isinstance(classifier[0], nn.Dropout | nn.Linear)
    ):
        return FeatureModel(trunk, _tv_features_features, _tv_classifier_head, _tv_features_map)
    raise UnknownBackbone(
        f"torchvision architecture {arch!r} is not supported: expected a ResNet-like model (layer4, fc) "
        "or one with `features` and a flat `classifier` (EfficientNet, MobileNet)"
    )


def _timm_model(arch: str) -> FeatureModel:
    import timm

    return FeatureModel(timm.create_model(arch, pretrained=False), _timm_features, _timm_head, _timm_feature_map)


def _embedding_dim(build: Callable[[], FeatureModel]) -> int:
    with torch.inference_mode():
        features, _ = build().eval()(torch.zeros(1, 3, 64, 64))
    return int(features.shape[1])


@functools.cache
def architecture_backbone(library: str, arch: str) -> BackboneSpec:
    """Return a spec for a torchvision or timm architecture, weights read from torch's cache.

    Args:
        library: "torchvision" or "timm".
        arch: the architecture name in that library (e.g. "resnet18", "convnext_tiny").

    Returns:
        A spec named "LIBRARY:ARCH"; `load()` raises `WeightsNotFound` naming the file looked for.
    """
    if library == "torchvision":
        from torchvision import models

        try:
            weights = models.get_model_weights(arch).DEFAULT  # type: ignore[attr-defined]
        except (ValueError, KeyError, AttributeError):
            raise UnknownBackbone(
                f"unknown torchvision architecture {arch!r}; expected one of: {', '.join(models.list_models())}"
            ) from None
        build: Callable[[], FeatureModel] = functools.partial(_torchvision_model, arch)
        return BackboneSpec(
            name=f"torchvision:{arch}",
            version=Path(weights.url).stem,
            build=build,
            weights=_torch_cache(Path(weights.url).name),
            embedding_dim=_embedding_dim(build),
            imagenet_head=True,
            notes=f"torchvision {weights} read from torch's cache.",
        )
    if library == "timm":
        import timm

        if arch not in timm.list_models():
            raise UnknownBackbone(f"unknown timm architecture {arch!r}; see timm.list_models()")
        cfg: dict[str, Any] = dict(timm.create_model(arch, pretrained=False).pretrained_cfg)  # type: ignore[arg-type]
        filename = Path(cfg["url"]).name if cfg.get("url") else f"{arch}.safetensors"
        build = functools.partial(_timm_model, arch)
        return BackboneSpec(
            name=f"timm:{arch}",
            version=Path(filename).stem,
            build=build,
            weights=_torch_cache(filename),
            embedding_dim=_embedding_dim(build),
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            imagenet_head=cfg.get("num_classes") == 1000,
            notes=f"timm {arch} ({cfg.get('tag', '')}) read from torch's cache.",
        )
    raise UnknownBackbone(f"unknown library {library!r}; expected torchvision or timm")
