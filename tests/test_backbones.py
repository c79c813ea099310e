"""The backbone registry: every registered backbone honours the same contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.backbones import BackboneSpec, available_backbones, get_backbone
from retrieval.errors import UnknownBackbone, WeightsNotFound
from retrieval.extraction import Extractor, l2_normalize
from retrieval.preprocessing import to_tensor


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_gives_finite_unit_vectors_of_its_dimension(name: str) -> None:
    assert_backbone_contract(get_backbone(name))


def assert_backbone_contract(spec: BackboneSpec) -> None:
    """Check what every backbone promises (also run on the trained ones: tests/test_gan.py)."""
    model = spec.build().eval()  # random weights: the contract, not the quality
    images = [Image.new("RGB", (320, 240), (200, 30, 30)), Image.new("RGB", (240, 320), (20, 90, 200))]
    with torch.inference_mode():
        for image in images:
            features, logits = model(to_tensor(spec, image)[None])
            vectors = l2_normalize(features.numpy())
            assert vectors.shape == (1, spec.embedding_dim)
            assert np.isfinite(vectors).all()
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            if spec.imagenet_head:
                assert logits is not None and logits.shape == (1, 1000)


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownBackbone) as excinfo:
        get_backbone("alexnet-9000")
    message = str(excinfo.value)
    for name in available_backbones():
        assert name in message


def test_absent_weights_fail_with_the_path_looked_for(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsNotFound) as excinfo:
        Extractor(get_backbone("resnet50"), device="cpu")
    assert str(tmp_path / "checkpoints" / "resnet50-11ad3fa6.pth") in str(excinfo.value)


def test_preprocessing_keeps_the_aspect_and_bounds_banners() -> None:
    spec = get_backbone("efficientnet_lite0")
    assert tuple(to_tensor(spec, Image.new("RGB", (640, 480))).shape) == (3, 224, 299)
    assert tuple(to_tensor(spec, Image.new("RGB", (1, 5000))).shape) == (3, 672, 224)


def test_l2_normalize_rejects_wrong_rank_and_keeps_zero_rows() -> None:
    with pytest.raises(ValueError, match="expected ndim to be 2"):
        l2_normalize(np.ones(3))
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
