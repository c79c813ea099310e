"""Retrieval metrics on hand-made rankings, and the evaluate command on a generated folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from retrieval import evaluate
from retrieval.evaluation import (
    average_precision,
    average_precision_at_r,
    evaluate_ranking,
    interpolated_pr_curve,
    precision_at,
    rank_by_similarity,
    recall_at,
)

# Two queries over a database where query 0 has 3 relevant items, query 1 has 2 (one never retrieved).
RELEVANCE = np.array(
    [
        [1, 0, 1, 0, 1, 0],
        [0, 1, 0, 0, 0, 0],
    ],
    dtype=bool,
)
N_RELEVANT = np.array([3, 2])


def test_average_precision_averages_precision_at_each_relevant_rank() -> None:
    ap = average_precision(RELEVANCE, N_RELEVANT)
    np.testing.assert_allclose(ap, [(1 / 1 + 2 / 3 + 3 / 5) / 3, (1 / 2) / 2])


def test_a_perfect_ranking_scores_one_and_a_reversed_one_less() -> None:
    perfect = np.array([[1, 1, 0, 0]], dtype=bool)
    reversed_ = perfect[:, ::-1]
    assert average_precision(perfect, np.array([2]))[0] == 1.0
    assert average_precision_at_r(perfect, np.array([2]))[0] == 1.0
    assert average_precision(reversed_, np.array([2]))[0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert average_precision_at_r(reversed_, np.array([2]))[0] == 0.0


def test_map_at_r_only_counts_the_first_r_ranks() -> None:
    # R = 3 for query 0: ranks 1..3 hold relevant items at 1 and 3; R = 2 for query 1: rank 2.
    np.testing.assert_allclose(average_precision_at_r(RELEVANCE, N_RELEVANT), [(1 + 2 / 3) / 3, (1 / 2) / 2])


def test_precision_and_recall_at_k() -> None:
    np.testing.assert_allclose(precision_at(RELEVANCE, 1), [1.0, 0.0])
    np.testing.assert_allclose(precision_at(RELEVANCE, 5), [3 / 5, 1 / 5])
    np.testing.assert_allclose(recall_at(RELEVANCE, N_RELEVANT, 3), [2 / 3, 1 / 2])
    np.testing.assert_allclose(recall_at(RELEVANCE, N_RELEVANT, 6), [1.0, 1 / 2])
    with pytest.raises(ValueError, match="expected 1 <= k"):
        precision_at(RELEVANCE, 7)


def test_the_interpolated_curve_takes_the_best_precision_at_or_beyond_each_recall() -> None:
    curve = interpolated_pr_curve(RELEVANCE[:1], N_RELEVANT[:1])
    # Recall 1/3 at rank 1 (P 1), 2/3 at rank 3 (P 2/3), 1 at rank 5 (P 3/5).
    levels = np.linspace(0, 1, 21)
    expected = np.where(levels <= 1 / 3 + 1e-12, 1.0, np.where(levels <= 2 / 3 + 1e-12, 2 / 3, 3 / 5))
    np.testing.assert_allclose(curve, expected)


def test_more_relevant_items_retrieved_than_exist_is_an_error() -> None:
    with pytest.raises(ValueError, match="more relevant items"):
        average_precision(RELEVANCE, np.array([1, 1]))


def test_ranking_leaves_the_query_out_and_orders_by_dot_product() -> None:
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    ranking = rank_by_similarity(vectors, vectors, exclude=np.arange(4))
    assert ranking.tolist() == [[1, 3, 2], [3, 0, 2], [3, 1, 0], [1, 2, 0]]


def test_evaluate_ranking_reports_per_class_ap() -> None:
    labels = np.array([0, 0, 1, 1])
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.6]])
    ranking = rank_by_similarity(vectors, vectors, exclude=np.arange(4))
    report = evaluate_ranking(ranking, labels, labels, classes=["a", "b"], ks=(1, 2))
    # Item 3 ranks both class-a items before item 2: AP 1/3; every other query finds its partner first.
    assert report.per_class_ap == {"a": 1.0, "b": pytest.approx((1.0 + 1 / 3) / 2)}
    assert report.mean_ap == pytest.approx((3 + 1 / 3) / 4)
    assert report.precision[1] == pytest.approx(3 / 4)


SHAPES = {
    "red_discs": ((220, 30, 30), "ellipse"),
    "green_squares": ((30, 180, 40), "rectangle"),
    "blue_bars": ((30, 60, 220), "bar"),
}


def write_shapes(root: Path, *, per_class: int = 4) -> Path:
    """Write a labelled folder of coloured shapes: one sub-folder per class, varied size and place."""
    rng = np.random.default_rng(7)
    for name, (colour, shape) in SHAPES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (96, 72), tuple(int(c) for c in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(image)
            x, y, size = int(rng.integers(5, 40)), int(rng.integers(5, 25)), int(rng.integers(20, 40))
            box = (x, y, x + size, y + (size if shape != "bar" else size // 3))
            getattr(draw, "rectangle" if shape == "bar" else shape)(box, fill=colour)
            image.save(root / name / f"{i}.jpg", quality=90)
    return root


def test_the_evaluate_command_writes_json_markdown_and_plot_and_reuses_the_cache(tmp_path: Path, capsys) -> None:
    folder = write_shapes(tmp_path / "shapes")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [str(folder), "--cache-dir", str(cache), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert evaluate.main([*args, "--config", "name=base", "--config", "pool=gem,qe=2,whiten=centre"]) == 0

    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["results"]] == ["base", "whole+gem+centre+qe2"]
    assert results["images"] == 12
    for result in results["results"]:
        assert 0.0 < result["mAP"] <= 1.0
        assert set(result["per_class_AP"]) == set(SHAPES)
    assert results["results"][0]["embed_seconds"] > 0
    markdown = (out / "results.md").read_text()
    assert "| base |" in markdown and "red_discs" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mAP@R" in capsys.readouterr().out
    assert len(list(cache.rglob("*.npz"))) == 12

    # Another pooling and re-ranking on the same images: every feature comes from the cache.
    assert evaluate.main([*args, "--config", "pool=gem,dba=2"]) == 0
    again = json.loads((out / "results.json").read_text())["results"][0]
    assert again["embed_seconds"] == 0


def test_a_bad_config_names_the_accepted_keys() -> None:
    with pytest.raises(ValueError, match="expected one of: name, backbone"):
        evaluate.parse_config("pooling=gem")
    with pytest.raises(ValueError, match="shrinkage in"):
        evaluate.parse_config("whiten=2")


def test_the_new_retrieval_modules_import_without_django() -> None:
    code = (
        "import sys, retrieval.evaluate, retrieval.train, retrieval.architectures, retrieval.small_cnn;"
        "assert 'django' not in sys.modules, 'retrieval imported django'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
