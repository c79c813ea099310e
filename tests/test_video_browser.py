"""In a real browser: a photo's page lists a video moment; clicking it plays the video from there."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS
from tests.test_accessibility import AUDIT
from tests.test_videos import jittered_crop, make_clip, wait_ready
from webapp import services, videos
from webapp.models import Video

pytestmark = pytest.mark.django_db(transaction=True)


def test_clicking_a_moment_plays_the_video_from_that_second(browser, live_server, owner, tmp_path) -> None:
    collection = services.collection_create(owner=owner, name="Clips", visibility="public")
    shots = make_clip(tmp_path / "a.mp4", ["astronaut", "coffee"], [3.0, 4.0], seed=4)
    video = videos.video_ingest(collection=collection, uploaded_by=owner, data=(tmp_path / "a.mp4").read_bytes(),
                                name="kitchen.mp4").video
    # A Celery worker left running by an earlier test may take the queued index task first;
    # then this call returns at once, so wait for whichever indexes it.
    videos.video_index(video_id=video.pk)
    wait_ready(Video, [video.key])
    photo = services.image_ingest(collection=collection, uploaded_by=owner, data=jittered_crop("coffee"),
                                  name="cup.jpg", queue=None).image
    services.image_embed(image_id=photo.pk)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_server.url}{photo.get_absolute_url()}")
    moment = page.locator("#moments a.moment").first
    timestamp = float(moment.get_attribute("data-timestamp"))
    assert shots[1][0] - 1.0 <= timestamp <= shots[1][1]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "image-moments.png"), full_page=True)
    assert page.evaluate(AUDIT) == []  # alt text, labels, contrast of the timecodes
    moment.click()
    page.wait_for_url(f"**/v/{video.key}/?t=*")
    page.wait_for_function("() => { const v = document.getElementById('player');"
                           " return v && v.readyState >= 1 && !v.error; }", timeout=20_000)
    page.wait_for_function(f"() => document.getElementById('player').currentTime >= {timestamp} - 0.25",
                           timeout=20_000)
    position = page.evaluate("() => document.getElementById('player').currentTime")
    assert timestamp - 0.25 <= position <= timestamp + 2.0
    assert page.evaluate("() => document.getElementById('player').error") is None
    page.screenshot(path=str(ARTIFACTS / "video.png"), full_page=True)
    assert page.evaluate(AUDIT) == []

    # A keyframe click seeks without leaving the page.
    first = page.locator("#keyframes a").first
    first.click()
    page.wait_for_function("() => document.getElementById('player').currentTime < 0.5", timeout=10_000)
    assert page.url.endswith("?t=0.0") or page.url.endswith("?t=0")
    assert errors == []
    context.close()
