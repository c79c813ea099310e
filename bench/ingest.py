"""Ingest throughput: files on disk -> rows + thumbnails + embeddings in PostgreSQL.

Compares, in one run on the same images and the same embedded PostgreSQL/Redis:
  batched  the product's bulk lane: `manage.py import_folder` (files checked and stored in threads,
           rows written) while the bulk workers `manage.py serve` would start (BULK_WORKERS) claim
           batches (SKIP LOCKED), decoding in threads (JPEG draft mode) during inference;
  naive    one image at a time in this process: full decode, eager PyTorch on one image, one
           row at a time (no queue at all, so the ratio understates the gain);
and measures a single upload's latency (upload -> ready, on the interactive worker) while a bulk
import runs.

  python bench/ingest.py                              # 1000 generated 12-megapixel JPEGs
  python bench/ingest.py --folder ../shared/datasets/corel1k_wang
  python bench/ingest.py --count 200 --naive-count 50
  python bench/ingest.py --folder ../shared/datasets/corel1k_wang --stages 300   # CPU time per stage
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a single upload may take before the run stops and says so (its target is 2).
PROBE_TIMEOUT = 60
#: Single uploads made at most, one a second (a longer import is probed for its first minutes).
PROBE_PHOTOS = 300


def generate(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Write `count` distinct photo-like JPEGs (scikit-image photos, cropped, scaled, tinted), one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{index:05d}.jpg" for index in range(count)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_photo, paths, range(count), [size] * count, chunksize=8))
    return paths


def _photo(path: Path, index: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageEnhance
    from skimage import data

    sources = [data.chelsea, data.coffee, data.astronaut, data.rocket, lambda: data.stereo_motorcycle()[0],
               data.immunohistochemistry, data.hubble_deep_field]
    rng = random.Random(7 * 1_000_003 + index)
    base = Image.fromarray(sources[index % len(sources)]()).convert("RGB")
    w, h = base.size
    left, top = rng.randint(0, w // 6), rng.randint(0, h // 6)
    box = (left, top, left + w * 4 // 5, top + h * 4 // 5)
    image = base.crop(box).resize(size, Image.Resampling.BILINEAR)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    noise = np.random.default_rng(index).integers(0, 12, (size[1], size[0], 1), dtype=np.uint8)
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    image.save(path, format="JPEG", quality=90)


def setup(var_dir: Path) -> None:
    os.environ["SIMILI_VAR_DIR"] = str(var_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    os.environ.setdefault("EMBEDDING_DEVICE", "cpu")
    sys.path.insert(0, str(ROOT))
    import django
    from django.conf import settings

    from webapp import embedded

    embedded.start_postgres(settings.EMBEDDED, database="simili")
    global REDIS
    REDIS = embedded.start_redis(settings.EMBEDDED)
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


REDIS = None


def worker(queue: str, log: Path, *, name: str = "", threads: int | None = None) -> subprocess.Popen[bytes]:
    # As in `manage.py serve`: the bulk lane runs at a lower CPU priority than the interactive one.
    nice = ["nice", "-n", "10"] if queue == "bulk" else []
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's thread count, which ONNX Runtime's session follows
    return subprocess.Popen(
        [*nice, sys.executable, "-m", "celery", "-A", "webapp", "worker", "-P", "solo", "-Q", queue,
         "-n", f"{name or queue}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for_workers(count: int, timeout: float = 180) -> None:
    from webapp.celery import app

    deadline = time.monotonic() + timeout
    while len(app.control.ping(timeout=1.0)) < count:
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not start")


def wait_ready(collection, total: int, timeout: float = 3600) -> None:
    from webapp.models import Image, ImageStatus

    deadline = time.monotonic() + timeout
    done = [ImageStatus.READY, ImageStatus.FAILED]
    while Image.objects.filter(collection=collection, status__in=done).count() < total:
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the workers")
        time.sleep(0.2)


def batched(folder: Path, paths: list[Path], owner, log: Path, probe: Path | None, *, bulk_workers: int | None = None,
            worker_threads: int | None = None) -> tuple[float, list[float]]:

    from webapp import services
    from webapp.models import Image, ImageStatus

    collection = services.collection_create(owner=owner, name=f"batched-{time.time()}")
    probes = services.collection_create(owner=owner, name=f"probes-{time.time()}")
    if bulk_workers is None:  # the layout `manage.py serve` starts (BULK_WORKERS)
        from webapp.management.commands.serve import bulk_worker_layout

        bulk_workers, worker_threads = bulk_worker_layout()
    print(f"  {bulk_workers} bulk worker(s), {worker_threads or 'default'} thread(s) each", flush=True)
    workers = {f"bulk worker {n + 1}": worker("bulk", log, name=f"bulk{n + 1}", threads=worker_threads)
               for n in range(bulk_workers)}
    workers["interactive worker"] = worker("interactive", log)
    _wait_for_workers(len(workers))  # each answers once ready, i.e. once it has loaded its CNN
    latencies: list[float] = []
    # The probe uploads' bytes are made now: a user's browser encodes its photo, not the server,
    # and making them during the run (a full decode of a 12 MP photo each) took 4 of the run's
    # 62 CPU seconds from the workers being measured.
    probe_photos = _variants(probe, PROBE_PHOTOS) if probe is not None else []
    try:
        started = time.perf_counter()
        cpu = _cpu_by_process(workers)

        # The product's bulk import, as its own process (as an operator runs it).
        importer = subprocess.Popen(
            [sys.executable, "manage.py", "import_folder", str(folder), "--owner", owner.get_username(),
             "--collection", collection.key, "--no-progress"],
            cwd=ROOT, env=dict(os.environ), stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        import_cpu = 0.0
        next_probe = time.perf_counter() + 2
        done = [ImageStatus.READY, ImageStatus.FAILED]

        def importing() -> bool:
            nonlocal import_cpu
            if importer.returncode is not None:
                return False
            pid, status, usage = os.wait4(importer.pid, os.WNOHANG)
            if pid == 0:
                return True
            importer.returncode = os.waitstatus_to_exitcode(status)
            import_cpu = usage.ru_utime + usage.ru_stime
            print(f"  import finished after {time.perf_counter() - started:.1f} s (exit {importer.returncode})",
                  flush=True)
            return False

        # Single uploads to the interactive lane, one a second, while the import and the bulk worker run.
        while importing() or Image.objects.filter(collection=collection, status__in=done).count() < len(paths):
            if len(latencies) < len(probe_photos) and time.perf_counter() >= next_probe:
                data = probe_photos[len(latencies)]
                sent = time.perf_counter()
                image = services.image_ingest(collection=probes, uploaded_by=owner, data=data, name="probe.jpg").image
                stored = time.perf_counter()
                while (row := Image.objects.get(pk=image.pk)).status not in (ImageStatus.READY, ImageStatus.FAILED):
                    if time.perf_counter() - sent > PROBE_TIMEOUT:
                        raise SystemExit(f"a single upload was not ready after {PROBE_TIMEOUT} s (row {row.pk}, "
                                         f"{row.status}, enqueued {row.enqueued_at}, {row.attempts} attempt(s))")
                    time.sleep(0.02)
                latencies.append(time.perf_counter() - sent)
                print(f"  probe at {sent - started:.1f} s: {latencies[-1]:.2f} s (upload {stored - sent:.2f} s, "
                      f"ready +{(row.processed_at - row.created_at).total_seconds():.2f} s after its row, "
                      f"{row.lane} lane)", flush=True)
                next_probe = time.perf_counter() + 1
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        spent = {"import_folder": import_cpu,
                 **{name: seconds - cpu[name] for name, seconds in _cpu_by_process(workers).items()}}
        print("  CPU seconds during the run: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in spent.items())
              + f" (of {os.cpu_count() * elapsed:.1f} on {os.cpu_count()} cores)", flush=True)
    finally:
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:  # a warm shutdown waits for the running task (a refresh, say)
                process.kill()
                process.wait()
    # Collection refreshes (services.collection_augment) that ran beside the embedding, from the workers' log.
    refreshes = log.read_text(errors="replace").count("augmented vector(s) in collection")
    print(f"  collection refreshes during the run: {refreshes}", flush=True)
    failed = Image.objects.filter(collection=collection, status=ImageStatus.FAILED).count()
    if failed:
        print(f"warning: {failed} image(s) failed in the batched run")
    return elapsed, latencies


def _cpu_by_process(workers: dict[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds so far: this process (the import and the probes), each worker, PostgreSQL + Redis."""
    import psutil

    def used(pid: int) -> float:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system

    return {"this process (probes)": used(os.getpid()),
            **{name: used(process.pid) for name, process in workers.items()}, "PostgreSQL + Redis": _server_cpu()}


