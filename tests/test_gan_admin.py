"""A GAN trained on a collection: the command, the staff page with its samples, and re-indexing with it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from PIL import Image as PILImage
from PIL import ImageDraw

from retrieval import gan
from tests.factories import CollectionFactory, ImageFactory
from webapp import gan_runs, storage
from webapp.models import Embedding, EmbeddingModel, ImageStatus

pytestmark = pytest.mark.django_db

TINY = ["--epochs", "2", "--size", "16", "--width", "8", "--batch-size", "4", "--no-progress"]


def _png(colour: tuple[int, int, int], i: int) -> bytes:
    image = PILImage.new("RGB", (60, 40), (240, 240, 235))
    ImageDraw.Draw(image).rectangle((4 * i, 3 * i, 4 * i + 20, 3 * i + 15), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path / "var"
    return settings.VAR_DIR


@pytest.fixture
def collection(owner):
    """A collection of six ready images whose files are stored."""
    collection = CollectionFactory(owner=owner, name="Rectangles")
    for i, colour in enumerate([(200, 30, 30), (30, 160, 60), (40, 60, 210)] * 2):
        image = ImageFactory(collection=collection, mime_type="image/png", width=60, height=40)
        storage.write_atomic(image.file_path, _png(colour, i))
    return collection


def _train(collection) -> str:
    out = io.StringIO()
    call_command("train_gan", f"--collection={collection.key}", *TINY, stdout=out)
    return out.getvalue()


def test_train_gan_learns_from_the_collections_ready_stored_images(collection, var_dir: Path) -> None:
    expected = sorted(str(storage.media_path(path)) for path in collection.images.values_list("file_path", flat=True))
    ImageFactory(collection=collection, status=ImageStatus.FAILED)  # never decoded: not training material
    ImageFactory(collection=collection)  # ready, but its file is gone
    output = _train(collection)

    folder = var_dir / "gan" / collection.key
    meta = gan.read_meta(folder / gan.DISCRIMINATOR_FILE, "dcgan_discriminator")
    assert meta["trained_on"] == expected and len(expected) == 6
    assert meta["source"] == collection.key and "Rectangles" in meta["description"]
    assert (folder / gan.GENERATOR_FILE).is_file() and (folder / "samples" / "epoch-002.png").is_file()
    assert f"EMBEDDING_BACKBONE=gan:{folder / gan.DISCRIMINATOR_FILE} python manage.py reindex --activate" in output
    spec = gan.discriminator_backbone(folder / gan.DISCRIMINATOR_FILE)
    assert spec.name == f"gan:{collection.key}" and "Rectangles" in spec.notes


def test_train_gan_refuses_an_unknown_collection_or_an_empty_one(owner, var_dir: Path) -> None:
    with pytest.raises(CommandError, match="no collection with key 'nope'"):
        call_command("train_gan", "--collection", "nope", *TINY, stdout=io.StringIO())
    empty = CollectionFactory(owner=owner)
    with pytest.raises(CommandError, match="has no ready image to train a GAN on"):
        call_command("train_gan", f"--collection={empty.key}", *TINY, stdout=io.StringIO())
    with pytest.raises(CommandError, match="power-of-two size"):
        call_command("train_gan", f"--collection={empty.key}", "--size", "48", stdout=io.StringIO())


def test_the_gan_page_shows_the_latest_samples_the_losses_and_how_to_reindex(
    collection, var_dir: Path, admin_client_
) -> None:
    _train(collection)
    page = admin_client_.get(reverse("admin_gan", args=[collection.key]))
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    text = page.content.decode()
    samples_url = reverse("admin_gan_samples", args=[collection.key])
    assert f'id="gan-samples" src="{samples_url}"' in text
    assert "Samples after epoch 2" in text
    assert text.count("<tr><td>") == 2  # one row per epoch
    assert f"EMBEDDING_BACKBONE=gan:{var_dir / 'gan' / collection.key / 'discriminator.pt'}" in text

    image = admin_client_.get(samples_url)
    assert image.status_code == 200 and image["Content-Type"] == "image/png" and "no-store" in image["Cache-Control"]
    data = b"".join(image.streaming_content)
    assert data == (var_dir / "gan" / collection.key / "samples" / "epoch-002.png").read_bytes()
    with PILImage.open(io.BytesIO(data)) as grid:
        assert grid.size == gan.grid_side(16)


def test_a_collection_without_a_gan_says_how_to_train_one(collection, var_dir: Path, admin_client_) -> None:
    text = admin_client_.get(reverse("admin_gan", args=[collection.key])).content.decode()
    assert f"python manage.py train_gan --collection={collection.key}" in text and "gan-samples" not in text
    assert admin_client_.get(reverse("admin_gan_samples", args=[collection.key])).status_code == 404
    assert admin_client_.get(reverse("admin_gan", args=["no-such-key"])).status_code == 404


def test_the_gan_pages_and_samples_are_for_staff_only(
    collection, var_dir: Path, owner_client, anonymous_client
) -> None:
    _train(collection)
    for client in (owner_client, anonymous_client):  # the owner too: training runs are the operators' business
        for url in (reverse("admin_gan", args=[collection.key]), reverse("admin_gan_samples", args=[collection.key])):
            response = client.get(url)
            assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_collections_admin_page_links_to_its_gan(collection, admin_client_) -> None:
    page = admin_client_.get(reverse("admin:simili_collection_change", args=[collection.pk])).content.decode()
    assert f'href="{reverse("admin_gan", args=[collection.key])}"' in page


@pytest.mark.django_db(transaction=True)  # a new model version creates its index: no open transaction
def test_the_discriminator_reindexes_the_collection_like_any_model_version(collection, var_dir: Path,
                                                                           settings) -> None:
    _train(collection)
    state = gan_runs.collection_gan_state(collection=collection)
    assert state is not None
    settings.EMBEDDING_BACKBONE = state.backbone
    out = io.StringIO()
    call_command("reindex", "--activate", "--no-progress", stdout=out)
    active = EmbeddingModel.objects.get(is_active=True)
    assert active.backbone == state.backbone
    assert active.dimensions == gan.feature_dim(16, 8)
    assert Embedding.objects.filter(model_version=active).count() == 6
    assert "6 of 6 ready image(s) have a vector" in out.getvalue()
