"""`manage.py serve` (what `make serve` runs): one command starts everything; Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from webapp import embedded
from webapp.management.commands.serve import bulk_worker_layout

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(var_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    env["SIMILI_VAR_DIR"] = str(var_dir)
    return subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--web-workers", "1"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal gives it
    )


def _wait_for_page(url: str, process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no page at {url} within 120 s:\n{log.read_text()[-3000:]}")


def _kill_everything(process: subprocess.Popen[bytes]) -> None:
    """After a failed assertion: serve's children run in their own sessions, so killing serve's
    process group alone would leave workers, PostgreSQL and Redis running."""
    if process.poll() is not None:
        return
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    os.killpg(process.pid, signal.SIGKILL)


def _ctrl_c(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
    process.wait(timeout=60)
    return descendants


@pytest.mark.worker
def test_serve_starts_everything_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    layout = embedded.Layout(var_dir)
    port = _free_port()
    log = tmp_path / "serve.log"

    process = _start(var_dir, port, log)
    try:
        page = _wait_for_page(f"http://127.0.0.1:{port}/", process, log)
        assert "Collections" in page
        assert f"Simili is running at http://127.0.0.1:{port}/" in log.read_text()
        assert embedded.postgres_running(layout)
        assert embedded.redis_running(layout)
        workers = [p for p in psutil.Process(process.pid).children()  # not -B's own beat process
                   if "celery" in " ".join(p.cmdline()) and "worker" in p.cmdline()]
        assert workers, "no Celery worker was started"
        bulk = [p for p in workers if "bulk" in p.cmdline()]
        expected, threads = bulk_worker_layout()
        assert len(bulk) == expected and sum("-B" in p.cmdline() for p in bulk) == 1  # one beat scheduler
        if threads:
            assert {p.environ().get("OMP_NUM_THREADS") for p in bulk} == {str(threads)}
        descendants = _ctrl_c(process)
    finally:
        _kill_everything(process)
    assert process.returncode == 0
    time.sleep(1)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants)
    assert not embedded.postgres_running(layout)
    assert not embedded.redis_running(layout)

    # Running it again reuses the data: no second initdb, same database.
    process = _start(var_dir, port, log)
    try:
        _wait_for_page(f"http://127.0.0.1:{port}/", process, log)
        assert "initialising embedded PostgreSQL" not in log.read_text()
        _ctrl_c(process)
    finally:
        _kill_everything(process)
    assert not embedded.postgres_running(layout)


def test_bulk_workers_are_one_on_a_gpu_and_share_the_cores_otherwise(settings, monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    settings.BULK_WORKERS = 0
    settings.EMBEDDING_DEVICE = "cpu"
    assert bulk_worker_layout() == (2, 4)
    settings.EMBEDDING_DEVICE = "cuda"
    assert bulk_worker_layout() == (1, None)
    settings.BULK_WORKERS = 3
    assert bulk_worker_layout() == (3, 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    settings.BULK_WORKERS = 0
    settings.EMBEDDING_DEVICE = "cpu"
    assert bulk_worker_layout() == (1, None)
