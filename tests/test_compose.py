"""docker-compose.yml cannot run here (no Docker engine): check what it names exists in the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from webapp import services

ROOT = Path(__file__).resolve().parent.parent


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_it_has_pgvector_redis_web_and_worker() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"db", "redis", "web", "worker", "worker-interactive", "beat"}
    assert compose["services"]["db"]["image"].startswith("pgvector/pgvector:")
    assert compose["services"]["redis"]["image"].startswith("redis:")
    assert {"pgdata", "media"} <= set(compose["volumes"])
    assert (ROOT / "Dockerfile").is_file()


def test_every_variable_it_sets_is_read_by_settings() -> None:
    settings_source = (ROOT / "webapp" / "settings.py").read_text()
    read = set(re.findall(r'env_\w+\(\s*"([A-Z_]+)"', settings_source))
    read |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', settings_source))
    for name in ("web", "worker", "worker-interactive", "beat"):
        environment = _compose()["services"][name]["environment"]
        assert set(environment) <= read, set(environment) - read
        assert environment["DATABASE_URL"].startswith("postgresql://")
        assert environment["REDIS_URL"].startswith("redis://")


def test_the_commands_name_real_modules_and_queues() -> None:
    compose = _compose()
    web = compose["services"]["web"]["command"]
    module = re.search(r"gunicorn (\S+)", web).group(1)
    assert hasattr(importlib.import_module(module), "application")
    queues = set()
    for name in ("worker", "worker-interactive"):
        worker = compose["services"][name]["command"]
        worker = worker[worker.index("celery"):]  # the bulk lane runs under nice
        app_module = worker[worker.index("-A") + 1]
        assert importlib.import_module(app_module).celery_app.main == "simili"
        queues |= set(worker[worker.index("-Q") + 1].split(","))
    assert queues == {services.INTERACTIVE_QUEUE, services.BULK_QUEUE}
    interactive = compose["services"]["worker-interactive"]["command"]
    assert interactive[interactive.index("-Q") + 1] == services.INTERACTIVE_QUEUE, "the interactive lane is alone"


def test_the_gpu_reservation_lives_in_the_override_only() -> None:
    base = _compose()
    assert "deploy" not in base["services"]["worker"]
    gpu = _compose("docker-compose.gpu.yml")["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["EMBEDDING_DEVICE"] == "cuda"
