"""Run the whole app: embedded PostgreSQL and Redis (unless URLs are given), migrations,
a Celery worker and the web server; Ctrl-C stops every process this command started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from webapp import embedded


class Command(BaseCommand):
    help = "Start Simili (database, Redis, worker and web server) and stop it all on Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--web-workers", type=int, default=2)

    def handle(self, *args: Any, **options: Any) -> None:
        started_postgres = False
        redis_process: subprocess.Popen[bytes] | None = None
        children: list[subprocess.Popen[bytes]] = []
        stopping = False

        def request_stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        try:
            if settings.EMBEDDED_POSTGRES:
                self.stdout.write(f"Starting embedded PostgreSQL in {settings.EMBEDDED.pgdata} …")
                started_postgres = embedded.start_postgres(settings.EMBEDDED, database="simili")
            if settings.EMBEDDED_REDIS:
                self.stdout.write(f"Starting embedded Redis in {settings.EMBEDDED.redis_dir} …")
                redis_process = embedded.start_redis(settings.EMBEDDED)
            call_command("migrate", interactive=False, verbosity=1)
            call_command("collectstatic", interactive=False, verbosity=0)
            # Two lanes: a user's upload or search never waits behind a bulk import's backlog.
            # -B runs the beat scheduler (the reconciler) inside the bulk worker.
            celery = [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-P", "solo", "--loglevel", "INFO"]
            children.append(subprocess.Popen([*celery, "-Q", "interactive", "-n", "interactive@%h"],
                                             start_new_session=True))
            schedule = str(settings.VAR_DIR / "celerybeat-schedule")
            # nice 10: when both lanes want the CPU, a user's upload gets it first.
            children.append(subprocess.Popen(["nice", "-n", "10", *celery, "-Q", "bulk", "-n", "bulk@%h", "-B",
                                              "--schedule", schedule], start_new_session=True))
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "webapp.wsgi",
                     "--bind", f"{options['host']}:{options['port']}",
                     "--workers", str(options["web_workers"]), "--threads", "4",
                     "--timeout", str(int(settings.SEARCH_TIMEOUT) + 30),
                     "--access-logfile", "-"],
                    start_new_session=True,
                )
            )
            url = f"http://{options['host']}:{options['port']}/"
            self.stdout.write(self.style.SUCCESS(f"Simili is running at {url}  (Ctrl-C stops it)"))
            while not stopping:
                dead = [child for child in children if child.poll() is not None]
                if dead:
                    child = dead[0]
                    self.stderr.write(f"child process {child.pid} exited with {child.returncode}; stopping.")
                    break
                time.sleep(0.5)
        finally:
            self.stdout.write("Stopping Simili …")
            for child in children:
                embedded.stop_process(child, timeout=15)
            embedded.stop_process(redis_process)
            if started_postgres:
                embedded.stop_postgres(settings.EMBEDDED)
            self.stdout.write("Stopped.")
