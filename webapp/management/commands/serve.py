"""Run the whole app: embedded PostgreSQL and Redis (unless URLs are given), migrations,
Celery workers (one for the interactive lane, BULK_WORKERS for the bulk lane) and the web
server; Ctrl-C stops every process this command started."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from webapp import embedded


def bulk_worker_layout() -> tuple[int, int | None]:
    """Return (bulk worker processes, CPU threads each; None = the library's default).

    A GPU worker is one process that keeps the device busy with large batches. On CPUs, two
    single-threaded processes on two cores embed 20-30% more images per second than one
    process with two threads (each inference runs alone on its core, with no hand-over between
    threads and no GIL shared with the decode threads; docs/benchmarks.md#ingest).
    """
    cores = os.cpu_count() or 1
    wanted = settings.BULK_WORKERS
    if not wanted:
        gpu = settings.EMBEDDING_DEVICE == "cuda" or (settings.EMBEDDING_DEVICE == "auto" and _cuda_available())
        wanted = 1 if gpu or cores < 2 else 2
    return wanted, (None if wanted == 1 else max(1, cores // wanted))


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class Command(BaseCommand):
    help = "Start Simili (database, Redis, worker and web server) and stop it all on Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--web-workers", type=int, default=2)

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = embedded.stop_requested()
        children: list[subprocess.Popen[bytes]] = []
        with embedded.servers(settings.EMBEDDED, postgres=settings.EMBEDDED_POSTGRES, redis=settings.EMBEDDED_REDIS,
                              say=self.stdout.write):
            try:
                call_command("migrate", interactive=False, verbosity=1)
                call_command("collectstatic", interactive=False, verbosity=0)
                # Two lanes: a user's upload or search never waits behind a bulk import's backlog.
                # -B runs the beat scheduler (the reconciler) inside the bulk worker.
                celery = [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-P", "solo", "--loglevel", "INFO"]
                children.append(subprocess.Popen([*celery, "-Q", "interactive", "-n", "interactive@%h"],
                                                 start_new_session=True))
                schedule = str(settings.VAR_DIR / "celerybeat-schedule")
                processes, threads = bulk_worker_layout()
                for number in range(1, processes + 1):
                    # nice 10: when both lanes want the CPU, a user's upload gets it first. The
                    # first bulk worker also runs the beat scheduler (exactly one must).
                    beat = ["-B", "--schedule", schedule] if number == 1 else []
                    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
                    children.append(subprocess.Popen(
                        ["nice", "-n", "10", *celery, "-Q", "bulk", "-n", f"bulk{number}@%h", *beat],
                        env=env, start_new_session=True,
                    ))
                children.append(subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "webapp.wsgi",
                     "--bind", f"{options['host']}:{options['port']}",
                     "--workers", str(options["web_workers"]), "--threads", "4",
                     "--timeout", str(int(settings.SEARCH_TIMEOUT) + 30), "--access-logfile", "-"],
                    start_new_session=True,
                ))
                url = f"http://{options['host']}:{options['port']}/"
                self.stdout.write(self.style.SUCCESS(f"Simili is running at {url}  (Ctrl-C stops it)"))
                while not stopping.wait(0.5):
                    dead = [child for child in children if child.poll() is not None]
                    if dead:
                        self.stderr.write(f"child process {dead[0].pid} exited with {dead[0].returncode}; stopping.")
                        break
            finally:
                # Worker and web first, then (leaving the with block) Redis and PostgreSQL.
                self.stdout.write("Stopping Simili …")
                for child in children:
                    embedded.stop_process(child, timeout=15)
        self.stdout.write("Stopped.")
