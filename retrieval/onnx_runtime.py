"""Run a backbone with ONNX Runtime on the CPU: exported once from the very torch model.

Measured on a 2-core machine (EfficientNet-Lite0, batch 16 at 224x336): ONNX Runtime 22.6 ms per
image, eager PyTorch 166 ms per image; outputs agree within 1e-5. Eager PyTorch gets slower per
image as the batch grows on this CPU, ONNX Runtime does not.

`precision="int8"` runs a statically quantised copy (QDQ, int8 weights per channel, uint8
activations) made once from the fp32 export: 6-7 ms of CPU per 224x336 image instead of 16 on a
VNNI CPU, Corel-1k mAP 0.8630 instead of 0.8658 (docs/quality.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from retrieval.backbones import BackboneSpec, FeatureModel

logger = logging.getLogger(__name__)

#: The ONNX opset: 17 is supported by every ONNX Runtime release of the last three years.
OPSET = 17

PRECISIONS = ("fp32", "int8")
#: Bumped whenever the calibration images or quantisation options change, so that a cached
#: int8 model made the old way is not reused.
CALIBRATION_VERSION = 1
#: Calibration images: 48 measured the same Corel-1k mAP as 51 crops of scikit-image's photos;
#: activation ranges from min/max settle well before that.
CALIBRATION_IMAGES = 48


def available() -> bool:
    """Return whether ONNX Runtime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def quantization_available() -> bool:
    """Return whether ONNX Runtime's quantisation tools can be imported here."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_path(cache_dir: Path, spec: BackboneSpec, *, precision: str = "fp32") -> Path:
    """Return where the exported (or int8-quantised) model of a backbone version lives in `cache_dir`."""
    stem = spec.key.replace("/", "_").replace("@", "-")
    if precision == "fp32":
        return cache_dir / f"{stem}.onnx"
    if precision == "int8":
        return cache_dir / f"{stem}.int8-c{CALIBRATION_VERSION}.onnx"
    raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")


class _Outputs(torch.nn.Module):
    """Export only the outputs a backbone has: features, and logits when it has a classifier."""

    def __init__(self, model: FeatureModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits = self.model(x)
        return (features,) if logits is None else (features, logits)


def export(model: FeatureModel, path: Path, *, input_size: int) -> Path:
    """Export a backbone to ONNX with dynamic batch size and image size, written atomically.

    Args:
        model: the loaded backbone, in eval mode, on the CPU.
        path: the .onnx file to write.
        input_size: a typical short side, for the tracing example.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, input_size, input_size * 4 // 3)
    with torch.inference_mode():
        has_logits = model(example)[1] is not None
    outputs = ["features", "logits"] if has_logits else ["features"]
    axes = {"images": {0: "n", 2: "h", 3: "w"}, **{name: {0: "n"} for name in outputs}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.partial")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                _Outputs(model), (example,), tmp, input_names=["images"], output_names=outputs,
                dynamic_axes=axes, opset_version=OPSET, dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    logger.info("exported %s to %s", type(model.trunk).__name__, path)
    return path


def calibration_images(spec: BackboneSpec, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Return deterministic photo-like calibration inputs, preprocessed as the spec says.

    Random fields with a natural image's 1/f amplitude spectrum and correlated colour channels,
    with a few hard-edged shapes, half landscape and half portrait: no image files to ship or
    download, and on Corel-1k they calibrate as well as crops of real photos (docs/quality.md).
    """
    from PIL import Image, ImageDraw

    from retrieval.preprocessing import to_tensor

    rng = np.random.default_rng(20261127)
    inputs = []
    for index in range(count):
        height, width = (224, 336) if index % 2 else (336, 224)
        fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
        radius = np.hypot(fx, fy)
        radius[0, 0] = 1.0
        channels = []
        for _ in range(3):
            noise = rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))
            channels.append(np.real(np.fft.ifft2(noise / radius ** rng.uniform(0.9, 1.3))))
        mix = rng.normal(size=(3, 3)) * 0.4 + np.eye(3) * 0.3 + 0.5
        field = np.stack(channels, axis=-1) @ mix
        field = (field - field.mean(axis=(0, 1))) / (field.std() + 1e-9)
        field = field * rng.uniform(35, 70) + rng.uniform(70, 180, size=3)
        picture = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(2, 8))):
            left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = (left, top, left + int(rng.integers(10, width // 2)), top + int(rng.integers(10, height // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        inputs.append(to_tensor(spec, picture).numpy()[None])
    return inputs


def quantize(source: Path, path: Path, *, spec: BackboneSpec) -> Path:
    """Write a statically quantised int8 copy of an fp32 ONNX model, atomically.

    Args:
        source: the fp32 model from `export`.
        path: the .onnx file to write.
        spec: the backbone, whose preprocessing the calibration images go through.

    Returns:
        `path`.

    Raises:
        ImportError: when onnxruntime.quantization (which needs the onnx package) is missing.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.inputs = iter(calibration_images(spec))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.inputs, None)
            return None if batch is None else {"images": batch}

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.partial")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The quantiser logs a warning to run its pre-processing first; with it the model was
            # no faster and no more accurate here, so the advice is silenced while it runs.
            logging.disable(logging.WARNING)
            # QDQ lets ORT fuse int8 Conv+Clip; per-channel weight scales matter for the depthwise
            # convolutions; uint8 activations with int8 weights is the fast (VNNI) pair on x86.
            quantize_static(
                str(source), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        os.replace(tmp, path)
    finally:
        logging.disable(logging.NOTSET)
        Path(tmp).unlink(missing_ok=True)
    logger.info("quantised %s to int8 at %s", source.name, path)
    return path


class OnnxModel:
    """An ONNX Runtime session answering like `FeatureModel`: (features, logits) as numpy."""

    def __init__(self, path: Path, *, threads: int | None = None, precision: str = "fp32") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one graph, run sequentially: a second pool would only idle
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's threads busy-wait after each run by default, which slowed a following torch call
        # 2.3x on this machine, and burns the core the decode threads need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if precision == "int8":
            # Folding each quantised ReLU6 into its convolution leaves the Clip bounds unused, and
            # ORT warns once per bound (70 lines) at every start; errors are still logged.
            options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.has_logits = len(self.session.get_outputs()) > 1
        self.precision = precision

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)})
        return outputs[0], (outputs[1] if self.has_logits else None)


