"""Bulk imports (a zip archive, a folder tree) into collections, through the same ingest path as uploads."""

from __future__ import annotations

import logging
import posixpath
import stat
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection

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


#: Rows written before a batch task is queued for them, so the bulk workers start early.
QUEUE_EVERY = 64
#: Rows written per transaction (two statements): one lookup, insert and commit per row cost
#: the import ~1 ms of CPU per image.
WRITE_EVERY = 32


def import_files(
    items: Iterable[tuple[str, Path, Collection]],
    *,
    owner: AbstractBaseUser,
    threads: int | None = None,
    on_file: Callable[[], None] | None = None,
) -> ImportSummary:
    """Import files, each (label for the report, path, collection), for the bulk workers to embed.

    IMPORT_THREADS threads read, check and store the files (`services.image_prepare`; a JPEG
    whose structure is complete is not decoded here: the worker decodes it once, for its
    thumbnail and its vector, and records a failure on the row) while this thread writes the
    rows in order, WRITE_EVERY per transaction, and queues a batch task every QUEUE_EVERY of
    them. Rows commit without waiting for the WAL flush: a crash loses at most the last
    fraction of a second of them, and running the import again adds them (files already in
    their collection are skipped).
    """
    summary = ImportSummary()
    pending: deque[tuple[str, Path, Collection, Future[services.PreparedImage]]] = deque()
    batch: list[tuple[Collection, str, services.PreparedImage]] = []
    unqueued = 0

    def write() -> None:
        nonlocal unqueued
        if not batch:
            return
        try:
            results = services.images_ingest_prepared(items=batch, uploaded_by=owner)
        except ImageRejected:
            # A stored file was deleted meanwhile and its source changed: row by row, so only it fails.
            results = []
            for collection, name, prepared in batch:
                try:
                    results.append(services.image_ingest(collection=collection, uploaded_by=owner, name=name,
                                                         queue=None, prepared=prepared))
                except ImageRejected as exc:
                    summary.rejected.append((name, str(exc)))
        batch.clear()
        created = sum(result.created for result in results)
        summary.accepted += created
        summary.duplicates += len(results) - created
        unqueued += created
        if unqueued >= QUEUE_EVERY:
            services.enqueue_bulk_batches(count=unqueued)
            unqueued = 0

    def finish() -> None:
        label, path, collection, prepared = pending.popleft()
        try:
            batch.append((collection, path.name, prepared.result()))
        except ImageRejected as exc:
            summary.rejected.append((label, str(exc)))
        except OSError as exc:
            summary.rejected.append((label, f"The file could not be read: {exc}"))
        if len(batch) >= WRITE_EVERY:
            write()
        if on_file is not None:
            on_file()

    workers = threads or settings.IMPORT_THREADS
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import") as pool, _commits_unflushed():
        for label, path, collection in items:
            pending.append((label, path, collection, pool.submit(file_prepare, path)))
            if len(pending) >= 4 * workers:  # enough ahead to keep the threads busy, no more in memory
                finish()
        while pending:
            finish()
        write()
    if unqueued:
        services.enqueue_bulk_batches(count=unqueued)
    return summary


def file_prepare(path: Path) -> services.PreparedImage:
    """Read, check and store one file for a bulk import (`services.image_prepare`); thread-safe."""
    services.upload_check_size(size=path.stat().st_size)  # before reading it
    return services.image_prepare(path.read_bytes(), decode=False, source=path)


@contextmanager
def _commits_unflushed() -> Iterator[None]:
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")


def _collection_named(*, owner: AbstractBaseUser, name: str) -> Collection:
    """Return the owner's collection of that name, creating a private one; re-imports add to it."""
    existing = Collection.objects.filter(owner=owner, name=name[:200]).order_by("created_at").first()
    return existing or services.collection_create(owner=owner, name=name[:200], visibility="private")
