"""Load-test Simili's similar-image pages and API with concurrent clients; exit 1 on any error.

By default it starts its own Simili (`manage.py serve`) with SIMILI_VAR_DIR in a temporary
directory, so var/ is never touched, seeds ~60 photos through the public API, runs timed phases
and stops the server with Ctrl-C's SIGINT. Every phase is compared with a static file served by
the same server in the same run, the floor of what the web stack can do on this machine.

    .venv/bin/python bench/load.py                      # own server, 8 clients, 15 s per phase
    .venv/bin/python bench/load.py --url https://simili.example --token sim_...   # a deployment

Against a deployment it creates a public collection with the token, uploads the photos, runs the
phases and deletes the collection. Its rate limits apply there (uploads are batched to stay
under the default RATE_LIMIT_UPLOAD; keep --search-requests under RATE_LIMIT_SEARCH).
Only plain HTTP(S) requests are sent; every loop is bounded by a request count and a deadline.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STATIC_PATH = "/static/css/simili.css"
MAX_DURATION_S = 120  # per phase; a benchmark that runs longer is a mistake, not a measurement
MAX_REQUESTS_PER_PHASE = 200_000
REQUEST_TIMEOUT_S = 30
STARTUP_TIMEOUT_S = 240  # first start runs initdb, migrations, collectstatic and loads the CNN
READY_TIMEOUT_S = 600
UPLOAD_BATCH = 10  # files per request: 6 requests for 60 photos, far under RATE_LIMIT_UPLOAD's 60/60
# scikit-image's bundled photographs (no download needed); `cat` is `chelsea` again, so it is left out.
SKIMAGE_PHOTOS = [
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "coins", "moon", "clock", "brick", "colorwheel", "camera", "gravel", "grass",
]


# --- HTTP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    token: str

    @classmethod
    def from_url(cls, url: str, token: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise SystemExit(f"--url: expected http(s)://host[:port], got {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), token)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=REQUEST_TIMEOUT_S)


def request(
    target: Target, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
    auth: bool = False, conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """Send one request (on `conn` when given, kept alive) and return its status and body."""
    own = conn is None
    conn = conn or target.connect()
    sent = dict(headers or {})
    if auth:
        sent["Authorization"] = f"Bearer {target.token}"
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def api_json(target: Target, method: str, path: str, *, expect: int, **kwargs: object) -> dict:
    status, body = request(target, method, path, **kwargs)  # type: ignore[arg-type]
    if status != expect:
        raise SystemExit(f"{method} {path}: expected {expect}, got {status}: {body[:500]!r}")
    return json.loads(body) if body else {}


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Encode (field, filename, JPEG bytes) parts as multipart/form-data; return body and content type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data in fields:
        out.write(f"--{boundary}\r\n".encode())
        out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
        out.write(b"Content-Type: image/jpeg\r\n\r\n")
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# --- the server under test --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    var_dir: Path
    port: int
    web_workers: int
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.var_dir / "serve.log"

    def start(self) -> None:
        inherited = {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        self.env = {k: v for k, v in os.environ.items() if k not in inherited}
        self.env.update({
            "SIMILI_VAR_DIR": str(self.var_dir),
            # Rate limits would turn the search phase and the seeding into 429s; the benchmark
            # measures the server, not the limiter, so both are disabled here (0 = unlimited).
            "RATE_LIMIT_SEARCH": "0/1",
            "RATE_LIMIT_UPLOAD": "0/1",
        })
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port), "--web-workers", str(self.web_workers)],
            cwd=ROOT, env=self.env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it; SIGINT reaches all
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        target = Target("http", "127.0.0.1", self.port, "")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"manage.py serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if request(target, "GET", "/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"no home page on port {self.port} within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def create_token(self) -> str:
        code = (
            "from django.contrib.auth import get_user_model; from webapp import services; "
            "u = get_user_model().objects.create_user(username='loadbench', password=None); "
            "print(services.api_token_create(user=u, name='bench/load.py')[1])"
        )
        out = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=self.env,
            capture_output=True, text=True, timeout=120, check=False,
        )
        tokens = re.findall(r"^sim_\S+$", out.stdout, re.MULTILINE)
        if out.returncode != 0 or not tokens:
            raise SystemExit(f"could not create a token:\n{out.stdout}\n{out.stderr}")
        return tokens[-1]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole group
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def processes(self) -> list[psutil.Process]:
        """The serve command, and PostgreSQL and Redis (started detached, found by their directory)."""
        roots = [psutil.Process(self.process.pid)] if self.process and self.process.poll() is None else []
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.var_dir) in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        return roots

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def problems(self, limit: int = 30) -> list[str]:
        """Lines of the server log that show a failure: 5xx in the access log, tracebacks, errors."""
        if not self.log.exists():
            return []
        pattern = re.compile(r'" 5\d\d |Traceback|\bERROR\b|CRITICAL|WORKER TIMEOUT|\[CRITICAL\]')
        return [line for line in self.log.read_text(errors="replace").splitlines() if pattern.search(line)][:limit]


# --- seeding ------------------------------------------------------------------------------------


def photos(count: int) -> Iterator[tuple[str, bytes]]:
    """Yield `count` distinct JPEGs: scikit-image's photos and flipped, cropped, scaled, rotated variants."""
    import numpy as np
    import skimage.data
    from PIL import Image

    variants: list[tuple[str, Callable[[Image.Image], Image.Image]]] = [
        ("orig", lambda im: im),
        ("flip", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("crop", lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8))),
        ("half", lambda im: im.resize((max(im.width // 2, 32), max(im.height // 2, 32)))),
        ("rot90", lambda im: im.transpose(Image.Transpose.ROTATE_90)),
    ]
    made = 0
    for variant, transform in variants:
        for name in SKIMAGE_PHOTOS:
            if made == count:
                return
            array = getattr(skimage.data, name)()
            if array.dtype != np.uint8:
                array = (array > 0).astype(np.uint8) * 255
            image = transform(Image.fromarray(array).convert("RGB"))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            made += 1
            yield f"{name}-{variant}.jpg", out.getvalue()


def seed(target: Target, count: int) -> tuple[str, list[str], bytes]:
    """Create a public collection, upload `count` photos, wait until all are ready.

    Returns the collection key, the ready image keys and a photo for the search phase.
    """
    collection = api_json(target, "POST", "/api/v1/collections", expect=201, auth=True,
                          body=json.dumps({"name": "Load benchmark", "visibility": "public"}).encode(),
                          headers={"Content-Type": "application/json"})
    key = collection["key"]
    files = list(photos(count))
    started = time.monotonic()
    for i in range(0, len(files), UPLOAD_BATCH):
        body, content_type = multipart([("files", n, data) for n, data in files[i:i + UPLOAD_BATCH]])
        result = api_json(target, "POST", f"/api/v1/collections/{key}/images", expect=202, auth=True,
                          body=body, headers={"Content-Type": content_type})
        rejected = [r for r in result["results"] if r["outcome"] != "accepted"]
        if rejected:
            raise SystemExit(f"upload: not accepted: {rejected}")
    print(f"uploaded {len(files)} photos in {time.monotonic() - started:.1f} s; waiting for the worker …")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        page = api_json(target, "GET", f"/api/v1/collections/{key}/images?page_size=500", expect=200, auth=True)
        statuses = Counter(item["status"] for item in page["items"])
        if statuses["failed"]:
            failed = [(i["name"], i["error"]) for i in page["items"] if i["status"] == "failed"]
            raise SystemExit(f"the worker failed images: {failed}")
        if statuses["ready"] == len(files):
            ready = api_json(target, "GET", f"/api/v1/collections/{key}/images?status=ready&page_size=500",
                             expect=200, auth=True)
            print(f"all {ready['count']} ready {time.monotonic() - started:.1f} s after the first upload")
            return key, [item["key"] for item in ready["items"]], files[0][1]
        if time.monotonic() > deadline:
            raise SystemExit(f"not all ready within {READY_TIMEOUT_S} s: {dict(statuses)}")
        time.sleep(1)


# --- load phases --------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    describe: str
    make: Callable[[random.Random], tuple[str, str, bytes | None, dict[str, str]]]  # method, path, body, headers
    clients: int
    max_requests: int = MAX_REQUESTS_PER_PHASE
    auth: bool = False


@dataclass
class Result:
    phase: Phase
    wall_s: float
    latencies_ms: list[float]
    errors: Counter[str]
    server_cpu: float  # percent of all cores, for each group of processes
    client_cpu: float
    other_cpu: float

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _tree_cpu_s(roots: list[psutil.Process]) -> dict[int, float]:
    seen: dict[int, float] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                cpu = proc.cpu_times()
                seen[proc.pid] = cpu.user + cpu.system
        except psutil.Error:
            continue
    return seen


def run_phase(
    target: Target, phase: Phase, duration: float, server_roots: Callable[[], list[psutil.Process]]
) -> Result:
    """Run `phase.clients` keep-alive clients until the deadline or the request budget is spent."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    budget = iter(range(phase.max_requests))
    deadline = time.monotonic() + duration

    def client(seed_: int) -> None:
        rng = random.Random(seed_)
        conn = target.connect()
        mine: list[float] = []
        try:
            while time.monotonic() < deadline:
                with lock:
                    if next(budget, None) is None:
                        break
                method, path, body, headers = phase.make(rng)
                began = time.perf_counter()
                try:
                    status, _ = request(target, method, path, body=body, headers=headers, auth=phase.auth, conn=conn)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    conn.close()
                    conn = target.connect()
                    continue
                elapsed = (time.perf_counter() - began) * 1000
                if 200 <= status < 300:
                    mine.append(elapsed)
                else:
                    with lock:
                        errors[f"HTTP {status} {method} {re.sub(r'/[A-Za-z0-9_-]{8,}', '/{key}', path)}"] += 1
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    busy_before, server_before, cpu_before = _busy_s(), _tree_cpu_s(server_roots()), time.process_time()
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(phase.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + REQUEST_TIMEOUT_S + 5)
    wall = time.monotonic() - began
    server_after = _tree_cpu_s(server_roots())
    server = sum(t - server_before.get(pid, 0.0) for pid, t in server_after.items())
    client = time.process_time() - cpu_before
    capacity = wall * (psutil.cpu_count() or 1) / 100
    # Whatever else ran on the machine meanwhile competed with the server: shown, not hidden.
    other = max(_busy_s() - busy_before - server - client, 0.0)
    return Result(phase, wall, latencies, errors, server / capacity, client / capacity, other / capacity)


def phases(keys: list[str], photo: bytes, clients: int, search_requests: int) -> list[Phase]:
    def get(path: str) -> Callable[[random.Random], tuple[str, str, bytes | None, dict[str, str]]]:
        return lambda rng: ("GET", path.format(key=rng.choice(keys)), None, {})

    body, content_type = multipart([("image", "query.jpg", photo)])
    result = [
        Phase("static", f"GET {STATIC_PATH} (baseline)", get(STATIC_PATH), clients),
        Phase("page", "GET /i/{key}/ (similar-image page, anonymous)", get("/i/{key}/"), clients),
        Phase("thumbnail", "GET /media/i/{key}/thumbnail", get("/media/i/{key}/thumbnail"), clients),
        Phase("api", "GET /api/v1/images/{key}/similar?k=12 (anonymous)",
              get("/api/v1/images/{key}/similar?k=12"), clients),
        Phase("api+token", "the same with a Bearer token", get("/api/v1/images/{key}/similar?k=12"), clients,
              auth=True),
    ]
    if search_requests:
        # Each search is one CNN forward pass on the single worker: a few clients saturate it.
        result.append(Phase("search", f"POST /api/v1/search (at most {search_requests} requests)",
                            lambda rng: ("POST", "/api/v1/search", body, {"Content-Type": content_type}),
                            min(clients, 2), max_requests=search_requests))
    return result


def report(results: list[Result]) -> str:
    base = results[0]
    header = (f"| {'phase':<10} | {'requests':>8} | {'errors':>6} | {'req/s':>7} | {'p50 ms':>7} | {'p95 ms':>7} "
              f"| {'p99 ms':>7} | {'p50 ×static':>11} | {'req/s ×static':>13} | {'server cpu %':>12} "
              f"| {'client cpu %':>12} | {'other cpu %':>11} |")
    widths = [len(cell) for cell in header.split("|")[1:-1]]
    # Left-aligned first column, right-aligned numbers: a Markdown table that reads well as text too.
    rule = "|" + "|".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + "|"
    lines = [header, rule]
    for r in results:
        lines.append(
            f"| {r.phase.name:<10} | {r.requests:>8} | {sum(r.errors.values()):>6} | {r.rps:>7.1f} "
            f"| {r.pct(50):>7.1f} | {r.pct(95):>7.1f} | {r.pct(99):>7.1f} "
            f"| {r.pct(50) / base.pct(50):>11.1f} | {r.rps / base.rps if base.rps else 0:>13.3f} "
            f"| {r.server_cpu:>12.0f} | {r.client_cpu:>12.0f} | {r.other_cpu:>11.0f} |"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


@contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[Target, LocalServer | None]]:
    if args.url:
        if not args.token:
            raise SystemExit("--url needs --token (an API token of a user who may create collections)")
        yield Target.from_url(args.url, args.token), None
        return
    var_dir = Path(tempfile.mkdtemp(prefix="simili-load-"))
    local = LocalServer(var_dir, args.port or _free_port(), args.web_workers)
    try:
        print(f"starting Simili on 127.0.0.1:{local.port} with {args.web_workers} web workers, "
              f"SIMILI_VAR_DIR={var_dir} …")
        started = time.monotonic()
        local.start()
        print(f"up in {time.monotonic() - started:.1f} s")
        yield Target("http", "127.0.0.1", local.port, local.create_token()), local
    finally:
        local.stop()
        if args.keep:
            print(f"kept {var_dir} (server log: {local.log})")
        else:
            shutil.rmtree(var_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running Simili (default: start one in a temporary directory)")
    parser.add_argument("--token", help="API token for --url; it creates and deletes one public collection")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients per phase (default 8)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help=f"seconds per phase (default 15, at most {MAX_DURATION_S})")
    parser.add_argument("--images", type=int, default=60, help="photos to upload (default 60)")
    parser.add_argument("--search-requests", type=int, default=20,
                        help="POST /api/v1/search requests in the last phase, 0 to skip (default 20)")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn workers of the own server (default 2)")
    parser.add_argument("--port", type=int, default=0, help="port of the own server (default: a free one)")
    parser.add_argument("--keep", action="store_true", help="keep the own server's temporary directory and log")
    args = parser.parse_args()
    if not 1 <= args.clients <= 256:
        parser.error("--clients: expected 1 to 256")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration: expected more than 0 and at most {MAX_DURATION_S} seconds")
    if not 1 <= args.images <= len(SKIMAGE_PHOTOS) * 5:
        parser.error(f"--images: expected 1 to {len(SKIMAGE_PHOTOS) * 5}")
    if not 0 <= args.search_requests <= 1000:
        parser.error("--search-requests: expected 0 to 1000")

    with server(args) as (target, local):
        key, keys, photo = seed(target, args.images)
        results = []
        try:
            for phase in phases(keys, photo, args.clients, args.search_requests):
                print(f"phase {phase.name}: {phase.describe}, {phase.clients} clients, {args.duration:g} s …",
                      flush=True)
                results.append(run_phase(target, phase, args.duration, local.processes if local else list))
        finally:
            if args.url:
                request(target, "DELETE", f"/api/v1/collections/{key}", auth=True)
        print()
        print(f"{args.clients} clients, {args.duration:g} s per phase, {len(keys)} ready images, "
              f"{psutil.cpu_count()} CPUs, target {target.base}; cpu % = share of all CPUs"
              + ("" if local else " (server cpu is not seen on a remote target)"))
        print(report(results))
        failed = [r for r in results if r.errors]
        for r in failed:
            print(f"\nerrors in {r.phase.name}:")
            for what, n in r.errors.most_common(20):
                print(f"  {n:>6} × {what}")
        if local is not None:
            problems = local.problems()
            if problems:
                print("\nserver log lines that show a failure (first 30):")
                print("\n".join(f"  {line}" for line in problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
