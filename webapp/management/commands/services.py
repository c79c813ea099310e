"""Run only the embedded PostgreSQL and Redis, for `manage.py shell`, `createsuperuser` and friends."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from webapp import embedded


class Command(BaseCommand):
    help = "Start the embedded PostgreSQL and Redis under var/ and keep them up until Ctrl-C."

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = embedded.stop_requested()
        with embedded.servers(settings.EMBEDDED, postgres=settings.EMBEDDED_POSTGRES, redis=settings.EMBEDDED_REDIS,
                              say=self.stdout.write):
            if settings.EMBEDDED_POSTGRES:
                self.stdout.write(f"PostgreSQL: {settings.EMBEDDED.database_url('simili')}")
            if settings.EMBEDDED_REDIS:
                self.stdout.write(f"Redis: {settings.EMBEDDED.redis_url()}")
            self.stdout.write(self.style.SUCCESS("Embedded services are up (Ctrl-C stops them)."))
            while not stopping.wait(0.5):
                pass
