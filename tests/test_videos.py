"""Videos through the product: upload, the real worker's frame index, moments for a photo, visibility."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from PIL import Image as PILImage

from retrieval import video as rv
from retrieval.synthetic_video import render_video
from tests.conftest import media_files, shown_moments
from webapp.models import FrameEmbedding, Image, ImageStatus, Video, VideoEmbedding, VideoFrame

READY_TIMEOUT = 240  # the first task loads the CNN in the worker


def skimage_photo(name: str) -> PILImage.Image:
    from skimage import data

    return PILImage.fromarray(getattr(data, name)()).convert("RGB")


def make_clip(path: Path, photos: list[str], seconds: list[float], seed: int = 0) -> list[tuple[float, float]]:
    return render_video([skimage_photo(p) for p in photos], path, shot_seconds=seconds, seed=seed)


def jittered_crop(name: str) -> bytes:
    """A photo of the same scene, not a frame: cropped, resized and re-encoded."""
    photo = skimage_photo(name)
    w, h = photo.size
    crop = photo.crop((int(w * 0.1), int(h * 0.08), int(w * 0.85), int(h * 0.9))).resize((300, 220))
    out = io.BytesIO()
    crop.save(out, "JPEG", quality=80)
    return out.getvalue()


def create_collection(client, name: str, visibility: str = "public") -> str:
    response = client.post(reverse("collection_create"), {"name": name, "visibility": visibility})
    assert response.status_code == 302
    return response["Location"].strip("/").split("/")[-1]


def upload(client, key: str, name: str, data: bytes) -> dict:
    response = client.post(reverse("collection_upload", args=[key]), {"files": [SimpleUploadedFile(name, data)]},
                           HTTP_ACCEPT="application/json")
    return {"status": response.status_code, **response.json()["results"][0]}


def wait_ready(model, keys: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        statuses = dict(model.objects.filter(key__in=keys).values_list("key", "status"))
        if all(statuses.get(k) in (ImageStatus.READY, ImageStatus.FAILED) for k in keys):
            assert set(statuses.values()) == {ImageStatus.READY}, statuses
            return
        assert time.monotonic() < deadline, f"still processing: {statuses}"
        time.sleep(0.3)


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_an_uploaded_video_is_indexed_and_a_photo_finds_its_moment(
    celery_worker_process, owner_client, outsider_client, anonymous_client, owner, tmp_path
) -> None:
    key = create_collection(owner_client, "Clips")
    shots_a = make_clip(tmp_path / "a.mp4", ["astronaut", "coffee"], [2.5, 3.5], seed=1)
    make_clip(tmp_path / "b.mp4", ["chelsea", "rocket"], [3.0, 3.0], seed=2)
    a = upload(owner_client, key, "a.mp4", (tmp_path / "a.mp4").read_bytes())
    b = upload(owner_client, key, "b.mp4", (tmp_path / "b.mp4").read_bytes())
    assert a["status"] == 202 and a["outcome"] == "accepted" and "video" in a, a
    photo = upload(owner_client, key, "coffee-cup.jpg", jittered_crop("coffee"))
    assert photo["status"] == 202 and "image" in photo
    wait_ready(Video, [a["video"]["key"], b["video"]["key"]])
    wait_ready(Image, [photo["image"]["key"]])

    video = Video.objects.get(key=a["video"]["key"])
    frames = list(VideoFrame.objects.filter(video=video).order_by("timestamp"))
    # The worker kept what the sampler keeps for this file with the product's settings.
    expected = rv.sample_frames(tmp_path / "a.mp4", every_seconds=settings.VIDEO_FRAME_EVERY,
                                scene_threshold=settings.VIDEO_SCENE_THRESHOLD, max_frames=settings.VIDEO_MAX_FRAMES,
                                max_side=settings.THUMBNAIL_SIZE)
    assert [f.timestamp for f in frames] == pytest.approx([f.timestamp for f in expected], abs=1e-3)
    assert frames[0].timestamp == 0.0
    assert all(any(abs(f.timestamp - second) <= 0.1 for f in frames) for second in range(6))  # one a second
    assert any(abs(f.timestamp - shots_a[1][0]) <= 0.1 for f in frames)  # the cut at 2.5 s
    assert FrameEmbedding.objects.filter(video=video).count() == len(frames)
    assert VideoEmbedding.objects.filter(video=video, encoder__isnull=True).count() == 1
    assert video.poster_path and video.strip_path
    stored = {str(p).split("media/", 1)[1] for p in media_files()}
    assert {video.file_path, video.poster_path, video.strip_path} <= stored

    # The coffee photo's page lists the video that shows the coffee, at a second inside that shot.
    page = outsider_client.get(reverse("image", args=[photo["image"]["key"]]))
    assert page.status_code == 200
    moments = shown_moments(page)
    assert moments and moments[0][0] == video.key
    start, end = shots_a[1]
    first_second = moments[0][1]
    assert start - 1.0 <= first_second <= end
    assert sorted(key for key, _ in moments) == sorted([video.key, b["video"]["key"]])  # one moment per video
    html = page.content.decode()
    assert f"{reverse('video', args=[video.key])}?t={first_second:g}" in html

    # Searching by an upload that is not stored finds the same moment.
    response = outsider_client.post(reverse("search"), {"image": SimpleUploadedFile("q.jpg", jittered_crop("coffee"))})
    assert response.status_code == 200
    assert response.context["moments"][0].video.key == video.key

    # The video page plays from that moment and lists its keyframes; media answer byte ranges.
    player = anonymous_client.get(reverse("video", args=[video.key]), {"t": first_second})
    assert player.status_code == 200 and player.context["start"] == pytest.approx(first_second)
    assert f"#t={first_second:g}" in player.content.decode().replace(".0#", "#")
    assert len(player.context["frames"]) == len(frames)
    assert [v.key for v, _ in player.context["similar_videos"]] == [b["video"]["key"]]
    ranged = anonymous_client.get(reverse("media_video_original", args=[video.key]), HTTP_RANGE="bytes=0-99")
    assert ranged.status_code == 206
    assert ranged["Content-Range"] == f"bytes 0-99/{video.byte_size}"
    assert b"".join(ranged.streaming_content) == (tmp_path / "a.mp4").read_bytes()[:100]
    for name in ("media_video_poster", "media_video_strip"):
        picture = anonymous_client.get(reverse(name, args=[video.key]))
        assert picture.status_code == 200 and picture["Content-Type"] == "image/jpeg"

    # Private: a video in a private collection is neither a page nor a moment for others.
    secret_key = create_collection(owner_client, "Secret clips", visibility="private")
    make_clip(tmp_path / "c.mp4", ["coffee"], [3.0], seed=3)
    secret = upload(owner_client, secret_key, "c.mp4", (tmp_path / "c.mp4").read_bytes())
    wait_ready(Video, [secret["video"]["key"]])
    for client in (outsider_client, anonymous_client):
        assert client.get(reverse("video", args=[secret["video"]["key"]])).status_code == 404
        assert client.get(reverse("media_video_original", args=[secret["video"]["key"]])).status_code == 404
        seen = {key for key, _ in shown_moments(client.get(reverse("image", args=[photo["image"]["key"]])))}
        assert secret["video"]["key"] not in seen
    mine = {key for key, _ in shown_moments(owner_client.get(reverse("image", args=[photo["image"]["key"]])))}
    assert secret["video"]["key"] in mine


def truncated_mp4(tmp_path: Path) -> bytes:
    make_clip(tmp_path / "whole.mp4", ["rocket"], [3.0])
    data = (tmp_path / "whole.mp4").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "make", "code", "status"),
    [
        ("cut.mp4", truncated_mp4, "corrupt_video", 400),
        ("fake.mp4", lambda _: b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(range(256)) * 40,
         "corrupt_video", 400),
        ("fake.webm", lambda _: b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm" + b"\x00" * 3000, "corrupt_video", 400),
        ("notes.mp4", lambda _: b"just some text, not a video at all\n" * 20, "unsupported_format", 415),
    ],
)
def test_a_corrupt_or_disguised_video_is_rejected_and_nothing_is_stored(
    owner_client, tmp_path, name, make, code, status
) -> None:
    key = create_collection(owner_client, "Clips")
    result = upload(owner_client, key, name, make(tmp_path))
    assert result["outcome"] == "rejected"
    assert (result["status"], result["code"]) == (status, code), result
    assert result["message"]
    assert not Video.objects.exists() and not Image.objects.exists()
    assert media_files() == []


@pytest.mark.django_db
def test_a_video_over_the_length_limit_is_rejected(owner_client, settings, tmp_path) -> None:
    settings.MAX_VIDEO_SECONDS = 2.0
    key = create_collection(owner_client, "Clips")
    make_clip(tmp_path / "long.mp4", ["rocket"], [3.0])
    result = upload(owner_client, key, "long.mp4", (tmp_path / "long.mp4").read_bytes())
    assert (result["status"], result["code"]) == (413, "video_too_long"), result
    assert not Video.objects.exists() and media_files() == []


@pytest.mark.django_db
def test_an_animated_gif_is_a_video_and_a_still_gif_an_image(owner_client) -> None:
    key = create_collection(owner_client, "Mixed")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = [PILImage.new("RGB", (64, 48), c) for c in colours]
    animated, still = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=500, loop=0)
    frames[0].save(still, "GIF")
    moving = upload(owner_client, key, "anim.gif", animated.getvalue())
    assert moving["status"] == 202 and moving["video"]["duration"] == pytest.approx(1.5)
    plain = upload(owner_client, key, "still.gif", still.getvalue())
    assert plain["status"] == 202 and "image" in plain
    assert Video.objects.get().container == "gif"


@pytest.mark.django_db
def test_the_worker_indexes_in_process_and_a_retry_replaces_the_frames(owner, tmp_path) -> None:
    from webapp import services, videos

    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    make_clip(tmp_path / "a.mp4", ["astronaut", "coffee"], [2.0, 2.0])
    made = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes(),
                               name="a.mp4")
    first = videos.video_index(video_id=made.video.pk)
    Video.objects.filter(pk=made.video.pk).update(status=ImageStatus.PENDING)  # as the reconciler would
    second = videos.video_index(video_id=made.video.pk)
    assert first == second == VideoFrame.objects.filter(video=made.video).count() > 0
    assert FrameEmbedding.objects.filter(video=made.video).count() == first
    vectors = np.stack([videos.as_array(e.vector) for e in FrameEmbedding.objects.filter(video=made.video)])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    again = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes())
    assert not again.created and again.video.pk == made.video.pk


@pytest.mark.django_db
def test_the_gru_encoder_trains_on_a_collection_and_serves_similar_videos(owner, settings, tmp_path) -> None:
    from django.core.management import call_command
    from django.test import Client

    from retrieval import video_encoder
    from webapp import services, videos
    from webapp.models import VideoEncoder

    settings.VAR_DIR = tmp_path / "var"
    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    made = []
    for n, photos in enumerate([["astronaut", "coffee"], ["chelsea", "rocket"], ["coffee", "astronaut"]]):
        make_clip(tmp_path / f"{n}.mp4", photos, [2.0, 2.0], seed=n)
        video = videos.video_ingest(collection=collection, uploaded_by=owner,
                                    data=(tmp_path / f"{n}.mp4").read_bytes(), name=f"{n}.mp4").video
        videos.video_index(video_id=video.pk)
        made.append(video)

    out = io.StringIO()
    call_command("train_video_encoder", collection=collection.key, epochs=2, batch_size=3, clip_len=3,
                 no_progress=True, stdout=out)
    encoder = VideoEncoder.objects.get()
    assert "encoded 3 videos" in out.getvalue()
    model = video_encoder.load(Path(encoder.checkpoint_path), dim=1280)
    stored = {e.video_id: videos.as_array(e.vector) for e in VideoEmbedding.objects.filter(encoder=encoder)}
    assert set(stored) == {v.pk for v in made}
    frames = videos.frame_vectors(version=encoder.frame_version, video_ids=[made[0].pk])[made[0].pk]
    np.testing.assert_allclose(video_encoder.encode(model, frames), stored[made[0].pk], atol=1e-5)

    settings.VIDEO_ENCODER = "gru"
    assert videos.video_representation(made[0]) == (encoder.frame_version, encoder)
    page = Client().get(reverse("video", args=[made[0].key]))
    assert {v.key for v, _ in page.context["similar_videos"]} == {made[1].key, made[2].key}
    # Anyone may ask which representation answered: never with the training collection's key,
    # which is all that guards an unlisted collection.
    answer = Client().get(f"/api/v1/videos/{made[0].key}/similar").json()
    assert answer["representation"].startswith("video-gru@") and collection.key not in answer["representation"]
    assert collection.key not in encoder.key
    encoder.key = f"video-gru:{collection.key}@{encoder.key.rsplit('@', 1)[-1]}"  # as encoders made before were named
    encoder.save(update_fields=["key"])
    assert collection.key not in Client().get(f"/api/v1/videos/{made[0].key}/similar").json()["representation"]
    # A video indexed afterwards is encoded by the worker too.
    make_clip(tmp_path / "late.mp4", ["rocket"], [2.0], seed=9)
    late = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "late.mp4").read_bytes())
    videos.video_index(video_id=late.video.pk)
    assert VideoEmbedding.objects.filter(video=late.video, encoder=encoder).exists()

    settings.VIDEO_ENCODER = "mean"
    assert videos.video_representation(made[0]) == (encoder.frame_version, None)


def test_heic_and_avif_photos_are_not_sniffed_as_videos() -> None:
    assert rv.sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") is None
    assert rv.sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf") is None
    assert rv.sniff_format(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") == "mp4"


@pytest.mark.django_db
def test_the_api_uploads_a_video_and_answers_moments_frames_and_similar_videos(owner, tmp_path) -> None:
    from django.test import Client

    from webapp import services, videos

    _, token = services.api_token_create(user=owner, name="clips")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    make_clip(tmp_path / "a.mp4", ["astronaut", "coffee"], [2.0, 3.0], seed=5)
    make_clip(tmp_path / "b.mp4", ["rocket"], [2.0], seed=6)
    keys = []
    for name in ("a.mp4", "b.mp4"):
        response = api.post(f"/api/v1/collections/{collection.key}/images",
                            {"files": [SimpleUploadedFile(name, (tmp_path / name).read_bytes())]})
        assert response.status_code == 202, response.content
        result = response.json()["results"][0]
        assert result["outcome"] == "accepted" and result["image"] is None
        keys.append(result["video"]["key"])
    for key in keys:
        videos.video_index(video_id=Video.objects.get(key=key).pk)
    photo = services.image_ingest(collection=collection, uploaded_by=owner, data=jittered_crop("coffee"),
                                  queue=None).image
    services.image_embed(image_id=photo.pk)

    similar = api.get(f"/api/v1/images/{photo.key}/similar").json()
    assert similar["moments"][0]["video"]["key"] == keys[0]
    assert 1.0 <= similar["moments"][0]["timestamp"] <= 5.0
    assert similar["moments"][0]["url"].endswith(f"/v/{keys[0]}/?t={similar['moments'][0]['timestamp']:g}")
    detail = api.get(f"/api/v1/videos/{keys[0]}").json()
    assert detail["duration"] == pytest.approx(5.0, abs=0.15)
    assert [f["timestamp"] for f in detail["frames"]] == sorted(f["timestamp"] for f in detail["frames"])
    assert api.get(detail["frames"][0]["frame_url"]).status_code == 200
    others = api.get(f"/api/v1/videos/{keys[0]}/similar").json()
    assert others["representation"] == "mean" and [r["video"]["key"] for r in others["results"]] == [keys[1]]
    assert Client().get(f"/api/v1/videos/{keys[0]}").status_code == 200  # public collection
    services.collection_update(collection=collection, visibility="private")
    assert Client().get(f"/api/v1/videos/{keys[0]}").status_code == 404


@pytest.mark.django_db
def test_deleting_removes_files_and_the_reconciler_requeues_a_video_whose_worker_died(
    owner, owner_client, admin_client_, tmp_path, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from webapp import services, tasks, videos

    collection = services.collection_create(owner=owner, name="Clips", visibility="private")
    make_clip(tmp_path / "a.mp4", ["rocket", "coffee"], [2.0, 2.0], seed=7)
    video = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes()).video

    # The worker claimed it and died: "processing" for too long. The reconciler queues it again.
    queued: list[int] = []
    monkeypatch.setattr(tasks.index_video, "apply_async", lambda args, kwargs=None, queue=None: queued.append(args[0]))
    Video.objects.filter(pk=video.pk).update(status=ImageStatus.PROCESSING)
    Video.objects.filter(pk=video.pk).update(updated_at=timezone.now() - timedelta(hours=2))
    assert videos.videos_requeue_stale() == 1 and queued == [video.pk]
    assert Video.objects.get(pk=video.pk).status == ImageStatus.PENDING
    assert videos.video_index(video_id=video.pk) > 0

    listing = admin_client_.get(reverse("admin:simili_video_changelist"))
    assert listing.status_code == 200 and video.key in listing.content.decode()
    assert admin_client_.get(reverse("admin:simili_video_change", args=[video.pk])).status_code == 200
    video.refresh_from_db()
    files = {video.file_path, video.poster_path, video.strip_path}
    assert files <= {str(p).split("media/", 1)[1] for p in media_files()}
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(reverse("video_delete", args=[video.key]))
    assert response.status_code == 302
    assert not Video.objects.exists() and not VideoFrame.objects.exists() and not FrameEmbedding.objects.exists()
    assert media_files() == []


@pytest.mark.django_db
def test_moments_are_cached_with_similar_images_and_a_new_video_shows_at_once(owner, tmp_path, monkeypatch) -> None:
    from django.test import Client

    from webapp import services, videos

    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    photo = services.image_ingest(collection=collection, uploaded_by=owner, data=jittered_crop("coffee"),
                                  queue=None).image
    services.image_embed(image_id=photo.pk)
    client = Client()
    assert shown_moments(client.get(reverse("image", args=[photo.key]))) == []

    make_clip(tmp_path / "a.mp4", ["coffee"], [2.0], seed=8)
    video = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes()).video
    videos.video_index(video_id=video.pk)  # frame vectors move the search generation
    calls: list[int] = []
    real = videos.moment_rows
    monkeypatch.setattr(videos, "moment_rows", lambda **kw: calls.append(1) or real(**kw))
    first = shown_moments(client.get(reverse("image", args=[photo.key])))
    again = shown_moments(client.get(reverse("image", args=[photo.key])))
    assert [key for key, _ in first] == [key for key, _ in again] == [video.key]
    assert calls == [1]  # the second page came from the cache


def _write(path: Path, fmt: str, codec: str) -> bytes:
    import av

    base = np.asarray(skimage_photo("chelsea").resize((96, 64)))
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for index in range(25):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * index, axis=1), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


def _animated_webp(path: Path) -> bytes:
    frames = [skimage_photo(name).resize((96, 64)) for name in ("chelsea", "coffee", "rocket")]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=800, loop=0)
    return path.read_bytes()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "make", "container"),
    [
        ("clip.webm", lambda p: _write(p, "webm", "libvpx"), "webm"),
        ("clip.mov", lambda p: _write(p, "mov", "libx264"), "mov"),
        ("clip.webp", _animated_webp, "webp"),
    ],
)
def test_webm_mov_and_animated_webp_upload_as_videos_and_index(owner_client, owner, tmp_path, name, make,
                                                               container) -> None:
    from webapp import videos

    key = create_collection(owner_client, "Clips")
    result = upload(owner_client, key, name, make(tmp_path / name))
    assert result["status"] == 202 and result["outcome"] == "accepted", result
    video = Video.objects.get(key=result["video"]["key"])
    assert video.container == container
    assert videos.video_index(video_id=video.pk) >= 2
    video.refresh_from_db()
    assert video.status == ImageStatus.READY and video.poster_path


@pytest.mark.django_db
def test_a_video_over_the_byte_limit_is_refused_before_it_is_read(owner_client, settings, tmp_path) -> None:
    make_clip(tmp_path / "a.mp4", ["rocket"], [2.0])
    data = (tmp_path / "a.mp4").read_bytes()
    settings.MAX_VIDEO_BYTES = len(data) - 1
    settings.MAX_UPLOAD_BYTES = len(data) * 10  # the video limit applies to videos, not the photo one
    key = create_collection(owner_client, "Clips")
    result = upload(owner_client, key, "a.mp4", data)
    assert (result["status"], result["code"]) == (413, "file_too_large"), result
    assert str(len(data) - 1) in result["message"].replace(",", "")
    assert not Video.objects.exists() and media_files() == []
    settings.MAX_VIDEO_BYTES = len(data)
    assert upload(owner_client, key, "a.mp4", data)["status"] == 202


@pytest.fixture
def unqueued_video(owner, tmp_path, monkeypatch) -> Video:
    """A stored two-second clip whose index task was never handed to the broker: the reconciler's case."""
    from webapp import services, tasks, videos

    monkeypatch.setattr(tasks.index_video, "apply_async", lambda *args, **kwargs: None)
    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    make_clip(tmp_path / "a.mp4", ["rocket"], [2.0])
    return videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes()).video


