"""Content-addressed media files under MEDIA_ROOT, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from django.conf import settings


def media_path(relative: str) -> Path:
    """Return the absolute path of a stored file, refusing anything outside MEDIA_ROOT."""
    root = Path(settings.MEDIA_ROOT)
    path = (root / relative).resolve()
    if root not in path.parents:
        raise ValueError(f"expected a path inside MEDIA_ROOT, got {relative!r}")
    return path


def content_path(kind: str, sha256: str, extension: str) -> str:
    """Return the relative path for content of `kind` ("originals", "thumbnails") by its hash."""
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError("expected a lowercase hex sha256")
    return f"{kind}/{sha256[:2]}/{sha256[2:4]}/{sha256}.{extension}"


def write_atomic(relative: str, data: bytes) -> None:
    """Write `data` so that readers see either no file or the whole file, never a part."""
    target = media_path(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def delete(relative: str) -> None:
    """Delete a stored file if it exists."""
    if relative:
        media_path(relative).unlink(missing_ok=True)


def write_or_keep(relative: str, data: bytes) -> None:
    """Store content-addressed `data` unless the same file is there; then mark it as just used.

    The media sweeper deletes unreferenced files older than an hour; touching a reused file keeps
    it from being swept between this call and the commit of the row that will reference it.
    """
    path = media_path(relative)
    try:
        os.utime(path)
    except FileNotFoundError:
        write_atomic(relative, data)