def _variants(path: Path, count: int) -> list[bytes]:
    """`count` distinct 640x480-ish JPEGs of one photo (distinct bytes: uploads are deduplicated)."""
    from PIL import Image

    base = Image.open(path).convert("RGB")
    base.thumbnail((1280, 960))
    photos = []
    for index in range(count):
        out = io.BytesIO()
        base.resize((640 + index, 480)).save(out, format="JPEG", quality=88)
        photos.append(out.getvalue())
    return photos


def naive(paths: list[Path], owner) -> float:
    """One at a time: full decode, eager PyTorch batch of one, one row at a time."""
    import hashlib

    from PIL import Image as PILImage
    from PIL import ImageOps

    from retrieval import imaging
    from retrieval.extraction import Extractor
    from webapp import embeddings, pipeline, services, storage
    from webapp.models import Embedding, Image, ImageStatus

    recipe = pipeline.recipe()
    # Eager fp32 PyTorch on the workers' device, as a first version would.
    eager = Extractor(recipe.spec, device=recipe.extractor.device.type, amp="fp32")
    collection = services.collection_create(owner=owner, name=f"naive-{time.time()}")
    version = embeddings.embedding_model_ensure(key=recipe.key, backbone=recipe.spec.name,
                                                dimensions=recipe.dimensions)
    eager.embed([PILImage.new("RGB", (224, 224))])  # load outside the timing
    started = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        picture = ImageOps.exif_transpose(PILImage.open(io.BytesIO(data))).convert("RGB")  # full decode
        thumb_path = storage.content_path("thumbnails", sha, "jpg") + ".naive"
        storage.write_atomic(thumb_path, imaging.make_thumbnail(picture, max_side=400))
        vector = eager.embed([picture]).vectors[0]
        row = Image.objects.create(collection=collection, sha256=sha, file_path=f"naive/{sha}", mime_type="image/jpeg",
                                   width=picture.width, height=picture.height, byte_size=len(data),
                                   status=ImageStatus.READY, thumbnail_path=thumb_path)
        Embedding.objects.create(image=row, collection=collection, model_version=version, vector=vector,
                                 augmented=vector)
    return time.perf_counter() - started


