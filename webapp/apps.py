from __future__ import annotations

from django.apps import AppConfig


class SimiliConfig(AppConfig):
    name = "webapp"
    label = "simili"
    verbose_name = "Simili"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from webapp import checks  # noqa: F401  (registers the system checks)
