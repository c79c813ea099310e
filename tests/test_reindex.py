"""Switching to a better recipe without downtime: re-index in the background, then activate."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import near_copy
from tests.factories import CollectionFactory
from webapp import embeddings, ingest, services
from webapp.models import Embedding, EmbeddingModel, Visibility

pytestmark = pytest.mark.django_db(transaction=True)  # a new version creates its index: no open transaction


@pytest.fixture
def embedded_collection(owner, photos):
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    files = dict(photos)
    files["chelsea-copy.jpg"] = near_copy(photos["chelsea.jpg"])
    images = {name: services.image_ingest(collection=collection, uploaded_by=owner, data=data, name=name,
                                          queue=None).image for name, data in files.items()}
    ingest.embed_claimed(ingest.images_claim(ids=[image.pk for image in images.values()]), augment_each=True)
    return images


@pytest.fixture
def gem_version(embedded_collection, settings) -> EmbeddingModel:
    """A new recipe's version (GeM pooling), the one the workers are configured for: nothing re-indexed yet."""
    from webapp import pipeline

    settings.EMBEDDING_POOLING = "gem"
    return embeddings.embedding_model_ensure(key=pipeline.recipe().key, backbone="efficientnet_lite0", dimensions=1280)


def _similar(client, image) -> dict:
    return client.get(f"/api/v1/images/{image.key}/similar", {"k": 3}).json()


def test_a_new_recipe_is_built_in_the_background_and_switched_at_once(embedded_collection, client, settings) -> None:
    old = EmbeddingModel.objects.get(is_active=True)
    settings.EMBEDDING_POOLING = "gem"  # a different recipe: a new model version
    out = io.StringIO()
    call_command("reindex", "--no-progress", stdout=out)
    new = EmbeddingModel.objects.exclude(pk=old.pk).get()
    assert new.key.endswith("/short_side/gem/224")
    assert Embedding.objects.filter(model_version=new).count() == len(embedded_collection)
    assert f"{new.key}: 6 of 6 ready image(s) have a vector." in out.getvalue()
    cat = embedded_collection["chelsea.jpg"]
    before = _similar(client, cat)
    assert before["model"] == old.key  # searches keep the old version until the switch

    call_command("reindex", "--activate", "--no-progress", stdout=io.StringIO())
    assert EmbeddingModel.objects.get(is_active=True) == new
    settings.NEAR_DUPLICATE_DISTANCE = 0.0  # show the copy rather than collapse it (test_near_duplicates)
    after = _similar(client, cat)
    assert after["model"] == new.key
    assert after["results"][0]["image"]["key"] == embedded_collection["chelsea-copy.jpg"].key


def test_a_version_that_does_not_cover_every_image_cannot_be_activated(embedded_collection) -> None:
    partial = embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1/x", backbone="efficientnet_lite0",
                                              dimensions=1280)
    with pytest.raises(ValueError, match="covers 0 of 6"):
        embeddings.embedding_model_activate(version=partial)
    assert not EmbeddingModel.objects.get(pk=partial.pk).is_active


def test_activate_fails_clearly_from_the_command_when_images_cannot_be_read(embedded_collection, settings) -> None:
    from webapp import storage

    storage.delete(embedded_collection["rocket.webp"].file_path)
    settings.EMBEDDING_POOLING = "gem"
    with pytest.raises(CommandError, match="covers 5 of 6"):
        call_command("reindex", "--activate", "--no-progress", stdout=io.StringIO())


def test_an_admin_sees_coverage_and_activates_a_complete_version(embedded_collection, admin_client_, settings) -> None:
    old = EmbeddingModel.objects.get(is_active=True)
    settings.EMBEDDING_POOLING = "gem"
    call_command("reindex", "--no-progress", stdout=io.StringIO())
    new = EmbeddingModel.objects.exclude(pk=old.pk).get()
    page = admin_client_.get("/admin/simili/embeddingmodel/").content.decode()
    assert page.count("6 / 6") == 2
    response = admin_client_.post("/admin/simili/embeddingmodel/",
                                  {"action": "activate", "_selected_action": [new.pk]}, follow=True)
    assert "Searches now use this version." in response.content.decode()
    assert EmbeddingModel.objects.get(is_active=True) == new


