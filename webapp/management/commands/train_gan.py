"""Train a DCGAN on a collection's images (no labels): its discriminator becomes a backbone to
re-index with, its sample grids are shown on the collection's GAN admin page."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from retrieval import gan
from webapp import gan_runs
from webapp.models import Collection


class Command(BaseCommand):
    help = "Train a DCGAN on a collection's ready images; writes VAR_DIR/gan/<key>/."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--collection", required=True, help="the collection's key")
        parser.add_argument("--epochs", type=int, default=gan.EPOCHS)
        parser.add_argument("--size", type=int, default=gan.DEFAULT_SIZE, help="image side, a power of two")
        parser.add_argument("--width", type=int, default=gan.WIDTH, help="channels of the first D block")
        parser.add_argument("--batch-size", type=int, default=gan.BATCH_SIZE)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        collection = Collection.objects.filter(key=options["collection"]).first()
        if collection is None:
            raise CommandError(f"no collection with key {options['collection']!r}")
        try:
            gan.check_size(options["size"])
            run = gan_runs.collection_gan_train(
                collection=collection,
                epochs=options["epochs"],
                size=options["size"],
                width=options["width"],
                batch_size=options["batch_size"],
                seed=options["seed"],
                device=options["device"],
                progress=not options["no_progress"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        last = {name: values[-1] for name, values in run.history.columns.items()}
        self.stdout.write(
            f"trained on {collection.name} ({collection.key}) in {run.seconds:.0f} s: "
            f"epoch {last['epoch']:.0f}, D loss {last['d_loss']:.3f}, G loss {last['g_loss']:.3f}"
        )
        self.stdout.write(f"samples: {run.samples}")
        self.stdout.write(
            f"re-index with its discriminator: EMBEDDING_BACKBONE=gan:{run.discriminator} "
            "python manage.py reindex --activate"
        )
