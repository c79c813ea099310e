"""The bulk lane's decode and store: JPEGs decoded no larger than needed, a batch marked ready at once."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.factories import CollectionFactory, ImageFactory, embed, unit_vector
from webapp import ingest, pipeline, storage
from webapp.models import Embedding, Image, ImageStatus


def _stored_jpeg(size: tuple[int, int]) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, (90, 140, 200)).save(buffer, format="JPEG", quality=80)
    data = buffer.getvalue()
    relative = storage.content_path("originals", hashlib.sha256(data).hexdigest(), "jpg")
    storage.write_atomic(relative, data)
    return relative, data


def test_a_large_jpeg_is_decoded_just_large_enough_for_thumbnail_and_cnn(settings) -> None:
    recipe = pipeline.recipe()
    relative, _ = _stored_jpeg((4000, 3000))
    job = ingest.Job(image_id=1, collection_id=1, sha256="0" * 64, file_path=relative, width=4000, height=3000)
    # The thumbnail (400 px on the long side) needs a short side of 300, the CNN one of 224.
    assert ingest.decode_min_side(job, recipe) == 300
    decoded = ingest.decode(job, recipe)
    assert decoded.error == "" and decoded.picture is not None and decoded.thumbnail is not None
    assert decoded.picture.size == (299, 224)
    assert PILImage.open(io.BytesIO(decoded.thumbnail)).size == (settings.THUMBNAIL_SIZE, 300)


def test_a_small_or_unmeasured_image_keeps_the_full_decode_floor() -> None:
    recipe = pipeline.recipe()
    corel = ingest.Job(image_id=1, collection_id=1, sha256="0" * 64, file_path="x", width=384, height=256)
    assert ingest.decode_min_side(corel, recipe) == 267  # larger than the image: no draft scaling
    unknown = ingest.Job(image_id=1, collection_id=1, sha256="0" * 64, file_path="x")
    assert ingest.decode_min_side(unknown, recipe) == 400


def test_the_bulk_layout_is_measured_per_device_unless_set(settings, monkeypatch) -> None:
    from types import SimpleNamespace

    settings.EMBED_BATCH_SIZE, settings.DECODE_THREADS = 0, 0
    monkeypatch.setattr(ingest.os, "sched_getaffinity", lambda pid: set(range(16)))
    cpu, gpu = (SimpleNamespace(extractor=SimpleNamespace(cuda=cuda)) for cuda in (False, True))
    assert ingest.bulk_layout(cpu) == (ingest.CPU_BATCH, 2)
    assert ingest.bulk_layout(gpu) == (ingest.GPU_BATCH, 14)  # every core but inference's and storage's decodes
    monkeypatch.setattr(ingest.os, "sched_getaffinity", lambda pid: set(range(128)))
    assert ingest.bulk_layout(gpu) == (ingest.GPU_BATCH, 32)
    settings.EMBED_BATCH_SIZE, settings.DECODE_THREADS = 48, 3
    assert ingest.bulk_layout(gpu) == ingest.bulk_layout(cpu) == (48, 3)


@pytest.mark.django_db
def test_a_batch_is_marked_ready_with_each_images_own_thumbnail(owner) -> None:
    collection = CollectionFactory(owner=owner)
    images = [ImageFactory(collection=collection, status=ImageStatus.PROCESSING, error="old") for _ in range(3)]
    other = ImageFactory(collection=collection, status=ImageStatus.PROCESSING)
    ingest.images_mark_ready({image.pk: f"thumbnails/{image.pk}.jpg" for image in images})
    for image in images:
        image.refresh_from_db()
        expected = (ImageStatus.READY, "", f"thumbnails/{image.pk}.jpg")
        assert (image.status, image.error, image.thumbnail_path) == expected
        assert image.processed_at is not None
    assert Image.objects.get(pk=other.pk).status == ImageStatus.PROCESSING


@pytest.mark.django_db
def test_an_image_moved_while_it_was_embedded_is_stored_in_its_new_collection(owner) -> None:
    source, target = CollectionFactory(owner=owner), CollectionFactory(owner=owner)
    relative, data = _stored_jpeg((640, 480))
    image = ImageFactory(collection=source, status=ImageStatus.PROCESSING, file_path=relative,
                         sha256=hashlib.sha256(data).hexdigest(), width=640, height=480)
    job = ingest.Job(image_id=image.pk, collection_id=source.pk, sha256=image.sha256, file_path=relative,
                     width=640, height=480)
    decoded = ingest.decode(job, pipeline.recipe())
    Image.objects.filter(pk=image.pk).update(collection=target)  # an admin's Move, mid-embedding
    embed(ImageFactory(collection=source), unit_vector(3))  # an old neighbour to average in

    assert ingest.store([decoded], pipeline.recipe(), augment_each=True) == 1

    row = Embedding.objects.get(image=image)
    assert row.collection_id == target.pk
    np.testing.assert_allclose(np.asarray(row.augmented, dtype=np.float32), np.asarray(row.vector), atol=1e-3)


@pytest.mark.django_db
def test_an_image_that_breaks_its_decode_fails_alone_with_the_reason(owner, monkeypatch) -> None:
    """An unexpected error in one image's decode stays that image's: the rest of its batch is embedded."""
    from retrieval import imaging
    from webapp.models import Lane

    collection = CollectionFactory(owner=owner)
    images = []
    for size in [(640, 480), (500, 400)]:
        relative, data = _stored_jpeg(size)
        images.append(ImageFactory(collection=collection, status=ImageStatus.PENDING, lane=Lane.BULK,
                                   file_path=relative, sha256=hashlib.sha256(data).hexdigest(),
                                   width=size[0], height=size[1]))
    make_thumbnail = imaging.make_thumbnail

    def thumbnail_or_crash(picture, **kwargs):
        if picture.size == (500, 400):
            raise RuntimeError("a decoder bug")
        return make_thumbnail(picture, **kwargs)

    monkeypatch.setattr(imaging, "make_thumbnail", thumbnail_or_crash)
    assert ingest.embed_pending(batch_size=2) == 1
    good, bad = (Image.objects.get(pk=image.pk) for image in images)
    assert good.status == ImageStatus.READY
    assert bad.status == ImageStatus.FAILED and "RuntimeError: a decoder bug" in bad.error


@pytest.mark.django_db
def test_running_out_of_memory_in_a_decode_fails_no_image(owner, monkeypatch) -> None:
    """The worker's state, not the image's: the batch fails and the reconciler hands its rows back."""
    from retrieval import imaging
    from webapp.models import Lane

    relative, data = _stored_jpeg((640, 480))
    image = ImageFactory(collection=CollectionFactory(owner=owner), status=ImageStatus.PENDING, lane=Lane.BULK,
                         file_path=relative, sha256=hashlib.sha256(data).hexdigest(), width=640, height=480)

    def out_of_memory(picture, **kwargs):
        raise MemoryError

    monkeypatch.setattr(imaging, "make_thumbnail", out_of_memory)
    with pytest.raises(MemoryError):
        ingest.embed_pending(batch_size=1)
    assert Image.objects.get(pk=image.pk).status == ImageStatus.PROCESSING  # the reconciler's to retry
