"""The offline evaluation and the web app rank the same way: a small labelled set imported
through the app, searched through the API, compared with `retrieval.evaluate` on the same files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image, ImageEnhance

from retrieval.evaluate import rank_all_against_all
from retrieval.evaluation import evaluate_ranking
from retrieval.folders import read_labelled_folder
from webapp import services
from webapp.models import Collection, Embedding, ImageStatus
from webapp.models import Image as ImageRow

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

ROOT = Path(__file__).resolve().parent.parent


def _variants(array: np.ndarray, count: int, seed: int) -> list[bytes]:
    """Crops, flips, rescales and colour changes of one photo: one class of a labelled set."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(array).convert("RGB")
    out = []
    for _ in range(count):
        w, h = base.size
        left, top = int(rng.integers(0, w // 5)), int(rng.integers(0, h // 5))
        image = base.crop((left, top, left + int(w * 0.75), top + int(h * 0.75)))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.6, 1.4)))
        image = image.resize((int(image.width * rng.uniform(0.6, 1.1)), int(image.height * rng.uniform(0.6, 1.1))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 95)))
        out.append(buffer.getvalue())
    return out


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    from skimage import data

    classes = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(), "astronaut": data.astronaut()}
    for seed, (name, array) in enumerate(classes.items()):
        (tmp_path / name).mkdir()
        for index, payload in enumerate(_variants(array, 5, seed)):
            (tmp_path / name / f"{index}.jpg").write_bytes(payload)
    return tmp_path


@pytest.fixture
def no_collapse():
    """The offline evaluation ranks every image; collapsing near-duplicates is the pages' business."""
    from django.test import override_settings

    with override_settings(NEAR_DUPLICATE_DISTANCE=0.0):
        yield


def test_the_web_app_ranks_like_the_offline_evaluation(
    celery_worker_process, owner_client, labelled_folder: Path, tmp_path: Path, no_collapse
) -> None:
    folder = read_labelled_folder(labelled_folder)
    response = owner_client.post("/collections/new/", {"name": "Labelled", "visibility": "public"})
    collection = Collection.objects.get(key=response["Location"].strip("/").split("/")[-1])
    uploads = [SimpleUploadedFile(f"{p.parent.name}-{p.name}", p.read_bytes()) for p in folder.paths]
    result = owner_client.post(f"/c/{collection.key}/upload/", {"files": uploads}, HTTP_ACCEPT="application/json")
    keys = [r["image"]["key"] for r in result.json()["results"]]
    assert len(keys) == len(folder.paths)
    deadline = time.monotonic() + 180
    while ImageRow.objects.filter(collection=collection, status=ImageStatus.READY).count() < len(keys):
        assert time.monotonic() < deadline, "images did not become ready"
        time.sleep(0.3)
    services.collection_augment(collection_id=collection.pk)  # what the worker does once uploads settle

    # Same files, same vectors: the worker's embeddings equal retrieval's, as evaluate computes them
    # with the worker's runtime (ONNX Runtime at ONNX_PRECISION, from the worker's exported models).
    from retrieval import onnx_runtime
    from retrieval.backbones import get_backbone
    from retrieval.extraction import Extractor
    from retrieval.folders import open_rgb

    spec = get_backbone("efficientnet_lite0")
    onnx_cache = Path(settings.VAR_DIR) / "cache" / "onnx"
    extractor = Extractor(spec, device="cpu", onnx_cache=onnx_cache)
    extractor.onnx = onnx_runtime.load(spec, extractor.model, onnx_cache, precision=settings.ONNX_PRECISION)
    offline = extractor.embed([open_rgb(p) for p in folder.paths])
    stored = {row.image.key: np.asarray(row.vector) for row in Embedding.objects.select_related("image")}
    np.testing.assert_allclose(np.stack([stored[k] for k in keys]), offline.vectors, atol=1e-4)

    # The web app's ranking of every image, through the API, against the evaluation's ranking.
    n = len(keys) - 1
    index_of = {key: i for i, key in enumerate(keys)}
    answers = [owner_client.get(f"/api/v1/images/{key}/similar", {"k": n}).json()["results"] for key in keys]
    web = np.array([[index_of[r["image"]["key"]] for r in answer] for answer in answers])
    offline_ranking = rank_all_against_all(
        offline.vectors, dba=settings.SIMILAR_DBA, qe=settings.SIMILAR_QE, alpha=settings.SIMILAR_ALPHA
    )
    top = 10
    agreement = np.mean([len(set(web[i, :top]) & set(offline_ranking[i, :top])) / top for i in range(len(keys))])
    assert agreement >= 0.98, agreement
    web_report = evaluate_ranking(web, folder.labels, folder.labels, classes=folder.classes)
    offline_report = evaluate_ranking(offline_ranking, folder.labels, folder.labels, classes=folder.classes)
    assert web_report.mean_ap == pytest.approx(offline_report.mean_ap, abs=0.01)

    # And the command-line evaluation reports that same number for the same folder.
    out = tmp_path / "evaluation"
    config = f"dba={settings.SIMILAR_DBA},qe={settings.SIMILAR_QE},alpha={settings.SIMILAR_ALPHA}"
    subprocess.run(
        [sys.executable, "-m", "retrieval.evaluate", str(labelled_folder), "--config", config, "--no-cache",
         "--device", "cpu", "--no-progress", "--out", str(out),
         "--runtime", "onnx-int8" if settings.ONNX_PRECISION == "int8" else "onnx", "--onnx-cache", str(onnx_cache)],
        cwd=ROOT, check=True, capture_output=True,
    )
    reported = json.loads((out / "results.json").read_text())
    assert reported["results"][0]["mAP"] == pytest.approx(web_report.mean_ap, abs=0.01)
    assert web_report.mean_ap > 0.9