def load(spec: BackboneSpec, model: FeatureModel, cache_dir: Path, *, precision: str = "fp32") -> OnnxModel:
    """Return an ONNX Runtime session for a backbone, exporting (and quantising) it the first time.

    Args:
        spec: the backbone.
        model: the loaded torch model, exported when `cache_dir` has no copy yet.
        cache_dir: where the exported models are kept, one file per backbone version and precision.
        precision: "fp32", or "int8" for the statically quantised copy; without
            onnxruntime.quantization, "int8" logs a warning and runs fp32.

    Returns:
        The session; its `precision` says which model it runs.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    path = onnx_path(cache_dir, spec)
    quantized = onnx_path(cache_dir, spec, precision="int8")
    if not path.exists() or (precision == "int8" and not quantized.exists()):
        # One process makes the files, the others wait and load them: `serve` starts several
        # workers at once on a fresh cache, and ONNX Runtime's quantiser writes a fixed
        # "<model>-inferred.onnx" beside its input, which a second quantiser overwrote while the
        # first read it ("Wire format was corrupt" at a bulk worker's start).
        with _exclusive(cache_dir / f"{path.stem}.lock"):
            if not path.exists():
                export(model, path, input_size=spec.input_size)
            if precision == "int8" and not quantized.exists():
                try:
                    quantize(path, quantized, spec=spec)
                except ImportError as exc:
                    logger.warning("int8 asked for, but ONNX Runtime's quantisation is unavailable (%s): "
                                   "running fp32", exc)
                    return OnnxModel(path)
    if precision == "int8":
        return OnnxModel(quantized, precision="int8")
    return OnnxModel(path)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if need be) across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
