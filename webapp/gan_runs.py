"""A DCGAN trained on one collection's images: where its files live, training it, and reading its state.

The files live under VAR_DIR/gan/<collection key>/ (generator, discriminator, history, sample
grids); the discriminator is the backbone `gan:<that folder>/discriminator.pt`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from webapp import storage
from webapp.models import Collection, ImageStatus

if TYPE_CHECKING:
    from retrieval import gan

logger = logging.getLogger(__name__)


def gan_dir(*, collection: Collection) -> Path:
    """Return the folder of the collection's GAN (the key is URL-safe base64: no separators)."""
    return Path(settings.VAR_DIR) / "gan" / collection.key


def collection_image_paths(*, collection: Collection) -> list[Path]:
    """Return the stored original of every ready image of the collection whose file is present."""
    paths = []
    for relative in collection.images.filter(status=ImageStatus.READY).order_by("pk").values_list(
        "file_path", flat=True
    ):
        path = storage.media_path(relative)
        if path.is_file():
            paths.append(path)
        else:
            logger.warning("GAN training skips %s: the file is missing", relative)
    return paths


def collection_gan_train(
    *,
    collection: Collection,
    epochs: int | None = None,
    size: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> gan.GanRun:
    """Train a DCGAN on the collection's ready images, writing into `gan_dir`; no labels needed.

    Unset sizes take `retrieval.gan`'s defaults. torch is imported here, not with the module,
    so that the web app loads it only if an admin opens a GAN page.
    """
    from retrieval import gan

    paths = collection_image_paths(collection=collection)
    if not paths:
        raise ValueError(f"collection {collection.key} has no ready image to train a GAN on")
    return gan.train_dcgan(
        paths,
        gan_dir(collection=collection),
        size=gan.DEFAULT_SIZE if size is None else size,
        width=gan.WIDTH if width is None else width,
        epochs=gan.EPOCHS if epochs is None else epochs,
        batch_size=gan.BATCH_SIZE if batch_size is None else batch_size,
        seed=seed,
        source=collection.key,
        description=f"collection “{collection.name}” ({collection.key})",
        device=device,
        progress=progress,
    )


@dataclass(frozen=True)
class GanState:
    """What the admin page shows: the run's settings, its per-epoch losses, and how to use it."""

    config: dict
    rows: list[dict[str, float]]
    samples: Path
    backbone: str


def collection_gan_state(*, collection: Collection) -> GanState | None:
    """Return the state of the collection's GAN, or None when none was trained."""
    from retrieval import gan  # torch, for the admin's GAN pages only

    folder = gan_dir(collection=collection)
    saved = gan.read_history(folder)
    if saved is None:
        return None
    columns = saved["history"]
    rows = [{name: values[i] for name, values in columns.items()} for i in range(len(columns.get("epoch", [])))]
    return GanState(
        config=saved["config"],
        rows=rows,
        samples=folder / gan.SAMPLES_FILE,
        backbone=f"gan:{folder / gan.DISCRIMINATOR_FILE}",
    )
