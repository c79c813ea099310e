"""The DCGAN: short runs on a handful of generated images write loadable checkpoints, its
discriminator is a backbone like any other, and its generated images join training in the ratio asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import gan, train
from retrieval.backbones import get_backbone
from retrieval.errors import WeightsNotFound
from retrieval.extraction import Extractor
from retrieval.folders import read_labelled_folder, stratified_folds
from tests.test_backbones import assert_backbone_contract

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
#: Tiny on purpose: 16 px, 8 channels, a few images; a run takes well under a second.
TINY = {"size": 16, "width": 8, "batch_size": 4}


def _draw(colour: tuple[int, int, int], i: int) -> Image.Image:
    image = Image.new("RGB", (48, 40), (245, 245, 240))
    ImageDraw.Draw(image).ellipse((3 * i, 2 * i, 3 * i + 20, 2 * i + 20), fill=colour)
    return image


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """Three classes of five drawn discs: a labelled folder, and an unlabelled one for the GAN."""
    root = tmp_path / "shapes"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            _draw(colour, i).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def trained(shapes: Path, tmp_path: Path) -> gan.GanRun:
    paths = sorted(shapes.rglob("*.png"))[:6]
    return gan.train_dcgan(paths, tmp_path / "gan", epochs=2, seed=3, source="shapes", progress=False, **TINY)


def test_a_short_run_writes_checkpoints_that_load(trained: gan.GanRun) -> None:
    generator = gan.load_generator(trained.generator)
    assert (generator.size, generator.width, generator.latent_dim) == (16, 8, gan.LATENT_DIM)
    images = gan.generate(trained.generator, 5, seed=1)
    assert len(images) == 5 and {image.size for image in images} == {(16, 16)}
    assert {image.mode for image in images} == {"RGB"}

    model = gan.discriminator_backbone(trained.discriminator).load()  # strict: every tensor found, none left
    assert model.trunk.size == 16 and not model.training

    history = gan.read_history(trained.out_dir)
    assert history is not None and history["history"]["epoch"] == [1.0, 2.0]
    assert history["config"]["images"] == 6 and "trained_on" not in history["config"]
    assert all(np.isfinite(history["history"][name]).all() for name in ("d_loss", "g_loss", "d_real", "d_fake"))


def test_zero_epochs_saves_the_untrained_networks_as_a_baseline(shapes: Path, tmp_path: Path) -> None:
    run = gan.train_dcgan(sorted(shapes.rglob("*.png")), tmp_path / "untrained", epochs=0, progress=False, **TINY)
    assert gan.read_meta(run.discriminator, "dcgan_discriminator")["epoch"] == 0
    assert run.history.columns == {} and (run.out_dir / "samples" / "epoch-000.png").is_file()
    assert "for 0 epochs" in gan.discriminator_backbone(run.discriminator).notes


def test_each_epoch_leaves_a_sample_grid_png_of_the_expected_size(trained: gan.GanRun) -> None:
    expected = gan.grid_side(16)
    assert expected == (8 * 18 + 2, 8 * 18 + 2)
    per_epoch = [trained.out_dir / "samples" / f"epoch-00{epoch}.png" for epoch in (1, 2)]
    for path in (trained.samples, *per_epoch):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as grid:
            grid.verify()
        with Image.open(path) as grid:
            assert grid.size == expected and grid.mode == "RGB"
    assert trained.samples.read_bytes() == per_epoch[-1].read_bytes()


def test_folding_the_spectral_norm_into_the_weights_changes_no_score() -> None:
    torch.manual_seed(0)
    discriminator = gan.Discriminator(size=16, width=8, spectral=True)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(3):
        discriminator(x)  # training-mode calls move the power iteration on
    folded = discriminator.fold()
    assert discriminator.training  # folding leaves the trained model as it was
    discriminator.eval()
    torch.testing.assert_close(folded(x), discriminator(x))
    assert not any("parametrizations" in name for name in folded.state_dict())
    for weight in (folded.blocks[0][0].weight, folded.head.weight):
        assert abs(float(torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)) - 1.0) < 0.05


def test_the_discriminator_backbone_honours_the_registry_contract(trained: gan.GanRun, tmp_path: Path) -> None:
    name = f"gan:shapes-{tmp_path.name}"
    spec = gan.register_discriminator(trained.discriminator, name=name)
    assert get_backbone(name) is spec
    assert spec.embedding_dim == gan.feature_dim(16, 8) == 8 + 16
    assert (spec.input_size, spec.mean, spec.std, spec.resize) == (16, gan.MEAN, gan.STD, "center_crop")
    assert "6 images of shapes" in spec.notes
    assert_backbone_contract(spec)

    by_path = get_backbone(f"gan:{trained.discriminator}")
    assert by_path.name == f"gan:{trained.discriminator}" and by_path.version == spec.version
    images = [_draw(colour, 2) for colour in COLOURS.values()]
    vectors = Extractor(spec, device="cpu").embed(images).vectors
    assert vectors.shape == (3, 24) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The web app runs it through ONNX Runtime on the CPU: the same vectors.
    onnx = Extractor(spec, device="cpu", onnx_cache=tmp_path / "onnx")
    assert onnx.runtime == "onnxruntime"
    np.testing.assert_allclose(onnx.embed(images).vectors, vectors, atol=1e-5)


def test_the_feature_map_pools_to_the_backbones_own_vector(trained: gan.GanRun) -> None:
    model = gan.discriminator_backbone(trained.discriminator).load()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        features, logits = model(x)
        fmap = model.feature_map(x)
    assert logits is None and fmap.shape == (2, 24, 4, 4)
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), features)


def test_training_is_deterministic_under_a_fixed_seed(shapes: Path, tmp_path: Path) -> None:
    paths = sorted(shapes.rglob("*.png"))

    def run(name: str, seed: int) -> gan.GanRun:
        return gan.train_dcgan(paths, tmp_path / name, epochs=2, seed=seed, progress=False, **TINY)

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert len(paths) == 15  # 4 steps an epoch: 8 steps in all
    assert first.history.columns == again.history.columns
    assert first.history.columns["g_loss"] != other.history.columns["g_loss"]
    for name in (gan.GENERATOR_FILE, gan.DISCRIMINATOR_FILE):
        a, b = (torch.load(r.out_dir / name, weights_only=True)["state_dict"] for r in (first, again))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert first.samples.read_bytes() == again.samples.read_bytes()
    made = [[image.tobytes() for image in gan.generate(r.generator, 3, seed=0)] for r in (first, again)]
    assert made[0] == made[1]


def test_generated_counts_follow_the_ratio_per_class() -> None:
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    assert gan.generated_counts(labels, 0.5) == {0: 5, 1: 3, 2: 2}
    assert gan.generated_counts(labels, 2.0) == {0: 20, 1: 12, 2: 6}
    assert gan.generated_counts(labels, 0.0) == {0: 0, 1: 0, 2: 0}
    with pytest.raises(ValueError, match="at least 0"):
        gan.generated_counts(labels, -1.0)


def test_the_cnn_mixes_generated_images_into_training_in_the_ratio_asked(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn"
    argv = [str(shapes), "--method", "cnn", "--epochs", "1", "--test-fraction", "0.4", "--out", str(out),
            "--no-progress", "--gan-ratio", "2", "--gan-epochs", "1", "--gan-batch-size", "2", "--size", "16",
            "--width", "8"]
    assert train.main(argv) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    real = metrics["train_images"]
    assert metrics["augmented_real_images"] == real == 15 - metrics["test_images"]
    assert metrics["augmented_generated_images"] == 2 * real
    for key in ("test_accuracy", "test_mAP", "augmented_test_accuracy", "augmented_test_mAP"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (out / "small_cnn.pt").is_file() and (out / "augmented" / "small_cnn.pt").is_file()

    # One GAN per class, and none of them saw a test image.
    folder = read_labelled_folder(shapes)
    test = stratified_folds(folder.labels, k=round(1 / 0.4), seed=0)[0]
    test_paths = {str(folder.paths[i].resolve()) for i in test}
    for name in COLOURS:
        seen = set(gan.read_meta(out / "gan" / name / gan.GENERATOR_FILE, "dcgan_generator")["trained_on"])
        assert seen and not seen & test_paths
        assert {Path(path).parent.name for path in seen} == {name}


def test_the_projection_reports_its_first_fold_with_and_without_generated_images(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "projection"
    argv = [str(shapes), "--method", "projection", "--epochs", "1", "--folds", "3", "--dim", "8", "--qe", "2",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
            "--gan-ratio", "0.5", "--gan-epochs", "1", "--gan-batch-size", "2", "--size", "16", "--width", "8"]
    assert train.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    folder = read_labelled_folder(shapes)
    test = stratified_folds(folder.labels, k=3, seed=0)[0]
    train_labels = np.delete(folder.labels, test)
    assert metrics["augmentation_test_images"] == len(test) == 5 and metrics["augmented_real_images"] == 10
    assert sorted(np.bincount(train_labels).tolist()) == [3, 3, 4]
    assert metrics["augmented_generated_images"] == 2 + 2 + 2  # per class round(0.5 x real): 1.5 -> 2, 2 -> 2
    for key in ("test_mAP", "test_nn_accuracy", "augmented_test_mAP", "augmented_test_nn_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert len(metrics["per_fold"]) == 3  # the cross-validation still runs, without generated images


def test_generated_images_carry_the_label_of_their_class_gan(trained: gan.GanRun, tmp_path: Path) -> None:
    images, labels = gan.generate_labelled({0: trained.generator, 4: trained.generator}, {0: 3, 4: 2}, seed=0)
    assert len(images) == 5 and labels.tolist() == [0, 0, 0, 4, 4]


def test_class_gans_that_saw_a_test_image_are_refused(shapes: Path, tmp_path: Path) -> None:
    folder = read_labelled_folder(shapes)
    gan.train_class_gans(folder.paths, folder.labels, folder.classes, tmp_path / "gans", epochs=1, progress=False,
                         **TINY)
    assert set(gan.find_class_gans(tmp_path / "gans", folder.classes, folder.paths)) == {0, 1, 2}
    with pytest.raises(ValueError, match="outside this run's training split"):
        gan.find_class_gans(tmp_path / "gans", folder.classes, folder.paths[1:])


def test_dcgan_trains_on_an_unlabelled_folder_from_the_command_line(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcgan"
    argv = [str(shapes), "--method", "dcgan", "--epochs", "1", "--size", "16", "--width", "8", "--batch-size", "8",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert train.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 15 and metrics["history"]["epoch"] == [1.0]
    assert metrics["backbone"] == f"gan:{(out / 'discriminator.pt').resolve()}"
    spec = get_backbone(metrics["backbone"])
    assert spec.embedding_dim == 24 and "15 images of shapes" in spec.notes


def test_sizes_must_be_powers_of_two_and_checkpoints_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="power-of-two size from 16 to 256, got 48"):
        gan.Generator(size=48)
    assert gan.feature_dim(64) == 32 + 64 + 128 + 256
    with pytest.raises(WeightsNotFound, match="no DCGAN discriminator at"):
        get_backbone(f"gan:{tmp_path / 'missing.pt'}")
    torch.save({"state_dict": {}, "meta": {"architecture": "small_cnn"}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected a dcgan_discriminator checkpoint"):
        gan.discriminator_backbone(tmp_path / "other.pt")


def test_the_gan_module_imports_without_django() -> None:
    code = "import sys, retrieval.gan; assert not any(m.startswith('django') for m in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=env)
