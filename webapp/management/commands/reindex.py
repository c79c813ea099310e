"""Re-index every image with the configured recipe (a new backbone, pooling, projection…) in the
background of a running site, then switch searches to it at once with --activate."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from webapp import embeddings, ingest, pipeline
from webapp.models import EmbeddingModel, Image, ImageStatus


class Command(BaseCommand):
    help = "Embed every ready image with the configured recipe; --activate switches searches to it when done."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--activate", action="store_true", help="make the new version active once complete")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        recipe = pipeline.recipe()
        total = Image.objects.filter(status=ImageStatus.READY).count()
        self.stdout.write(f"re-indexing {total} ready image(s) as {recipe.key}")
        with tqdm(total=total, unit="img", disable=options["no_progress"]) as bar:
            version = embeddings.embedding_model_ensure(
                key=recipe.key, backbone=recipe.spec.name, dimensions=recipe.dimensions
            )
            bar.update(embeddings.embedding_model_coverage(version=version)[0])
            tried: set[int] = set()  # an image that fails to decode is tried once, then reported
            while batch := ingest.reindex_batch(version_key=recipe.key, limit=embeddings.REINDEX_BATCH, skip=tried):
                tried.update(batch)
                bar.update(len(batch))
        embeddings.embedding_index_build(version=version)  # once, after the load: faster than growing it
        covered, total = embeddings.embedding_model_coverage(version=version)
        self.stdout.write(f"{version.key}: {covered} of {total} ready image(s) have a vector.")
        active = EmbeddingModel.objects.filter(is_active=True).first()
        if options["activate"] and (active is None or active.pk != version.pk):
            try:
                embeddings.embedding_model_activate(version=version)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(f"searches now use {version.key} (was {active.key if active else 'none'}).")
