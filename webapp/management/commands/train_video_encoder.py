"""Train the recurrent video encoder on a collection's videos (no labels) and encode every video."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from retrieval import video_encoder
from webapp import videos
from webapp.models import Collection


class Command(BaseCommand):
    help = "Train a GRU video encoder on a collection's indexed videos; writes VAR_DIR/video-encoders/."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--collection", required=True, help="the collection's key")
        parser.add_argument("--epochs", type=int, default=video_encoder.DEFAULT_EPOCHS)
        parser.add_argument("--batch-size", type=int, default=video_encoder.DEFAULT_BATCH_SIZE)
        parser.add_argument("--clip-len", type=int, default=video_encoder.DEFAULT_CLIP_LEN,
                            help="frames per training clip")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        collection = Collection.objects.filter(key=options["collection"]).first()
        if collection is None:
            raise CommandError(f"no collection with key {options['collection']!r}")
        try:
            run = videos.encoder_train(
                collection=collection, epochs=options["epochs"], batch_size=options["batch_size"],
                clip_len=options["clip_len"], seed=options["seed"], device=options["device"],
                progress=not options["no_progress"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        first, last = (run.losses[0], run.losses[-1]) if run.losses else (float("nan"), float("nan"))
        self.stdout.write(
            f"trained {run.encoder.key} on {run.encoder.videos_seen} videos of {collection.name}: "
            f"loss {first:.3f} -> {last:.3f}; encoded {run.encoded} videos"
        )
        self.stdout.write(f"checkpoint: {run.encoder.checkpoint_path}")
        self.stdout.write("set VIDEO_ENCODER=gru for similar videos to use it")
