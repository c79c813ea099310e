"""The real EfficientNet-Lite0 weights: they classify and they embed like an ImageNet CNN."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrieval import imaging
from retrieval.backbones import get_backbone
from retrieval.extraction import Extractor

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor(get_backbone("efficientnet_lite0"), device="cpu")


def _rgb(array: np.ndarray) -> Image.Image:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return imaging.load_image(out.getvalue())


def test_chelsea_is_classified_as_a_cat(extractor: Extractor) -> None:
    result = extractor.embed([_rgb(data.chelsea())])
    assert result.logits is not None
    assert int(np.argmax(result.logits[0])) in CAT_CLASSES


def test_a_near_copy_is_far_more_similar_than_an_unrelated_photo(extractor: Extractor) -> None:
    cat = _rgb(data.chelsea())
    copy = cat.crop((30, 20, 430, 290)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200))
    vectors = extractor.embed([cat, copy, _rgb(data.coffee()), _rgb(data.rocket())]).vectors
    near = float(vectors[0] @ vectors[1])
    unrelated = max(float(vectors[0] @ vectors[2]), float(vectors[0] @ vectors[3]))
    assert near > 0.85
    assert unrelated < 0.4
    assert near - unrelated > 0.5


def test_embeddings_are_unit_length_float32_in_input_order(extractor: Extractor) -> None:
    images = [_rgb(data.coffee()), _rgb(data.chelsea()), _rgb(data.coffee())]
    vectors = extractor.embed(images).vectors
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert float(vectors[0] @ vectors[1]) < 0.9


def test_retrieval_imports_without_django() -> None:
    code = (
        "import sys, retrieval.backbones, retrieval.extraction, retrieval.imaging, retrieval.preprocessing;"
        "assert 'django' not in sys.modules, 'retrieval imported django'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "camera"])
def test_the_input_tensor_is_the_backbones_normalisation_of_the_resized_photo(photo: str) -> None:
    from retrieval.preprocessing import resize_for, to_tensor

    spec = get_backbone("efficientnet_lite0")
    image = Image.fromarray(getattr(data, photo)())  # camera is greyscale ("L")
    rgb = np.asarray(resize_for(spec, image.convert("RGB")), dtype=np.float32) / 255.0
    expected = ((rgb - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32))
    tensor = to_tensor(spec, image).numpy()
    assert tensor.shape == (3, *rgb.shape[:2]) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, expected.transpose(2, 0, 1))


def test_pixels_normalised_on_the_device_equal_the_hosts_tensors() -> None:
    """A GPU worker sends 8-bit pixels and normalises them there; the values must be `to_tensor`'s."""
    import torch

    from retrieval.preprocessing import normalise_batch, to_pixels, to_tensor

    spec = get_backbone("efficientnet_lite0")
    images = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()).resize((451, 300)),
              Image.fromarray(data.camera()).resize((451, 300))]  # camera is greyscale ("L")
    by_shape: dict[tuple[int, ...], list[Image.Image]] = {}
    for image in images:
        by_shape.setdefault(to_pixels(spec, image).shape, []).append(image)
    for group in by_shape.values():
        pixels = torch.from_numpy(np.stack([to_pixels(spec, image) for image in group]))
        assert pixels.dtype == torch.uint8
        batch = normalise_batch(spec, pixels)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch, torch.stack([to_tensor(spec, image) for image in group]))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
@pytest.mark.parametrize(("amp", "floor"), [("fp16", 0.999), ("bf16", 0.998), ("fp32", 0.9999)])
@pytest.mark.parametrize("scales", [None, (160, 224)])
def test_a_gpu_embeds_as_the_cpu_does(amp: str, floor: float, scales: tuple[int, ...] | None) -> None:
    from retrieval.extraction import EmbeddingConfig

    spec = get_backbone("efficientnet_lite0")
    config = None if scales is None else EmbeddingConfig.for_backbone(spec, scales=scales)
    # Two photos of one shape share a batch; the others are batches of their own.
    images = [_rgb(data.chelsea()), _rgb(data.coffee()), _rgb(data.rocket()), _rgb(data.chelsea()[::-1])]
    on_gpu = Extractor(spec, device="cuda", amp=amp, config=config).embed(images).vectors
    on_cpu = Extractor(spec, device="cpu", config=config).embed(images).vectors
    assert float(np.min(np.sum(on_gpu * on_cpu, axis=1))) > floor
