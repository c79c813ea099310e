"""System checks: configuration mistakes surface at start-up with a stable id and a hint."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register


@register()
def check_backbone(app_configs: Any, **kwargs: Any) -> list[Error]:
    from retrieval.backbones import available_backbones, get_backbone
    from retrieval.errors import UnknownBackbone

    names = available_backbones()
    name = settings.EMBEDDING_BACKBONE
    if name.startswith("small_cnn:") and name.endswith(".pt"):
        from pathlib import Path

        if Path(name.removeprefix("small_cnn:")).is_file():
            return []
        return [Error(f"EMBEDDING_BACKBONE names a small-CNN checkpoint that does not exist: {name}",
                      hint="Train one with python -m retrieval.train FOLDER --method cnn.", id="simili.E002")]
    try:
        get_backbone(settings.EMBEDDING_BACKBONE)  # registry names, or torchvision:ARCH / timm:ARCH
    except (UnknownBackbone, ValueError):
        return [
            Error(
                f"EMBEDDING_BACKBONE={settings.EMBEDDING_BACKBONE!r} is not a registered backbone.",
                hint=f"Use one of: {', '.join(names)}, or torchvision:ARCH / timm:ARCH with local weights.",
                id="simili.E001",
            )
        ]
    return []
