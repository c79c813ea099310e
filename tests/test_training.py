"""One epoch of each training method on generated shapes, end to end, leaves loadable checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import train
from retrieval.backbones import get_backbone
from retrieval.extraction import Extractor
from retrieval.folders import read_labelled_folder, stratified_folds
from retrieval.projection import load_projection
from retrieval.small_cnn import register_small_cnn
from retrieval.training import supervised_contrastive_loss

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    rng = np.random.default_rng(11)
    root = tmp_path / "shapes"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            image = Image.new("RGB", (80, 64), (245, 245, 240))
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 30))
            ImageDraw.Draw(image).ellipse((x, y, x + 30, y + 30), fill=colour)
            image.save(root / name / f"{i}.png")
    return root


def test_one_cnn_epoch_writes_a_checkpoint_that_loads_as_a_backbone(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn"
    argv = [str(shapes), "--method", "cnn", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert train.main([*argv, "--test-fraction", "0.4"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] + metrics["test_images"] == 15
    assert 6 <= metrics["test_images"] <= 9
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and 0.0 < metrics["test_mAP"] <= 1.0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    spec = register_small_cnn(out / "small_cnn.pt", name="small_cnn:test-one-epoch")
    assert get_backbone("small_cnn:test-one-epoch") is spec
    result = Extractor(spec, device="cpu").embed([Image.new("RGB", (90, 70), (200, 20, 20))])
    assert result.vectors.shape == (1, spec.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.logits is not None and result.logits.shape == (1, 3)


def test_one_projection_epoch_writes_a_projection_file(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "projection"
    argv = [str(shapes), "--method", "projection", "--epochs", "1", "--folds", "2", "--dim", "8", "--qe", "2"]
    assert train.main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 2
    assert set(metrics["cross_validated"]) >= {"baseline_mAP", "projection_mAP", "projection_qe_mAP"}
    projection = load_projection(out / "projection.npz")
    assert projection.identifier == metrics["identifier"]
    assert projection.source_key == get_backbone("efficientnet_lite0").key
    projected = projection.apply(np.eye(1280, dtype=np.float32)[:3])
    assert projected.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    assert (out / "curves.png").is_file()


def test_folds_split_every_class_evenly_and_never_overlap(shapes: Path) -> None:
    folder = read_labelled_folder(shapes)
    folds = stratified_folds(folder.labels, k=5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(15))
    for fold in folds:
        assert sorted(folder.labels[fold].tolist()) == [0, 1, 2]


def test_supcon_is_lower_when_classes_are_separated() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    low = supervised_contrastive_loss(separated, labels, temperature=0.1)
    high = supervised_contrastive_loss(mixed, labels, temperature=0.1)
    assert float(low) < 0.01 < float(high)
