"""Bulk import of a zip archive into collections, through the same ingest path as uploads."""

from __future__ import annotations

import logging
import posixpath
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import IO

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from retrieval.errors import ImageRejected
from webapp import services
from webapp.models import Collection

logger = logging.getLogger(__name__)

#: Members read from one archive at most (IMPORT_MAX_MEMBERS overrides it).
DEFAULT_MAX_MEMBERS = 10_000
#: Uncompressed bytes read from one archive at most (IMPORT_MAX_TOTAL_BYTES overrides it): a zip
#: bomb's members declare small sizes or huge ones, and either way reading stops here.
DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3


@dataclass
class ImportSummary:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    collections: list[Collection] = field(default_factory=list)


def _safe_parts(name: str) -> list[str] | None:
    """Return the member's path components, or None for absolute paths and `..`."""
    if name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/", 1)[0]:
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts or posixpath.isabs(name):
        return None
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_noise(parts: list[str]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1].startswith(".")


def import_zip(
    *, fileobj: IO[bytes], owner: AbstractBaseUser, collection: Collection | None = None
) -> ImportSummary:
    """Import every image of a zip: into `collection`, or one private collection per top-level folder.

    Members are read in memory one at a time, never extracted under their client names;
    directories, symlinks, absolute and `..` paths are skipped, and reading stops at the
    member-count and total-size caps. Images at the archive's root need a `collection`.
    """
    max_members = int(getattr(settings, "IMPORT_MAX_MEMBERS", DEFAULT_MAX_MEMBERS))
    max_total = int(getattr(settings, "IMPORT_MAX_TOTAL_BYTES", DEFAULT_MAX_TOTAL_BYTES))
    summary = ImportSummary()
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError) as exc:
        summary.rejected.append(("(archive)", f"Not a readable zip file: {exc}"))
        return summary
    by_name: dict[str, Collection] = {}
    if collection is not None:
        summary.collections.append(collection)
    total = 0
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            summary.rejected.append(("(archive)", f"Only the first {max_members} members were read."))
            members = members[:max_members]
        for info in members:
            name = info.filename
            if info.is_dir():
                continue
            parts = _safe_parts(name)
            if parts is None:
                summary.rejected.append((name, "Unsafe path (absolute or with '..'); skipped."))
                continue
            if _is_noise(parts):
                continue
            if _is_symlink(info):
                summary.rejected.append((name, "Symbolic link; skipped."))
                continue
            if info.file_size > settings.MAX_UPLOAD_BYTES:
                summary.rejected.append((name, f"Larger than {settings.MAX_UPLOAD_BYTES:,} bytes; skipped."))
                continue
            if total + info.file_size > max_total:
                summary.rejected.append((name, f"The archive holds more than {max_total:,} bytes; stopped here."))
                break
            target = collection
            if target is None:
                if len(parts) < 2:
                    summary.rejected.append((name, "Not inside a folder; choose a collection to import loose files."))
                    continue
                target = by_name.get(parts[0])
                if target is None:
                    target = _collection_named(owner=owner, name=parts[0])
                    by_name[parts[0]] = target
                    summary.collections.append(target)
            try:
                with archive.open(info) as handle:
                    # Bounded: zipfile stops at the declared size; the extra byte would notice a lie.
                    data = handle.read(settings.MAX_UPLOAD_BYTES + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
                summary.rejected.append((name, f"Unreadable member (corrupt, encrypted or unsupported): {exc}"))
                continue
            total += len(data)
            try:
                # queue=None: an archive is bulk work; batch tasks are queued once, below.
                result = services.image_ingest(
                    collection=target, uploaded_by=owner, data=data, name=parts[-1], queue=None
                )
            except ImageRejected as exc:
                summary.rejected.append((name, str(exc)))
                continue
            if result.created:
                summary.accepted += 1
            else:
                summary.duplicates += 1
    if summary.accepted:
        try:
            services.enqueue_bulk_batches(count=summary.accepted)
        except Exception as exc:  # noqa: BLE001 - rows stay pending; the reconciler queues them
            logger.warning("zip import could not queue its batch tasks: %s", exc)
        services.images_analyze()
    logger.info("zip import by %s: %s accepted, %s duplicates, %s rejected",
                owner, summary.accepted, summary.duplicates, len(summary.rejected))
    return summary


def _collection_named(*, owner: AbstractBaseUser, name: str) -> Collection:
    """Return the owner's collection of that name, creating a private one; re-imports add to it."""
    existing = Collection.objects.filter(owner=owner, name=name[:200]).order_by("created_at").first()
    return existing or services.collection_create(owner=owner, name=name[:200], visibility="private")
