"""Run only the embedded PostgreSQL and Redis, for `manage.py shell`, `createsuperuser` and friends."""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from webapp import embedded


class Command(BaseCommand):
    help = "Start the embedded PostgreSQL and Redis under var/ and keep them up until Ctrl-C."

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = False

        def request_stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        started_postgres = False
        redis_process = None
        try:
            if settings.EMBEDDED_POSTGRES:
                started_postgres = embedded.start_postgres(settings.EMBEDDED, database="simili")
                self.stdout.write(f"PostgreSQL: {settings.EMBEDDED.database_url('simili')}")
            if settings.EMBEDDED_REDIS:
                redis_process = embedded.start_redis(settings.EMBEDDED)
                self.stdout.write(f"Redis: {settings.EMBEDDED.redis_url()}")
            self.stdout.write(self.style.SUCCESS("Embedded services are up (Ctrl-C stops them)."))
            while not stopping:
                time.sleep(0.5)
        finally:
            embedded.stop_process(redis_process)
            if started_postgres:
                embedded.stop_postgres(settings.EMBEDDED)