class StageClock:
    """CPU seconds per stage, exclusive of nested stages, by wrapping the product's own functions.

    The stages run one after another in this process (no decode threads), so `process_time`
    deltas belong to the stage that is running, ONNX Runtime's own threads included.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []

    def wrap(self, owner: object, attribute: str, stage: str) -> None:
        original = getattr(owner, attribute)
        clock = self

        def timed(*args, **kwargs):
            clock._stack.append([time.process_time(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                started, nested = clock._stack.pop()
                spent = time.process_time() - started
                clock.seconds[stage] = clock.seconds.get(stage, 0.0) + spent - nested
                if clock._stack:
                    clock._stack[-1][1] += spent

        setattr(owner, attribute, timed)


def stages(paths: list[Path], owner) -> dict[str, float]:
    """Ingest and embed `paths` stage by stage in this process; return CPU ms per image per stage."""
    from retrieval import extraction, imaging, onnx_runtime
    from webapp import embeddings, imports, ingest, pipeline, services, storage, tagging
    from webapp.models import Image

    recipe = pipeline.recipe()
    recipe.embed([imaging.load_image(paths[0].read_bytes())])  # load and warm outside the clock
    collection = services.collection_create(owner=owner, name=f"stages-{time.time()}")
    clock = StageClock()
    clock.wrap(services, "image_ingest", "import: hash, dedupe query, insert")
    clock.wrap(imaging, "inspect_image", "import: validation (JPEG: structure only)")
    clock.wrap(storage, "write_atomic", "storage writes (original, thumbnail)")
    clock.wrap(ingest, "images_claim", "claim")
    clock.wrap(ingest, "decode", "decode: read file")
    clock.wrap(imaging, "load_image", "decode: JPEG decode (draft), EXIF, RGB")
    clock.wrap(imaging, "make_thumbnail", "thumbnail")
    clock.wrap(ingest, "resize_for", "resize to the CNN's input")
    clock.wrap(extraction, "to_tensor", "inference: to tensor")
    clock.wrap(onnx_runtime.OnnxModel, "__call__", "inference: ONNX Runtime")
    clock.wrap(ingest, "store", "store: batch transaction, statuses")
    clock.wrap(embeddings, "embeddings_store", "store: vectors")
    clock.wrap(tagging, "tags_from_logits", "tagging: labels from logits")
    clock.wrap(tagging, "images_tags_replace", "tagging: tag rows")
    clock.wrap(services, "schedule_augment", "store: schedule augment (Redis)")
    servers_started = _server_cpu()
    started, cpu_started = time.perf_counter(), time.process_time()
    # What imports.import_files does, without its threads (so stages can be told apart) and
    # writing rows one by one (it writes 32 per transaction): the import's row cost is overstated.
    for path in paths:
        services.image_ingest(collection=collection, uploaded_by=owner, name=path.name, queue=None,
                              prepared=imports.file_prepare(path))
    size = ingest.bulk_layout(recipe)[0]
    while jobs := ingest.images_claim(limit=size):
        ingest.store([ingest.decode(job, recipe) for job in jobs], recipe, augment_each=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    servers = _server_cpu() - servers_started
    ready = Image.objects.filter(collection=collection, status="ready").count()
    per_image = {stage: 1000 * seconds / len(paths) for stage, seconds in clock.seconds.items()}
    per_image["other (Python, ORM, loop)"] = 1000 * cpu / len(paths) - sum(per_image.values())
    print(f"{ready}/{len(paths)} ready; runtime {recipe.runtime}, batch {size}")
    print(f"{'stage':<42} {'CPU ms/image':>12}")
    for stage, ms in sorted(per_image.items(), key=lambda item: -item[1]):
        print(f"{stage:<42} {ms:>12.2f}")
    print(f"{'total CPU, this process':<42} {1000 * cpu / len(paths):>12.2f}")
    print(f"{'PostgreSQL and Redis processes':<42} {1000 * servers / len(paths):>12.2f}")
    total = 1000 * (cpu + servers) / len(paths)
    print(f"wall {wall:.1f} s for {len(paths)} images, stages one after another "
          f"({len(paths) / wall:.1f} images/s); at {total:.1f} CPU ms per image, 2 cores allow at most "
          f"{2000 / total:.0f} images/s")
    return per_image


def _server_cpu() -> float:
    """CPU seconds used so far by this run's embedded PostgreSQL (all its backends) and Redis."""
    import psutil
    from django.conf import settings

    pid = int((settings.EMBEDDED.pgdata / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    processes = [postmaster, *postmaster.children(recursive=True)]
    if REDIS is not None:
        processes.append(psutil.Process(REDIS.pid))
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    # A `timeout` (SIGTERM) runs the `finally` blocks that stop the workers, PostgreSQL and Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a folder of images (e.g. Corel-1k); default: generate JPEGs")
    parser.add_argument("--count", type=int, default=1000, help="JPEGs to generate (default 1000)")
    parser.add_argument("--size", default="4000x3000", help="generated JPEG size (default 12 MP)")
    parser.add_argument("--naive-count", type=int, default=100, help="images timed the naive way (rate is per image)")
    parser.add_argument("--no-probe", action="store_true", help="skip the single-upload latency probe")
    parser.add_argument("--bulk-workers", type=int, help="bulk worker processes (default: as manage.py serve)")
    parser.add_argument("--worker-threads", type=int, help="OMP_NUM_THREADS of each bulk worker (default: as serve)")
    parser.add_argument("--stages", type=int, metavar="N",
                        help="instead: CPU time per stage for the first N images, in this process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="simili-bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        if args.folder:
            paths = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
            source, folder = str(args.folder), args.folder
        else:
            width, height = (int(v) for v in args.size.split("x"))
            started = time.perf_counter()
            paths = generate(tmp_path / "photos", args.count, (width, height))
            print(f"generated {len(paths)} {args.size} JPEGs in {time.perf_counter() - started:.0f} s")
            source, folder = f"{len(paths)} generated {args.size} JPEGs", tmp_path / "photos"
        setup(tmp_path / "var")
        from django.conf import settings
        from django.contrib.auth import get_user_model

        owner = get_user_model().objects.create_user("bench")
        import torch

        device = os.environ["EMBEDDING_DEVICE"]
        if device != "cpu" and torch.cuda.is_available():
            device = torch.cuda.get_device_name()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, device {device}; "
              f"EMBED_BATCH_SIZE {settings.EMBED_BATCH_SIZE}, DECODE_THREADS {settings.DECODE_THREADS} "
              "(0: automatic, ingest.bulk_layout)",
              flush=True)
        if args.stages:
            stages(paths[: args.stages], owner)
            _stop()
            return
        elapsed, latencies = batched(folder, paths, owner, tmp_path / "workers.log",
                                     None if args.no_probe else paths[0],
                                     bulk_workers=args.bulk_workers, worker_threads=args.worker_threads)
        naive_paths = paths[: args.naive_count]
        naive_elapsed = naive(naive_paths, owner)
        batched_rate = len(paths) / elapsed
        naive_rate = len(naive_paths) / naive_elapsed
        print()
        print(f"source: {source}")
        print(f"{'pipeline':<10} {'images':>7} {'seconds':>8} {'images/s':>9}")
        print(f"{'batched':<10} {len(paths):>7} {elapsed:>8.1f} {batched_rate:>9.1f}")
        print(f"{'naive':<10} {len(naive_paths):>7} {naive_elapsed:>8.1f} {naive_rate:>9.1f}")
        print(f"batched / naive: {batched_rate / naive_rate:.1f}x")
        if latencies:
            print(f"single upload -> ready during the bulk import: n={len(latencies)}, "
                  f"p50 {statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
                  f"max {max(latencies):.2f} s")
        _stop()


def _stop() -> None:
    from django.conf import settings

    from webapp import embedded

    embedded.stop_process(REDIS)
    embedded.stop_postgres(settings.EMBEDDED)


if __name__ == "__main__":
    main()