def test_a_small_cnn_trained_here_becomes_the_web_apps_backbone(
    embedded_collection, client, settings, tmp_path
) -> None:
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from retrieval import train

    root = tmp_path / "shapes"
    for index, colour in enumerate([(220, 30, 30), (30, 180, 40), (30, 60, 220)]):
        (root / f"c{index}").mkdir(parents=True)
        for i in range(5):
            image = PILImage.new("RGB", (80, 64), (245, 245, 240))
            ImageDraw.Draw(image).ellipse((5 * i, 4 * i, 5 * i + 30, 4 * i + 30), fill=colour)
            image.save(root / f"c{index}" / f"{i}.png")
    out = tmp_path / "cnn"
    argv = [str(root), "--method", "cnn", "--epochs", "1", "--test-fraction", "0.4", "--out", str(out), "--no-progress"]
    assert train.main(argv) == 0
    settings.EMBEDDING_BACKBONE = f"small_cnn:{out / 'small_cnn.pt'}"
    # One epoch on 15 drawings: every photo lands within the default backbone's near-duplicate
    # distance of every other, which would collapse them; the threshold is per backbone.
    settings.NEAR_DUPLICATE_DISTANCE = 0.0
    call_command("reindex", "--activate", "--no-progress", stdout=io.StringIO())
    active = EmbeddingModel.objects.get(is_active=True)
    assert active.backbone == settings.EMBEDDING_BACKBONE
    assert active.dimensions == 64  # the pooled last feature map, not the 16,384-d flattened one
    body = _similar(client, embedded_collection["chelsea.jpg"])
    assert body["model"] == active.key
    assert len(body["results"]) == 3


def test_vectors_too_wide_for_the_index_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="16384-dimensional vectors; the similarity index takes at most 4000"):
        embeddings.embedding_model_ensure(key="wide@1", backbone="wide", dimensions=16384)


def test_a_projection_fitted_on_the_collection_is_used_by_the_web_app(embedded_collection, client, settings,
                                                                       tmp_path) -> None:
    import numpy as np

    from retrieval.projection import fit_pca_whitening

    old = EmbeddingModel.objects.get(is_active=True)
    vectors = np.stack([np.asarray(e.vector, dtype=np.float32) for e in Embedding.objects.filter(model_version=old)])
    projection = fit_pca_whitening(vectors, source_key=old.key, shrinkage=1.0)  # centring, learned without labels
    settings.EMBEDDING_PROJECTION = str(projection.save(tmp_path / "centring.npz"))
    call_command("reindex", "--activate", "--no-progress", stdout=io.StringIO())
    active = EmbeddingModel.objects.get(is_active=True)
    assert active.key == f"{old.key}+{projection.identifier}"
    body = _similar(client, embedded_collection["chelsea.jpg"])
    assert body["model"] == active.key
    assert body["results"][0]["image"]["key"] == embedded_collection["chelsea-copy.jpg"].key


