"""Turn RGB images into normalised tensors, as the backbone spec prescribes."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from retrieval.backbones import BackboneSpec

#: Panoramas and banners are cropped to this aspect ratio around their centre before
#: resizing, so a 1x100000 strip cannot become a 224x22 million pixel tensor.
MAX_ASPECT = 3.0

#: "short_side" resizes the whole image, short side to the input size, keeping the aspect;
#: "center_crop" first crops the largest centred square, as ImageNet evaluation does.
RESIZE_MODES = ("short_side", "center_crop")


def _crop_to_aspect(image: Image.Image, max_aspect: float) -> Image.Image:
    width, height = image.size
    if width > height * max_aspect:
        new_width = max(1, round(height * max_aspect))
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    if height > width * max_aspect:
        new_height = max(1, round(width * max_aspect))
        top = (height - new_height) // 2
        return image.crop((0, top, width, top + new_height))
    return image


def resize_for(
    spec: BackboneSpec, image: Image.Image, *, size: int | None = None, resize: str | None = None
) -> Image.Image:
    """Resize (and crop where the spec says) an RGB image to the backbone's input size.

    `size` and `resize` override the spec's input size and resize mode (multi-scale, centre crop).
    """
    size = spec.input_size if size is None else size
    resize = spec.resize if resize is None else resize
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of: {', '.join(RESIZE_MODES)}")
    image = _crop_to_aspect(image, 1.0 if resize == "center_crop" else MAX_ASPECT)
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_pixels(
    spec: BackboneSpec, image: Image.Image, *, size: int | None = None, resize: str | None = None
) -> np.ndarray:
    """Return the resized image as 8-bit HWC RGB: what `to_tensor` normalises (overrides as in `resize_for`)."""
    resized = resize_for(spec, image, size=size, resize=resize)
    return np.asarray(resized if resized.mode == "RGB" else resized.convert("RGB"))


def normalise_batch(spec: BackboneSpec, pixels: torch.Tensor) -> torch.Tensor:
    """Normalise an (N, H, W, 3) uint8 batch on whatever device it is on, exactly as `to_tensor` does.

    A GPU worker sends 8-bit pixels (a quarter of float32's bytes) and normalises there: on
    the host, converting, stacking and pinning float32 batches held an H100 under 1,000 images/s
    (docs/benchmarks.md#ingest-gpu). The values come from `to_tensor`'s own table, kept on the
    device (arithmetic there could differ in the last bit: CUDA divides by a scalar as a
    multiplication by its reciprocal). The result is (N, 3, H, W) in channels_last memory, as
    the convolutions want it.
    """
    table = _device_table(tuple(spec.mean), tuple(spec.std), str(pixels.device))
    channel = torch.arange(3, device=pixels.device)
    return table[pixels.long() * 3 + channel].permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=8)
def _device_table(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> torch.Tensor:
    """`_normalisation_table` on `device`, flat, value-major: entry v * 3 + c is channel c's value v."""
    table = _normalisation_table(mean, std)
    return torch.from_numpy(np.ascontiguousarray(table.T).reshape(-1)).to(device)


def to_tensor(
    spec: BackboneSpec, image: Image.Image, *, size: int | None = None, resize: str | None = None
) -> torch.Tensor:
    """Return the normalised float32 CHW tensor for one RGB image (overrides as in `resize_for`)."""
    pixels = to_pixels(spec, image, size=size, resize=resize)
    # One table lookup per value instead of four float passes and a transposing copy: 0.87 ->
    # 0.27 ms at 224x336, and bit-identical, as the table holds the same float32 arithmetic.
    table = _normalisation_table(tuple(spec.mean), tuple(spec.std))
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    out = np.empty(chw.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], chw[channel], out=out[channel])
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(v / 255 - mean) / std for every 8-bit value v, per channel, in float32."""
    values = np.arange(256, dtype=np.float32)[None, :] / 255.0
    return (values - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
