"""Poolings on small feature maps with known answers, and the feature-map contract of every backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.backbones import available_backbones, get_backbone
from retrieval.extraction import EmbeddingConfig
from retrieval.pooling import combine_scales, gap, gem
from retrieval.preprocessing import to_tensor


def _map(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 2)


def test_gem_is_the_generalised_mean_of_each_channel() -> None:
    fmap = _map([1.0, 2.0, 3.0, 4.0])
    assert float(gem(fmap, p=3.0)) == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
    assert float(gem(fmap, p=1.0)) == pytest.approx(float(gap(fmap)))
    assert float(gap(fmap)) == 2.5
    assert float(gem(fmap, p=50.0)) == pytest.approx(4.0, rel=0.03)  # towards the maximum


def test_gem_clamps_negative_activations() -> None:
    assert float(gem(_map([-5.0, 0.0, 0.0, 2.0]), p=1.0, eps=0.0)) == pytest.approx(0.5)


def test_poolings_reject_a_vector() -> None:
    with pytest.raises(ValueError, match="expected ndim to be 4"):
        gem(torch.ones(3, 4))


def test_combine_scales_gives_each_scale_the_same_vote() -> None:
    small = np.array([[3.0, 4.0]])
    large = np.array([[0.0, 10.0]])
    np.testing.assert_allclose(combine_scales([small, large]), [[0.3, 0.9]])


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_average_pools_its_feature_map_into_its_features(name: str) -> None:
    spec = get_backbone(name)
    model = spec.build().eval()
    x = to_tensor(spec, Image.new("RGB", (300, 200), (90, 140, 30)))[None]
    with torch.inference_mode():
        features, _ = model(x)
        fmap = model.feature_map(x)
    assert fmap.ndim == 4 and fmap.shape[1] == spec.embedding_dim
    torch.testing.assert_close(gap(fmap), features, rtol=1e-4, atol=1e-5)


def test_an_embedding_config_is_keyed_by_the_backbone_unless_it_departs_from_its_recipe() -> None:
    spec = get_backbone("efficientnet_lite0")
    assert EmbeddingConfig.for_backbone(spec).key(spec) == spec.key
    config = EmbeddingConfig.for_backbone(spec, pooling="gem", scales=(160, 224))
    assert config.key(spec) == f"{spec.key}/short_side/gem/160+224"
    with pytest.raises(ValueError, match="unknown pooling"):
        EmbeddingConfig(pooling="max")


def test_centre_crop_preprocessing_squares_the_image() -> None:
    spec = get_backbone("efficientnet_lite0")
    assert tuple(to_tensor(spec, Image.new("RGB", (640, 480)), resize="center_crop").shape) == (3, 224, 224)
    assert tuple(to_tensor(spec, Image.new("RGB", (640, 480)), size=160).shape) == (3, 160, 213)