@pytest.mark.django_db
def test_a_redelivered_or_exhausted_video_is_not_claimed_and_the_reconciler_fails_it(settings, unqueued_video) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from webapp import videos

    video = unqueued_video
    # A second delivery while a worker holds it: nothing done twice.
    Video.objects.filter(pk=video.pk).update(status=ImageStatus.PROCESSING, attempts=1)
    assert videos.video_index(video_id=video.pk) == 0
    # The worker died on it every time: the reconciler gives up instead of queueing it again.
    Video.objects.filter(pk=video.pk).update(attempts=settings.EMBED_MAX_ATTEMPTS)
    Video.objects.filter(pk=video.pk).update(updated_at=timezone.now() - timedelta(hours=2))
    assert videos.videos_requeue_stale() == 0
    video.refresh_from_db()
    assert video.status == ImageStatus.FAILED and "Gave up" in video.error
    Video.objects.filter(pk=video.pk).update(status=ImageStatus.PENDING)
    assert videos.video_index(video_id=video.pk) == 0  # out of attempts


@pytest.mark.django_db
def test_a_new_active_version_reindexes_videos_and_dropping_a_version_removes_its_video_vectors(
    owner, tmp_path, monkeypatch
) -> None:
    from webapp import embeddings, services, tasks, videos
    from webapp.models import VideoEncoder

    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    make_clip(tmp_path / "a.mp4", ["rocket", "coffee"], [2.0, 2.0])
    video = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes()).video
    videos.video_index(video_id=video.pk)
    old = FrameEmbedding.objects.filter(video=video).first().model_version
    assert old.is_active
    new = embeddings.embedding_model_ensure(key="other@1", backbone="other", dimensions=1280)
    queued: list[tuple] = []
    monkeypatch.setattr(tasks.index_video, "apply_async",
                        lambda args, kwargs=None, queue=None: queued.append((args, kwargs)))
    embeddings.embedding_model_activate(version=new)
    assert queued == [([video.pk], {"refresh": True})]
    assert videos.video_index(video_id=video.pk, refresh=True) > 0  # stays ready meanwhile
    video.refresh_from_db()
    assert video.status == ImageStatus.READY

    # The old version still has an encoder and vectors of its own: dropping it removes them.
    VideoEncoder.objects.create(key="video-gru:x@1", frame_version=old, checkpoint_path="/nonexistent.pt",
                                dimensions=1280)
    FrameEmbedding.objects.filter(video=video).update(model_version=old)
    embeddings.embedding_model_drop(version=old)
    assert not FrameEmbedding.objects.filter(model_version=old.pk).exists()
    assert not VideoEncoder.objects.exists()


