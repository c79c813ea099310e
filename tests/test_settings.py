"""Settings come from the environment; a malformed value stops start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_settings(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG"}}
    clean.update({"DJANGO_SETTINGS_MODULE": "webapp.settings", **env})
    code = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("SIMILAR_K", "twelve", "SIMILAR_K='twelve' is not an integer"),
        ("SIMILAR_K", "0", "SIMILAR_K=0 is out of range"),
        ("EMBEDDING_DEVICE", "tpu", "EMBEDDING_DEVICE='tpu' is not valid"),
        ("DATABASE_URL", "mysql://localhost/simili", "DATABASE_URL must be a URL starting with one of"),
        ("REDIS_URL", "amqp://localhost", "REDIS_URL must be a URL starting with one of"),
    ],
)
def test_a_malformed_value_stops_start_up_naming_the_variable(variable: str, value: str, expected: str) -> None:
    result = _load_settings(**{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert expected in result.stderr


def test_defaults_fail_closed() -> None:
    result = _load_settings()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_an_unknown_backbone_is_a_system_check_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["EMBEDDING_BACKBONE"] = "vgg-imaginary"
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "simili.E001" in result.stderr
    assert "efficientnet_lite0" in result.stderr


def test_the_web_app_and_the_folder_import_start_without_torch() -> None:
    # torch costs a second of CPU and hundreds of MB per process; only workers embed.
    code = (
        "import sys, django; django.setup();"
        "import webapp.wsgi, webapp.urls, webapp.views, webapp.api, webapp.admin_pages;"
        "from django.core.management import load_command_class;"
        "load_command_class('webapp', 'import_folder');"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:5])"
    )
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, "DJANGO_SETTINGS_MODULE": "webapp.settings"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

    # Running the command, as an operator does (the system checks load backbones with torch).
    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules));"
            "from django.core.management import execute_from_command_line;"
            "execute_from_command_line(['manage.py', 'import_folder', '/nonexistent', '--owner', 'x'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, "DJANGO_SETTINGS_MODULE": "webapp.settings"})
    assert "/nonexistent is not a folder" in result.stderr
    assert result.stdout.strip() == "False"
