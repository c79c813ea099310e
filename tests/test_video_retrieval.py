"""Videos: validation, frame sampling, pictures, the video encoder and finding moments by image.

Every video here is made by the test from scikit-image's bundled photos; nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from retrieval import video, video_encoder
from retrieval.backbones import DEFAULT_BACKBONE, get_backbone
from retrieval.evaluate_video import best_frame_per_video
from retrieval.extraction import Extractor, l2_normalize
from retrieval.synthetic_video import jittered_view, make_video_set, render_video

FPS = 10.0
SHOTS = [2.0, 3.0, 2.5]  # cuts at 2.0 s and 5.0 s, 7.5 s in all
FRAME_PERIOD = 1 / FPS


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def three_shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "three-shots.mp4"
    render_video([photo("astronaut"), photo("coffee"), photo("chelsea")], path, shot_seconds=SHOTS, fps=FPS, seed=3)
    return path


def animation(path: Path, fmt: str, *, frames: int = 30, delay_ms: int = 200) -> Path:
    base = photo("rocket").resize((96, 64))
    images = [Image.fromarray(np.roll(np.asarray(base), 3 * i, axis=1)) for i in range(frames)]
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=delay_ms, loop=0)
    return path


# --- probing -----------------------------------------------------------------------------------


def test_probe_reads_a_generated_mp4(three_shots: Path) -> None:
    info = video.probe(three_shots)
    assert (info.format, info.mime, info.extension) == ("mp4", "video/mp4", "mp4")
    assert info.codec == video.mp4_codec().replace("lib", "").replace("x264", "h264")
    assert (info.width, info.height) == (384, 256)
    assert info.duration == pytest.approx(7.5, abs=FRAME_PERIOD)
    assert info.fps == pytest.approx(FPS)
    assert info.frame_count == 75
    assert not info.is_animated_image


def test_probe_reads_a_file_object(three_shots: Path) -> None:
    with open(three_shots, "rb") as handle:
        handle.read(10)  # wherever the upload's file pointer is
        assert video.probe(handle).frame_count == 75
        assert len(video.sample_frames(handle, every_seconds=1.0, scene_threshold=None)) == 8


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda mp4: b"", "empty_file"),
        (lambda mp4: _jpeg_bytes(), "unsupported_format"),
        (lambda mp4: np.random.default_rng(0).bytes(50_000), "unsupported_format"),
        (lambda mp4: mp4[: len(mp4) // 2], "corrupt_video"),
        (lambda mp4: mp4[:32] + np.random.default_rng(1).bytes(20_000), "corrupt_video"),
        (lambda mp4: _webm_header_only(), "corrupt_video"),
    ],
    ids=["empty", "jpeg-renamed-mp4", "random-bytes", "truncated-mp4", "mp4-header-then-noise", "ebml-webm-stub"],
)
def test_it_rejects_what_is_not_a_whole_video(three_shots: Path, tmp_path: Path, make, code: str) -> None:
    bad = tmp_path / "upload.mp4"
    bad.write_bytes(make(three_shots.read_bytes()))
    with pytest.raises(video.VideoRejected) as caught:
        video.probe(bad)
    assert caught.value.code == code
    assert str(caught.value)  # a sentence for the uploader


def _jpeg_bytes() -> bytes:
    out = io.BytesIO()
    photo("coffee").save(out, format="JPEG")
    return out.getvalue()


def _webm_header_only() -> bytes:
    return b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\x82\x84webm" + bytes(40)


def test_it_rejects_a_streamable_mp4_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "faststart.mp4"
    base = np.asarray(photo("coffee").resize((128, 96)))
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(video.mp4_codec(), rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for index in range(40):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * index, axis=1), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert video.probe(path).frame_count == 40
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) * 2 // 3])  # the index comes first: it still opens
    with pytest.raises(video.CorruptVideo, match="truncated"):
        video.probe(path)


def test_it_rejects_a_video_over_the_limits(three_shots: Path) -> None:
    with pytest.raises(video.VideoTooLong) as too_long:
        video.probe(three_shots, max_duration=5.0)
    assert too_long.value.code == "video_too_long"
    assert "7.5 s" in str(too_long.value)
    with pytest.raises(video.VideoTooLarge) as too_large:
        video.probe(three_shots, max_pixels=320 * 240)
    assert too_large.value.code == "video_too_large"


def test_probe_and_sample_a_webm(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    with av.open(str(path), mode="w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        base = np.asarray(photo("chelsea").resize((96, 64)))
        for index in range(25):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * index, axis=1), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(path)
    assert (info.format, info.mime, info.codec, info.width, info.height) == ("webm", "video/webm", "vp8", 96, 64)
    assert info.duration == pytest.approx(2.5, abs=FRAME_PERIOD)
    frames = video.sample_frames(path, every_seconds=1.0, scene_threshold=None)
    assert [f.timestamp for f in frames] == pytest.approx([0, 1, 2], abs=FRAME_PERIOD)


def test_it_rejects_an_audio_only_mp4(tmp_path: Path) -> None:
    path = tmp_path / "sound.mp4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for _ in range(4):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(video.UnsupportedVideo) as caught:
        video.probe(path)
    assert caught.value.code == "no_video_stream"


# --- sampling ----------------------------------------------------------------------------------


def test_fixed_rate_sampling_keeps_one_frame_a_second(three_shots: Path) -> None:
    frames = video.sample_frames(three_shots, every_seconds=1.0, scene_threshold=None, max_side=200)
    assert [f.timestamp for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5, 6, 7], abs=FRAME_PERIOD)
    assert all(f.image.mode == "RGB" and f.image.size == (200, 133) for f in frames)


def test_scene_mode_finds_the_cuts(three_shots: Path) -> None:
    frames = video.sample_frames(three_shots, every_seconds=None, scene_threshold=video.DEFAULT_SCENE_THRESHOLD)
    stamps = [f.timestamp for f in frames]
    assert stamps[0] == 0.0
    for cut in (2.0, 5.0):
        assert any(abs(t - cut) < FRAME_PERIOD / 2 for t in stamps), (cut, stamps)
    assert len(stamps) < 10  # pans and zooms within a shot are not cuts


def test_max_frames_spreads_the_kept_frames(three_shots: Path) -> None:
    frames = video.sample_frames(three_shots, every_seconds=0.1, scene_threshold=None, max_frames=4)
    stamps = [f.timestamp for f in frames]
    assert len(stamps) == 4
    assert stamps[0] == 0.0 and stamps[-1] > 5.0


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_are_accepted_and_sampled(tmp_path: Path, fmt: str) -> None:
    path = animation(tmp_path / f"moving.{fmt.lower()}", fmt)
    info = video.probe(path)
    assert info.is_animated_image and info.format == fmt.lower() and info.mime == f"image/{fmt.lower()}"
    assert (info.width, info.height, info.frame_count) == (96, 64, 30)
    assert info.duration == pytest.approx(6.0)
    frames = video.sample_frames(path, every_seconds=1.0, scene_threshold=None)
    assert [f.timestamp for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5])
    assert frames[0].image.size == (96, 64)


def test_a_still_gif_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "still.gif"
    photo("coffee").resize((60, 40)).save(path, format="GIF")
    with pytest.raises(video.UnsupportedVideo) as caught:
        video.probe(path)
    assert caught.value.code == "not_animated"


def test_a_rotated_phone_video_is_sampled_upright(tmp_path: Path) -> None:
    path = tmp_path / "portrait.mp4"
    pixels = np.zeros((240, 320, 3), dtype=np.uint8)
    pixels[:60] = (255, 0, 0)  # a red band along the stored frame's top edge
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(video.mp4_codec(), rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.set_display_rotation(-90)  # a phone held upright: shown turned a quarter clockwise
        for index in range(5):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(path)
    assert (info.width, info.height, info.rotation) == (240, 320, -90)
    image = np.asarray(video.sample_frames(path)[0].image)
    assert image.shape[:2] == (320, 240)
    assert image[160, -10, 0] > 200 and image[160, 10, 0] < 50  # the band is now on the right


# --- pictures ----------------------------------------------------------------------------------


def test_poster_skips_a_fade_from_black_and_the_strip_spreads_frames() -> None:
    black = video.Frame(0.0, Image.new("RGB", (80, 60)))
    frames = [black] + [video.Frame(float(i), photo("chelsea").resize((80, 60))) for i in range(1, 12)]
    assert video.poster(frames).timestamp == 1.0
    strip = video.keyframe_strip(frames, height=30, count=4, gap=2)
    assert strip.size == (4 * 40 + 3 * 2, 30)


def test_write_mp4_falls_back_to_mpeg4(tmp_path: Path) -> None:
    frames = [np.full((40, 50, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    path = video.write_mp4(frames, tmp_path / "fallback.mp4", fps=5, codec="mpeg4")
    info = video.probe(path)
    assert (info.codec, info.width, info.height, info.frame_count) == ("mpeg4", 50, 40, 6)


# --- the video encoder -------------------------------------------------------------------------


def _sequences(dim: int = 48, count: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [l2_normalize(rng.standard_normal((int(rng.integers(3, 12)), dim))) for _ in range(count)]


def test_mean_pool_is_unit_length_and_the_untrained_gru_equals_it() -> None:
    frames = _sequences()[0]
    pooled = video_encoder.mean_pool(frames)
    assert pooled.dtype == np.float32 and np.linalg.norm(pooled) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(video_encoder.encode(video_encoder.VideoEncoder(48, hidden=16), frames), pooled,
                               atol=1e-6)


def test_the_gru_trains_a_step_saves_and_loads(tmp_path: Path) -> None:
    videos = _sequences()
    torch.manual_seed(5)
    initial = video_encoder.VideoEncoder(48, hidden=16)
    model, losses = video_encoder.train(videos, epochs=1, batch_size=len(videos), hidden=16, seed=5,
                                        source_key="test@1")
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0
    changed = [name for name, tensor in model.state_dict().items()
               if not torch.equal(tensor, initial.state_dict()[name])]
    assert "out.weight" in changed

    path = video_encoder.save(model, tmp_path / "encoder.pt", metadata={"collection": "abc"})
    loaded = video_encoder.load(path, dim=48, source_key="test@1")
    assert loaded.identifier == model.identifier
    assert loaded.metadata["collection"] == "abc" and loaded.metadata["losses"] == losses
    for frames in videos:
        assert np.array_equal(video_encoder.encode(loaded, frames), video_encoder.encode(model, frames))


def test_training_is_deterministic_under_a_seed() -> None:
    first = video_encoder.train(_sequences(), epochs=2, batch_size=4, hidden=16, seed=9)
    second = video_encoder.train(_sequences(), epochs=2, batch_size=4, hidden=16, seed=9)
    assert first[1] == second[1] and first[0].identifier == second[0].identifier


def test_load_refuses_a_checkpoint_of_another_dimension_or_backbone(tmp_path: Path) -> None:
    model, _ = video_encoder.train(_sequences(), epochs=1, hidden=16, source_key="efficientnet_lite0@imagenet-1")
    path = video_encoder.save(model, tmp_path / "encoder.pt")
    with pytest.raises(video_encoder.CheckpointMismatch, match="48-d frame vectors; the frame vectors here are 1280-d"):
        video_encoder.load(path, dim=1280)
    with pytest.raises(video_encoder.CheckpointMismatch, match="resnet50"):
        video_encoder.load(path, dim=48, source_key="resnet50@imagenet-v2")
    with pytest.raises(video_encoder.CheckpointMismatch, match="48-d"):
        video_encoder.encode(model, np.ones((3, 64), dtype=np.float32))


# --- finding moments with the real backbone -----------------------------------------------------


def test_an_image_finds_its_video_and_second(tmp_path: Path) -> None:
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    photos = [photo(n) for n in names]
    plan = [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]
    videos = make_video_set(photos, plan, tmp_path, shot_seconds=(2.5, 3.5), fps=5, seed=1)
    extractor = Extractor(get_backbone(DEFAULT_BACKBONE), device="cpu")
    sampled = [video.sample_frames(v.path) for v in videos]
    vectors = extractor.embed([f.image for frames in sampled for f in frames]).vectors
    owners = np.concatenate([np.full(len(frames), i) for i, frames in enumerate(sampled)])
    stamps = np.array([f.timestamp for frames in sampled for f in frames])
    rng = np.random.default_rng(0)
    for number, item in enumerate(videos):
        for shot in item.shots:
            query = extractor.embed([jittered_view(photos[shot.source], rng)]).vectors[0]
            best, where = best_frame_per_video(vectors @ query, owners, len(videos))
            assert int(np.argmax(best)) == number
            assert shot.start - 1.0 <= stamps[where[number]] <= shot.end + 1.0
