"""Bulk import a folder tree: one collection per sub-folder, or everything into one collection.

Resumable: files already in their collection (same content hash) are skipped, so running the
command again after an interruption picks up where it stopped. Files are read and checked in
threads (`imports.import_files`); images are embedded by the bulk workers in batches, and
`--wait` shows their progress and, at the end, how many failed and why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from webapp import imports, services
from webapp.models import Collection, Image, ImageStatus, Lane, Visibility


class Command(BaseCommand):
    help = "Import images from a folder tree into collections (one per sub-folder, or --collection)."
    # No system checks: the backbone check loads torch (about 1 s of CPU) to validate
    # EMBEDDING_BACKBONE, which an import never uses; serve, check and the workers run it.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("folder", type=Path)
        parser.add_argument("--owner", required=True, help="username that will own new collections")
        parser.add_argument("--collection", help="key of an existing collection to import everything into")
        parser.add_argument("--visibility", choices=list(Visibility.values), default="private")
        parser.add_argument("--wait", action="store_true", help="wait until the workers have embedded everything")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        folder: Path = options["folder"]
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a folder")
        owner = get_user_model().objects.filter(username=options["owner"]).first()
        if owner is None:
            raise CommandError(f"no user named {options['owner']!r}; create it first (make superuser)")
        target = None
        if options["collection"]:
            target = Collection.objects.filter(key=options["collection"]).first()
            if target is None:
                raise CommandError(f"no collection with key {options['collection']!r}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        collections: dict[str, Collection] = {}
        with tqdm(total=len(files), desc="importing", unit="file", disable=options["no_progress"]) as bar:
            summary = imports.import_files(
                ((str(path.relative_to(folder)), path,
                  target or self._collection_for(path, folder, owner, options["visibility"], collections))
                 for path in files),
                owner=owner, on_file=lambda: bar.update(1),
            )
        # Also whatever an interrupted earlier run left pending: batches for the rows beyond this
        # run's own, for which import_files queued batches already.
        leftover = Image.objects.filter(collection__in=self._touched(target, collections), status=ImageStatus.PENDING,
                                        lane=Lane.BULK).count() - summary.accepted
        if leftover > 0:
            services.enqueue_bulk_batches(count=leftover)
        self.stdout.write(
            f"{len(files)} file(s): {summary.accepted} accepted, {summary.duplicates} duplicate(s), "
            f"{len(summary.rejected)} rejected, into {len(self._touched(target, collections))} collection(s)."
        )
        services.images_analyze()
        for name, reason in summary.rejected[:50]:
            self.stdout.write(f"  rejected {name}: {reason}")
        if options["wait"]:
            self._wait(self._touched(target, collections), progress=not options["no_progress"])

    def _collection_for(
        self, path: Path, root: Path, owner: Any, visibility: str, cache: dict[str, Collection]
    ) -> Collection:
        relative = path.relative_to(root)
        name = relative.parts[0] if len(relative.parts) > 1 else root.name
        if name not in cache:
            existing = Collection.objects.filter(owner=owner, name=name).order_by("created_at").first()
            cache[name] = existing or services.collection_create(owner=owner, name=name, visibility=visibility)
        return cache[name]

    @staticmethod
    def _touched(target: Collection | None, collections: dict[str, Collection]) -> list[Collection]:
        return [target] if target is not None else list(collections.values())

    def _wait(self, collections: list[Collection], *, progress: bool) -> None:
        images = Image.objects.filter(collection__in=collections)
        total = images.count()
        with tqdm(total=total, desc="embedding", unit="img", disable=not progress) as bar:
            while True:
                finished = images.filter(status__in=[ImageStatus.READY, ImageStatus.FAILED]).count()
                bar.update(finished - bar.n)
                if finished >= total:
                    break
                time.sleep(0.5)
        failed = images.filter(status=ImageStatus.FAILED).order_by("id")
        self.stdout.write(f"{total - failed.count()} image(s) ready, {failed.count()} failed.")
        for image in failed[:50]:  # a file that passed the import's check but not the worker's decode
            self.stdout.write(f"  failed {image.original_name}: {image.error}")