def test_an_admin_reindexes_in_the_background_switches_and_drops_the_old_version(
    celery_worker_process, owner, photos, admin_client_, client, settings
) -> None:
    """The workers run the default recipe; the site still searches an older (GeM) version."""
    import time

    from django.db import connection

    from webapp import pipeline, vector_index

    settings.EMBEDDING_POOLING = "gem"
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    images = [services.image_ingest(collection=collection, uploaded_by=owner, data=data, name=name, queue=None).image
              for name, data in photos.items()]
    ingest.embed_claimed(ingest.images_claim(ids=[image.pk for image in images]), augment_each=True)
    old = EmbeddingModel.objects.get(is_active=True)
    settings.EMBEDDING_POOLING = "gap"  # what the worker process is configured with
    recipe = pipeline.recipe()
    new = embeddings.embedding_model_ensure(key=recipe.key, backbone=recipe.spec.name, dimensions=recipe.dimensions)
    assert not new.is_active and not embeddings.embedding_index_exists(version=new)

    changelist = "/admin/simili/embeddingmodel/"
    response = admin_client_.post(changelist, {"action": "reindex", "_selected_action": [new.pk]}, follow=True)
    assert "re-index(es) queued on the bulk workers" in response.content.decode()
    deadline = time.monotonic() + 180
    while not EmbeddingModel.objects.get(pk=new.pk).reindex_state.startswith("done"):
        assert time.monotonic() < deadline, EmbeddingModel.objects.get(pk=new.pk).reindex_state
        time.sleep(0.5)
    assert _similar(client, images[0])["model"] == old.key  # searches stay on the old version meanwhile
    page = admin_client_.get(changelist).content.decode()
    n = len(photos)
    assert f"{n} / {n} (100%)" in page and f"done: {n} of {n} ready images have a vector" in page
    assert embeddings.embedding_index_exists(version=new)  # built once, after the re-index

    admin_client_.post(changelist, {"action": "activate", "_selected_action": [new.pk]})
    assert _similar(client, images[0])["model"] == new.key
    response = admin_client_.post(changelist, {"action": "drop", "_selected_action": [new.pk]}, follow=True)
    assert "is the active version" in response.content.decode()
    response = admin_client_.post(changelist, {"action": "drop", "_selected_action": [old.pk]}, follow=True)
    assert f"Dropped {old.key} ({n} vectors)." in response.content.decode()
    assert list(EmbeddingModel.objects.values_list("pk", flat=True)) == [new.pk]
    with connection.cursor() as cursor:
        assert not vector_index.exists(cursor, version_id=old.pk)
    assert len(_similar(client, images[0])["results"]) == 3


def test_a_background_reindex_refuses_a_version_the_workers_do_not_compute(embedded_collection, settings) -> None:
    settings.EMBEDDING_POOLING = "gem"
    other = embeddings.embedding_model_ensure(key="somebody-else@1", backbone="efficientnet_lite0", dimensions=1280)
    assert embeddings.embedding_model_reindex_step(version_id=other.pk) is None
    state = EmbeddingModel.objects.get(pk=other.pk).reindex_state
    assert state.startswith("failed: the bulk workers embed as efficientnet_lite0") and "/gem/" in state
    assert not Embedding.objects.filter(model_version=other).exists()


class _WorkerKilled(BaseException):
    """What a SIGKILL or the OOM killer does to the task mid-batch (nothing in the process catches it)."""


def test_a_reindex_whose_worker_dies_on_one_image_leaves_it_out_instead_of_dying_for_ever(
    embedded_collection, gem_version, monkeypatch
) -> None:
    new = gem_version
    deadly = embedded_collection["coffee.png"]
    decode = ingest.decode

    def decode_or_die(job, recipe):
        if job.image_id == deadly.pk:
            raise _WorkerKilled
        return decode(job, recipe)

    monkeypatch.setattr(ingest, "decode", decode_or_die)
    # The task is delivered again after each death (acks_late), with the same arguments.
    with pytest.raises(_WorkerKilled):  # the whole batch, as before
        embeddings.embedding_model_reindex_step(version_id=new.pk)
    with pytest.raises(_WorkerKilled):  # one image at a time: the others are embedded first
        embeddings.embedding_model_reindex_step(version_id=new.pk)
    assert embeddings.embedding_model_reindex_step(version_id=new.pk) is None  # it is left out: done

    covered = set(Embedding.objects.filter(model_version=new).values_list("image_id", flat=True))
    assert covered == {image.pk for image in embedded_collection.values()} - {deadly.pk}
    state = EmbeddingModel.objects.get(pk=new.pk).reindex_state
    assert state == "done: 5 of 6 ready images have a vector; 1 could not be embedded (see the workers' log)"


