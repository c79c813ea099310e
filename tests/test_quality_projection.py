"""PCA-whitening with shrinkage and projection files, on small arrays with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.extraction import l2_normalize
from retrieval.projection import Projection, fit_pca_whitening, ledoit_wolf_shrinkage, load_projection


@pytest.fixture
def anisotropic() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(400, 5)) * np.array([10.0, 3.0, 1.0, 0.5, 0.1]) + 2.0


def _raw(projection: Projection, x: np.ndarray) -> np.ndarray:
    return (x - projection.mean) @ projection.weights[0] + projection.biases[0]


def test_unshrunk_whitening_gives_the_training_data_identity_covariance(anisotropic: np.ndarray) -> None:
    projection = fit_pca_whitening(anisotropic, source_key="k", shrinkage=0.0)
    white = _raw(projection, anisotropic)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(5), atol=1e-3)


def test_full_shrinkage_only_centres_so_cosines_are_those_of_the_centred_vectors(anisotropic: np.ndarray) -> None:
    projection = fit_pca_whitening(anisotropic, source_key="k", shrinkage=1.0)
    out = projection.apply(anisotropic)
    centred = l2_normalize(anisotropic - anisotropic.mean(axis=0))
    np.testing.assert_allclose(out @ out.T, centred @ centred.T, atol=1e-4)


def test_whitening_keeps_the_leading_directions_when_asked(anisotropic: np.ndarray) -> None:
    projection = fit_pca_whitening(anisotropic, source_key="k", shrinkage=0.0, dim=2)
    assert projection.output_dim == 2
    # The first direction is the axis with standard deviation 10.
    assert abs(projection.weights[0][0, 0]) == pytest.approx(1 / 10, rel=0.1)


def test_ledoit_wolf_shrinks_little_with_plenty_of_data_and_much_with_little() -> None:
    rng = np.random.default_rng(1)
    scales = np.linspace(0.1, 5.0, 10)
    plenty = rng.normal(size=(5000, 10)) * scales
    isotropic_few = rng.normal(size=(30, 40))
    assert ledoit_wolf_shrinkage(plenty - plenty.mean(0)) < 0.05
    assert ledoit_wolf_shrinkage(isotropic_few - isotropic_few.mean(0)) > 0.5


def test_a_projection_round_trips_through_its_file(tmp_path: Path, anisotropic: np.ndarray) -> None:
    projection = fit_pca_whitening(anisotropic, source_key="efficientnet_lite0@imagenet-1", dim=3)
    loaded = load_projection(projection.save(tmp_path / "p.npz"))
    assert loaded.identifier == projection.identifier
    assert loaded.identifier.startswith("pca_whitening-5x3-")
    assert loaded.source_key == "efficientnet_lite0@imagenet-1"
    np.testing.assert_allclose(loaded.apply(anisotropic), projection.apply(anisotropic), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(loaded.apply(anisotropic), axis=1), 1.0, atol=1e-5)


def test_the_identifier_changes_with_the_contents(anisotropic: np.ndarray) -> None:
    a = fit_pca_whitening(anisotropic, source_key="k", shrinkage=0.1)
    b = fit_pca_whitening(anisotropic, source_key="k", shrinkage=0.2)
    assert a.identifier != b.identifier
    assert a.identifier == fit_pca_whitening(anisotropic, source_key="k", shrinkage=0.1).identifier


def test_an_mlp_projection_applies_relu_between_its_layers(tmp_path: Path) -> None:
    projection = Projection(
        kind="mlp",
        source_key="k",
        mean=np.zeros(2, dtype=np.float32),
        weights=(np.array([[1.0, -1.0], [0.0, 0.0]], dtype=np.float32), np.eye(2, dtype=np.float32)),
        biases=(np.zeros(2, dtype=np.float32), np.array([0.0, 3.0], dtype=np.float32)),
    )
    # x=(4, 0): hidden (4, -4) -> ReLU (4, 0) -> (4, 3) -> unit (0.8, 0.6).
    np.testing.assert_allclose(projection.apply(np.array([[4.0, 0.0]])), [[0.8, 0.6]], atol=1e-6)
    np.testing.assert_allclose(load_projection(projection.save(tmp_path / "m.npz")).apply([[4.0, 0.0]]), [[0.8, 0.6]])


def test_a_tampered_file_is_rejected(tmp_path: Path, anisotropic: np.ndarray) -> None:
    path = fit_pca_whitening(anisotropic, source_key="k").save(tmp_path / "p.npz")
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["mean"] = arrays["mean"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="do not match the identifier"):
        load_projection(path)


def test_vectors_of_the_wrong_width_are_refused(anisotropic: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"expected vectors of shape \(n, 5\)"):
        fit_pca_whitening(anisotropic, source_key="k").apply(np.ones((2, 4)))
