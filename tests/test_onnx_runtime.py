"""ONNX Runtime on the CPU: exported once from the torch model, same embeddings within 1e-4."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrieval import imaging, onnx_runtime
from retrieval.backbones import get_backbone
from retrieval.extraction import Extractor

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="onnxruntime is not installed")


def _photos() -> list[Image.Image]:
    out = []
    for array in (data.chelsea(), data.coffee(), data.rocket(), data.astronaut()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(imaging.load_image(buffer.getvalue()))
    return out


def test_onnx_runtime_gives_the_torch_embeddings_and_logits(tmp_path) -> None:
    spec = get_backbone("efficientnet_lite0")
    torch_result = Extractor(spec, device="cpu").embed(_photos())
    onnx_extractor = Extractor(spec, device="cpu", onnx_cache=tmp_path)
    assert onnx_extractor.runtime == "onnxruntime"
    onnx_result = onnx_extractor.embed(_photos())
    np.testing.assert_allclose(onnx_result.vectors, torch_result.vectors, atol=1e-4)
    assert torch_result.logits is not None and onnx_result.logits is not None
    np.testing.assert_allclose(onnx_result.logits, torch_result.logits, atol=1e-3)
    assert np.argmax(onnx_result.logits[0]) in range(281, 286)  # still a cat


def test_the_model_is_exported_once_per_version(tmp_path) -> None:
    spec = get_backbone("efficientnet_lite0")
    Extractor(spec, device="cpu", onnx_cache=tmp_path)
    exported = onnx_runtime.onnx_path(tmp_path, spec)
    first = exported.stat().st_mtime_ns
    Extractor(spec, device="cpu", onnx_cache=tmp_path)
    assert exported.stat().st_mtime_ns == first
    assert [path for path in tmp_path.iterdir() if path.suffix != ".lock"] == [exported]  # nothing partial left