@pytest.mark.django_db
def test_an_animated_gif_keeps_the_photo_byte_limit(owner_client, settings) -> None:
    frames = [PILImage.new("RGB", (64, 48), c) for c in [(200, 30, 30), (30, 200, 30)]]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=500, loop=0)
    settings.MAX_UPLOAD_BYTES = len(animated.getvalue()) - 1  # the video limit stays at 200 MiB
    key = create_collection(owner_client, "Mixed")
    result = upload(owner_client, key, "anim.gif", animated.getvalue())
    assert (result["status"], result["code"]) == (413, "file_too_large"), result
    assert not Video.objects.exists() and media_files() == []


@pytest.mark.django_db
def test_a_long_video_has_longer_before_the_reconciler_calls_its_worker_dead(settings, unqueued_video) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from webapp import videos

    video = unqueued_video
    Video.objects.filter(pk=video.pk).update(status=ImageStatus.PROCESSING, attempts=1, duration=120.0)
    allowance = settings.RECONCILE_PROCESSING_AFTER + 120 * videos.PROCESSING_SECONDS_PER_SECOND
    Video.objects.filter(pk=video.pk).update(updated_at=timezone.now() - timedelta(seconds=allowance - 60))
    assert videos.videos_requeue_stale() == 0  # still within what two minutes of video may take
    Video.objects.filter(pk=video.pk).update(updated_at=timezone.now() - timedelta(seconds=allowance + 60))
    assert videos.videos_requeue_stale() == 1


