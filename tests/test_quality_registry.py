"""Any torchvision or timm architecture by name, weights only from local files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.backbones import get_backbone
from retrieval.errors import UnknownBackbone, WeightsNotFound
from retrieval.extraction import Extractor


@pytest.mark.parametrize(
    ("name", "filename"),
    [("torchvision:resnet18", "resnet18-f37072fd.pth"), ("timm:resnet18", "resnet18_a1_0-d63eafa0.pth")],
)
def test_an_architecture_without_its_weights_file_names_the_file(
    name: str, filename: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    spec = get_backbone(name)
    assert spec.embedding_dim == 512
    with pytest.raises(WeightsNotFound) as excinfo:
        Extractor(spec, device="cpu")
    assert str(tmp_path / "checkpoints" / filename) in str(excinfo.value)


def test_an_architecture_whose_weights_are_in_the_cache_embeds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    spec = get_backbone("torchvision:mobilenet_v3_small")
    trained = spec.build().trunk  # stands in for downloaded weights: any state dict of the right shape
    path = spec.weights()
    path.parent.mkdir(parents=True)
    torch.save(trained.state_dict(), path)
    from PIL import Image

    result = Extractor(spec, device="cpu").embed([Image.new("RGB", (200, 150), (10, 200, 90))])
    assert result.vectors.shape == (1, spec.embedding_dim)
    assert result.logits is not None and result.logits.shape == (1, 1000)


def test_an_unknown_architecture_is_reported_as_such() -> None:
    with pytest.raises(UnknownBackbone, match="unknown torchvision architecture 'resnet9000'"):
        get_backbone("torchvision:resnet9000")
    with pytest.raises(UnknownBackbone, match="torchvision:ARCH / timm:ARCH"):
        get_backbone("caffe:alexnet")