def test_a_database_error_during_a_reindex_batch_leaves_no_image_out(
    embedded_collection, gem_version, monkeypatch
) -> None:
    """The task retries such an error; it is not a worker's death and blames no image."""
    from django.db import OperationalError

    from tests.factories import embed, unit_vector

    new = gem_version
    last = embedded_collection["coffee.png"]
    for seed, image in enumerate(embedded_collection.values()):  # all but one re-indexed already:
        if image.pk != last.pk:  # the end of a re-index, a batch of one
            embed(image, unit_vector(seed), new)
    store, blips = embeddings.embeddings_store, [OperationalError("server closed the connection unexpectedly")]

    def store_after_a_blip(*, version, rows):
        if blips:
            raise blips.pop()
        return store(version=version, rows=rows)

    monkeypatch.setattr(embeddings, "embeddings_store", store_after_a_blip)
    with pytest.raises(OperationalError):
        embeddings.embedding_model_reindex_step(version_id=new.pk)
    assert embeddings.embedding_model_reindex_step(version_id=new.pk) is None  # the task's retry
    assert Embedding.objects.filter(model_version=new, image=last).exists()


def test_a_reindex_goes_on_while_redis_cannot_record_its_batch(embedded_collection, gem_version, monkeypatch) -> None:
    from django.core.cache import cache


    def redis_down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    new = gem_version
    for name in ("get", "set", "delete"):
        monkeypatch.setattr(cache, name, redis_down)
    assert embeddings.embedding_model_reindex_step(version_id=new.pk) is None
    assert Embedding.objects.filter(model_version=new).count() == len(embedded_collection)


def test_one_reindex_step_of_a_version_runs_at_a_time_and_the_other_comes_back(
    embedded_collection, gem_version, monkeypatch
) -> None:
    """A re-index started twice: the second chain's step waits its turn instead of running beside the first."""
    from django.db import connection

    from webapp import tasks

    new = gem_version
    queued: list[tuple[list, dict]] = []
    monkeypatch.setattr(tasks.reindex_version, "apply_async", lambda args, **kwargs: queued.append((args, kwargs)))
    first = connection.copy()  # the first chain's step, under way
    try:
        with first.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [embeddings.REINDEX_LOCK, new.pk])
        with pytest.raises(embeddings.ReindexBusy):
            embeddings.embedding_model_reindex_step(version_id=new.pk)
        tasks.reindex_version(new.pk, [])
        assert queued == [([new.pk, []], {"countdown": tasks.REINDEX_BUSY_DELAY, "queue": services.BULK_QUEUE})]
        assert not Embedding.objects.filter(model_version=new).exists()
    finally:
        first.close()
    assert embeddings.embedding_model_reindex_step(version_id=new.pk) is None  # its turn
    assert Embedding.objects.filter(model_version=new).count() == len(embedded_collection)


def test_a_reindex_that_fails_for_good_says_so_instead_of_running_for_ever(
    embedded_collection, gem_version, monkeypatch
) -> None:
    from django.db import OperationalError


    new = gem_version

    def fails(error):
        def reindex_batch(**kwargs):
            raise error
        return reindex_batch

    monkeypatch.setattr(ingest, "reindex_batch", fails(OperationalError("the database restarted")))
    with pytest.raises(OperationalError):  # retried by the task: still running
        embeddings.embedding_model_reindex_step(version_id=new.pk)
    assert EmbeddingModel.objects.get(pk=new.pk).reindex_state == "running"

    monkeypatch.setattr(ingest, "reindex_batch", fails(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError):
        embeddings.embedding_model_reindex_step(version_id=new.pk)
    state = EmbeddingModel.objects.get(pk=new.pk).reindex_state
    assert state.startswith("failed: RuntimeError: CUDA out of memory")


def test_a_collection_refresh_does_not_hold_up_a_reindex_that_shares_its_number(
    embedded_collection, gem_version
) -> None:
    """Collection N's refresh lock and version N's re-index lock are different locks."""
    from django.db import connection

    refresh = connection.copy()  # a bulk worker refreshing the collection whose id is the version's
    try:
        with refresh.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [services.AUGMENT_LOCK, gem_version.pk])
        assert embeddings.embedding_model_reindex_step(version_id=gem_version.pk) is None
    finally:
        refresh.close()
    assert Embedding.objects.filter(model_version=gem_version).count() == len(embedded_collection)