@pytest.mark.django_db(transaction=True)
def test_indexing_a_video_stores_again_the_shared_frames_a_deletion_removed_meanwhile(
    owner, tmp_path, monkeypatch
) -> None:
    """The same clip in two collections shares its frame files: deleting one copy mid-index loses nothing."""
    import threading

    from django.db import connection

    from webapp import services, storage, tasks, videos

    monkeypatch.setattr(tasks.index_video, "apply_async", lambda *args, **kwargs: None)
    make_clip(tmp_path / "a.mp4", ["astronaut", "coffee"], [2.0, 2.0])
    data = (tmp_path / "a.mp4").read_bytes()
    first = services.collection_create(owner=owner, name="First", visibility="private")
    second = services.collection_create(owner=owner, name="Second", visibility="private")
    old = videos.video_ingest(collection=first, uploaded_by=owner, data=data, name="a.mp4").video
    videos.video_index(video_id=old.pk)
    old_frames = list(VideoFrame.objects.filter(video=old).values_list("thumbnail_path", flat=True))
    new = videos.video_ingest(collection=second, uploaded_by=owner, data=data, name="a.mp4").video
    encoder_current = videos.encoder_current

    def another_request_deletes_the_first_copy(*args, **kwargs):
        # The frames are written; the new video's rows do not use them until its transaction commits.
        def delete() -> None:
            try:
                videos.video_delete(video=Video.objects.get(pk=old.pk))
            finally:
                connection.close()

        thread = threading.Thread(target=delete)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
        assert not any(storage.media_path(path).exists() for path in old_frames)
        return encoder_current(*args, **kwargs)

    monkeypatch.setattr(videos, "encoder_current", another_request_deletes_the_first_copy)
    assert videos.video_index(video_id=new.pk) > 0
    new.refresh_from_db()
    frames = list(VideoFrame.objects.filter(video=new).values_list("thumbnail_path", flat=True))
    assert set(frames) == set(old_frames)
    assert all(storage.media_path(path).is_file() for path in [*frames, new.poster_path, new.strip_path, new.file_path])


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_leaves_a_video_to_the_worker_claiming_it(unqueued_video) -> None:
    """A worker's claim holds the row: the reconciler skips it instead of setting it back to pending."""
    from django.db import connection

    from webapp import videos

    video = unqueued_video
    Video.objects.filter(pk=video.pk).update(enqueued_at=None)  # never handed over: stale for the reconciler
    worker = connection.copy()
    try:
        with worker.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("UPDATE simili_video SET status = 'processing', attempts = attempts + 1 WHERE id = %s",
                           [video.pk])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")  # waiting for the claim would mean updating it after
        try:
            assert videos.videos_requeue_stale() == 0
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
        with worker.cursor() as cursor:
            cursor.execute("COMMIT")
    finally:
        worker.close()
    video.refresh_from_db()
    assert video.status == ImageStatus.PROCESSING and video.attempts == 1
