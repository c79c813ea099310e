"""The backbone alone: decoded photos -> unit vectors, per runtime, precision and batch size.

What a bulk worker's inference step costs, without the database, the queue or decoding: the
photos are generated (scikit-image's), decoded and resized to the input size beforehand, as the
decode threads do, and only `Extractor.embed` (tensor conversion, batch, CNN, normalisation) is
timed. The baseline, in the same run, is the naive way: eager fp32 PyTorch, one image at a time.
Every variant's vectors are compared with eager fp32 on the CPU; a variant whose worst cosine
similarity to it is below 0.999 fails the run (0.95 for int8, which is accepted on mAP instead:
docs/quality.md).

  python bench/embed.py                                   # CPU: eager PyTorch and ONNX Runtime
  python bench/embed.py --device cuda                     # GPU: fp32/fp16/bf16, batches 1..512
  python bench/embed.py --device cuda --batches 64,256 --count 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: Worst cosine similarity to the fp32 CPU vectors a variant may have (fp16 on a GPU: ~0.9999).
MIN_COSINE = 0.999


def photos(count: int, spec) -> list:
    """`count` photo-like images at the backbone's input size (as the decode threads leave them)."""
    from ingest import generate
    from PIL import Image

    from retrieval.preprocessing import resize_for

    with tempfile.TemporaryDirectory(prefix="simili-bench-embed-") as tmp:
        distinct = generate(Path(tmp), min(count, 64), (640, 480))
        base = [resize_for(spec, Image.open(path).convert("RGB")) for path in distinct]
    return [base[i % len(base)] for i in range(count)]


def rate(extractor, images: list, batch: int, repeats: int) -> float:
    """Median images/s over `repeats` passes through `images` in batches of `batch`."""
    extractor.embed(images[:batch])  # warm-up: kernels chosen, memory allocated
    extractor.embed(images[:batch])
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(images), batch):
            extractor.embed(images[i:i + batch])  # returns numpy: the GPU's work is done
        rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates)


def host_preparation(spec, images: list, batch: int, device: str) -> dict[str, float]:
    """Milliseconds per batch to make the CNN's input from resized photos, both ways, best of 3.

    "float32 on the host": normalise each photo to float32 CHW, stack (then pin and copy);
    "uint8, normalised on the device": stack the 8-bit pixels (pin, copy), normalise there.
    On a machine without CUDA only the host's share is timed: no copy, and no normalisation
    on the device's side.
    """
    import torch

    from retrieval.preprocessing import normalise_batch, to_pixels, to_tensor

    cuda = device.startswith("cuda")
    chunk = images[:batch]

    def host_float() -> None:
        stacked = torch.stack([to_tensor(spec, image) for image in chunk])
        if cuda:
            stacked.pin_memory().to(device, non_blocking=True).to(memory_format=torch.channels_last)
            torch.cuda.synchronize()

    def device_uint8() -> None:
        stacked = torch.from_numpy(np.stack([to_pixels(spec, image) for image in chunk]))
        if cuda:  # on the CPU the normalisation would be the device's work: not the host's share
            normalise_batch(spec, stacked.pin_memory().to(device, non_blocking=True))
            torch.cuda.synchronize()

    out = {}
    for name, run in (("float32 on the host (before)", host_float), ("uint8, normalised on the device", device_uint8)):
        run()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        out[name] = 1000 * min(times)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--count", type=int, help="images per pass (default 1024 on CUDA, 256 on the CPU)")
    parser.add_argument("--batches", help="batch sizes (default 1,32,128,256,512 on CUDA, 1,16,32,64 on the CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the median counts")
    args = parser.parse_args(argv)

    import torch

    from retrieval import onnx_runtime
    from retrieval.backbones import get_backbone
    from retrieval.extraction import Extractor

    cuda = args.device.startswith("cuda")
    count = args.count or (1024 if cuda else 256)
    batches = [int(b) for b in (args.batches or ("1,32,128,256,512" if cuda else "1,16,32,64")).split(",")]
    spec = get_backbone("efficientnet_lite0")
    images = photos(count, spec)
    width, height = images[0].size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}; {count} images at {width}x{height}", flush=True)

    prep_batch = max(batches)
    for name, ms in host_preparation(spec, images, prep_batch, args.device).items():
        print(f"input of {prep_batch} images, {name}: {ms:.1f} ms ({1000 * prep_batch / ms:.0f} images/s)", flush=True)

    checked = images[:64]
    truth = Extractor(spec, device="cpu", amp="fp32").embed(checked).vectors
    naive = Extractor(spec, device=args.device, amp="fp32")
    naive_rate = rate(naive, images[:64 if cuda else 32], 1, 1)
    naive_cosine = float(np.min(np.sum(naive.embed(checked).vectors * truth, axis=1)))
    del naive
    rows = [("naive: eager fp32, one at a time", 1, naive_rate, naive_cosine)]
    print(f"{rows[0][0]}: {naive_rate:.1f} images/s", flush=True)

    def int8(cache: Path) -> Extractor:  # as webapp.pipeline makes the CPU's default
        extractor = Extractor(spec, device="cpu", onnx_cache=cache)
        extractor.onnx = onnx_runtime.load(spec, extractor.model, cache, precision="int8")
        return extractor

    def autotuned() -> Extractor:  # last: the flag stays on for the process
        torch.backends.cudnn.benchmark = True
        return Extractor(spec, device=args.device)

    # (name, make the extractor, batch sizes, worst cosine allowed)
    cache = Path(tempfile.mkdtemp(prefix="simili-bench-onnx-"))
    variants = [
        ("torch fp32", lambda: Extractor(spec, device=args.device, amp="fp32"), [256] if cuda else batches, MIN_COSINE),
    ]
    if cuda:
        variants += [("torch bf16", lambda: Extractor(spec, device=args.device, amp="bf16"), [256], MIN_COSINE),
                     ("torch fp16 (the product's)", lambda: Extractor(spec, device=args.device), batches, MIN_COSINE),
                     ("torch fp16, cudnn.benchmark", lambda: autotuned(), [256], MIN_COSINE)]
    else:
        # int8 is accepted on mAP (docs/quality.md), not on cosine to fp32.
        variants += [("onnxruntime fp32", lambda: Extractor(spec, device="cpu", onnx_cache=cache), batches, MIN_COSINE),
                     ("onnxruntime int8 (the product's)", lambda: int8(cache), batches, 0.95)]
    failed = False
    for name, make, sizes, floor in variants:
        extractor = make()
        cosine = float(np.min(np.sum(extractor.embed(checked).vectors * truth, axis=1)))
        if cosine < floor:
            print(f"FAIL {name}: worst cosine to fp32 on the CPU {cosine:.5f} < {floor}")
            failed = True
        for size in sizes:
            images_per_second = rate(extractor, images, size, args.repeats)
            rows.append((name, size, images_per_second, cosine))
            print(f"{name}, batch {size}: {images_per_second:.1f} images/s", flush=True)
        del extractor
    print()
    print(f"{'variant':<34} {'batch':>5} {'images/s':>9} {'x naive':>8} {'cosine':>8}")
    for name, size, images_per_second, cosine in rows:
        print(f"{name:<34} {size:>5} {images_per_second:>9.1f} {images_per_second / naive_rate:>8.1f} {cosine:>8.5f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
