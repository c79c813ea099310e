"""int8 ONNX Runtime: quantised once per model version, close to fp32, chosen by ONNX_PRECISION."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrieval import imaging, onnx_runtime
from retrieval.backbones import get_backbone
from retrieval.extraction import EmbeddingConfig, Extractor
from webapp import pipeline

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="onnxruntime is not installed")

#: Measured on these four photos (none of them used for calibration): 0.9885-0.9977; on all
#: 1000 Corel-1k images the mean is 0.991 and the 1st percentile 0.972 (docs/quality.md).
MIN_COSINE = 0.98


def _photos() -> list[Image.Image]:
    out = []
    for array in (data.chelsea(), data.coffee(), data.rocket(), data.astronaut()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(imaging.load_image(buffer.getvalue()))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache with the fp32 export and its int8 copy, made once for this module."""
    folder = tmp_path_factory.mktemp("onnx")
    spec = get_backbone("efficientnet_lite0")
    extractor = Extractor(spec, device="cpu", onnx_cache=folder)
    onnx_runtime.load(spec, extractor.model, folder, precision="int8")
    return folder


def test_int8_embeddings_stay_close_to_fp32_on_photos(cache: Path) -> None:
    spec = get_backbone("efficientnet_lite0")
    extractor = Extractor(spec, device="cpu", onnx_cache=cache)
    fp32 = extractor.embed(_photos())
    extractor.onnx = onnx_runtime.load(spec, extractor.model, cache, precision="int8")
    assert extractor.onnx.precision == "int8"
    int8 = extractor.embed(_photos())
    cosines = (fp32.vectors * int8.vectors).sum(axis=1)
    assert cosines.min() >= MIN_COSINE, cosines
    np.testing.assert_allclose(np.linalg.norm(int8.vectors, axis=1), 1.0, atol=1e-5)
    assert int8.logits is not None and np.argmax(int8.logits[0]) in range(281, 286)  # still a cat


def test_the_int8_model_is_made_once_per_version_next_to_the_fp32_export(cache: Path) -> None:
    spec = get_backbone("efficientnet_lite0")
    quantized = onnx_runtime.onnx_path(cache, spec, precision="int8")
    first = quantized.stat().st_mtime_ns
    onnx_runtime.load(spec, Extractor(spec, device="cpu").model, cache, precision="int8")
    assert quantized.stat().st_mtime_ns == first
    made = sorted(path.name for path in cache.iterdir() if path.suffix != ".lock")  # nothing partial left
    assert made == sorted([onnx_runtime.onnx_path(cache, spec).name, quantized.name])


def test_calibration_is_deterministic() -> None:
    spec = get_backbone("efficientnet_lite0")
    first, again = onnx_runtime.calibration_images(spec, count=3), onnx_runtime.calibration_images(spec, count=3)
    assert [batch.shape for batch in first] == [(1, 3, 336, 224), (1, 3, 224, 336), (1, 3, 336, 224)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_int8_falls_back_to_fp32_when_quantisation_is_unavailable(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = get_backbone("efficientnet_lite0")
    shutil.copy(onnx_runtime.onnx_path(cache, spec), onnx_runtime.onnx_path(tmp_path, spec))
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import raises ImportError
    assert not onnx_runtime.quantization_available()
    model = onnx_runtime.load(spec, Extractor(spec, device="cpu").model, tmp_path, precision="int8")
    assert model.precision == "fp32"
    assert not onnx_runtime.onnx_path(tmp_path, spec, precision="int8").exists()
    assert "running fp32" in caplog.text


def test_an_unknown_precision_is_refused(cache: Path) -> None:
    spec = get_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="expected one of: fp32, int8"):
        onnx_runtime.load(spec, Extractor(spec, device="cpu").model, cache, precision="int4")


@pytest.mark.parametrize(("precision", "runtime"), [("int8", "onnxruntime int8"), ("fp32", "onnxruntime fp32")])
def test_the_worker_recipe_runs_the_precision_the_setting_names(
    cache: Path, tmp_path: Path, settings, precision: str, runtime: str
) -> None:
    onnx_cache = tmp_path / "cache" / "onnx"
    onnx_cache.mkdir(parents=True)
    spec = get_backbone("efficientnet_lite0")
    for name in ("fp32", "int8"):
        shutil.copy(onnx_runtime.onnx_path(cache, spec, precision=name), onnx_cache)
    settings.VAR_DIR = tmp_path
    settings.EMBEDDING_BACKBONE, settings.EMBEDDING_DEVICE, settings.EMBEDDING_RUNTIME = spec.name, "cpu", "onnx"
    settings.EMBEDDING_RESIZE, settings.EMBEDDING_POOLING, settings.EMBEDDING_SCALES = "short_side", "gap", [224]
    settings.EMBEDDING_PROJECTION, settings.ONNX_PRECISION = "", precision
    pipeline._recipe.cache_clear()
    try:
        recipe = pipeline.recipe()
        assert recipe.runtime == runtime
        # Precision is how the model runs, not what it means: the version key stays the spec's.
        assert recipe.key == EmbeddingConfig.for_backbone(spec).key(spec)
        assert recipe.embed(_photos()[:1]).vectors.shape == (1, spec.embedding_dim)
    finally:
        pipeline._recipe.cache_clear()


def test_the_evaluation_embeds_in_onnx_runtime_only_the_backbones_own_recipe(tmp_path: Path) -> None:
    from retrieval.evaluate import RuntimeFolderFeatures, build_parser

    assert build_parser().parse_args(["folder", "--runtime", "onnx-int8"]).runtime == "onnx-int8"
    spec = get_backbone("efficientnet_lite0")
    features = RuntimeFolderFeatures([], spec, None, lambda: Extractor(spec, device="cpu"), precision="int8",
                                     onnx_cache=tmp_path)
    with pytest.raises(ValueError, match="only the backbone's own recipe"):
        features.vectors(EmbeddingConfig.for_backbone(spec, pooling="gem"))


def test_workers_starting_together_on_a_fresh_cache_all_get_the_int8_model(tmp_path: Path) -> None:
    """`serve` starts several workers at once; each must load a whole model, made by one of them."""
    import subprocess

    code = (
        "import sys, hashlib, logging, numpy as np; logging.basicConfig(level=logging.INFO);"
        "from retrieval import onnx_runtime; from retrieval.backbones import get_backbone;"
        "spec = get_backbone('efficientnet_lite0'); model = spec.load().eval();"
        "session = onnx_runtime.load(spec, model, __import__('pathlib').Path(sys.argv[1]), precision='int8');"
        "out = session(np.ones((1, 3, 224, 224), np.float32))[0];"
        "print(session.precision, hashlib.sha256(np.round(out, 5).tobytes()).hexdigest())"
    )
    root = Path(__file__).resolve().parent.parent
    workers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], [err[-2000:] for _, err in results]
    logs = "".join(err for _, err in results)
    assert logs.count("exported EfficientNet") == 1 and logs.count("quantised") == 1, logs[-3000:]
    answers = {out.strip() for out, _ in results}
    assert len(answers) == 1 and answers.pop().startswith("int8 ")
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted(
        [onnx_runtime.onnx_path(tmp_path, get_backbone("efficientnet_lite0")).name,
         onnx_runtime.onnx_path(tmp_path, get_backbone("efficientnet_lite0"), precision="int8").name])
