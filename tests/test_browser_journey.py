"""A person's whole journey in a real browser, against the live server and a real Celery worker.

Sign up, create a collection, upload several photos at once (each with its own progress and
outcome), watch them become ready, open one, walk with the arrow keys, follow a similar image,
search by a dragged region, filter by a tag, and (as staff) read the index health page.
Screenshots of each main page go to test-artifacts/ (docs/img/ holds copies for the README,
copied by hand when the pages change).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.conftest import ARTIFACTS, near_copy
from webapp import tagging
from webapp.models import Image

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

READY_TIMEOUT_MS = 180_000  # the worker loads the CNN on its first task
#: ImageNet class 281 is "tabby, tabby cat".
TABBY = 281
SCREENSHOTS = ("home", "collection", "image", "search", "admin-health")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_visitor_signs_up_uploads_walks_searches_and_filters(
    browser, live_server, celery_worker_process, photos, django_user_model
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    app = live_server.url

    page.goto(f"{app}/signup/")
    page.fill("#id_username", "maya")
    page.fill("#id_password1", "a-long-pass-phrase-1")
    page.fill("#id_password2", "a-long-pass-phrase-1")
    page.click("main button[type=submit]")
    page.click("text=New collection")
    page.fill("#id_name", "Around the house")
    page.check("input[name=visibility][value=public]")
    page.click("main button[type=submit]")
    # Wait for the new page's load event: a click returns once its navigation commits, before
    # the deferred collection.js runs, and files chosen before then would go nowhere.
    page.wait_for_url(re.compile(r"/c/[^/]+/$"))

    files = {**{name: photos[name] for name in ("chelsea.jpg", "coffee.png", "astronaut.jpg", "rocket.webp")},
             "chelsea-copy.jpg": near_copy(photos["chelsea.jpg"])}
    mime = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    payload = [{"name": name, "mimeType": mime[name.rsplit(".", 1)[1]], "buffer": data} for name, data in files.items()]
    payload.append({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
    page.set_input_files("#files", payload)
    try:
        page.wait_for_function("() => document.querySelectorAll('.upload-row[data-outcome=accepted]').length === 5"
                               " && document.querySelectorAll('.upload-row[data-outcome=rejected]').length === 1")
    except PlaywrightTimeoutError:
        rows = page.locator(".upload-row").all_inner_texts()
        pytest.fail(f"the uploads did not end as expected; their rows read {rows}")
    rejected = page.locator(".upload-row[data-outcome=rejected]").inner_text()
    assert "notes.txt" in rejected and "Rejected: " in rejected
    page.wait_for_function("() => document.querySelectorAll('#grid .tile[data-status=ready]').length === 5",
                           timeout=READY_TIMEOUT_MS)
    # Drag-and-drop: a real drop event carrying a file (the first photo again: a duplicate).
    dropped = page.evaluate_handle(
        """(f) => { const dt = new DataTransfer();
                    dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: f.type})); return dt; }""",
        {"name": "dropped.jpg", "type": "image/jpeg", "bytes": list(photos["chelsea.jpg"])},
    )
    page.dispatch_event("#upload", "drop", {"dataTransfer": dropped})
    page.wait_for_selector(".upload-row[data-outcome=duplicate]")

    # The worker stores real tags (asserted in test_end_to_end.py); fixed ones keep this walk deterministic.
    cat_logits = np.zeros(1000, dtype=np.float32)
    cat_logits[TABBY] = 10.0
    for image in Image.objects.filter(original_name__startswith="chelsea"):
        assert tagging.image_tags_store(image_id=image.pk, logits=cat_logits) == ["tabby"]

    page.reload()
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth)")
    _shot(page, "collection")

    page.click("a.tag:has-text('tabby')")
    page.wait_for_url(re.compile(r"[?&]tag=tabby"))  # loaded, so the grid is whole before it is counted
    assert page.locator("#grid .tile").count() == 2

    page.goto(app + Image.objects.get(original_name="chelsea.jpg").get_absolute_url())
    page.wait_for_selector("#similar")
    assert "tabby" in page.locator("#image-tags").inner_text()
    first_similar = page.locator("#similar .tile a").first
    assert "chelsea-copy.jpg" == first_similar.locator("img").get_attribute("alt")
    page.wait_for_function("() => document.getElementById('main-image').naturalWidth > 0")
    _shot(page, "image")

    here = page.url
    page.keyboard.press("ArrowRight" if page.locator("#next-image").count() else "ArrowLeft")
    page.wait_for_url(lambda url: url != here and "/i/" in url)
    page.go_back()

    first_similar = page.locator("#similar .tile a").first
    first_similar.click()
    page.wait_for_selector("h1.image-title:has-text('chelsea-copy.jpg')")

    page.go_back()
    box = page.locator("#main-image").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    assert page.locator("#region-box").is_visible()
    page.click("#region-search")
    page.wait_for_url(f"{app}/search/", timeout=90_000)
    page.wait_for_selector("#results .tile")
    alts = page.locator("#results img").evaluate_all("els => els.map(e => e.alt)")
    assert alts[0].startswith("chelsea")
    _shot(page, "search")

    page.goto(f"{app}/")
    page.wait_for_function("() => [...document.querySelectorAll('.cover img')].every(i => i.naturalWidth)")
    assert page.locator(".cover img").count() == 4
    _shot(page, "home")

    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True, storage_state=context.storage_state())
    mobile = phone.new_page()
    mobile.goto(page.url.rstrip("/") + Image.objects.get(original_name="coffee.png").collection.get_absolute_url())
    assert mobile.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    _shot(mobile, "collection-phone")
    phone.close()

    django_user_model.objects.create_superuser(username="root", password="root-pass-1")
    page.goto(f"{app}/admin/login/?next=/admin/health/")
    page.fill("#id_username", "root")
    page.fill("#id_password", "root-pass-1")
    page.click("input[type=submit]")
    page.wait_for_selector("#health-status")
    assert page.locator('td[data-status="ready"]').inner_text() == "5"
    assert page.locator("#health-workers").inner_text() != "no answer"
    _shot(page, "admin-health")
    context.close()

    assert errors == []
    for name in SCREENSHOTS:  # docs/img/ holds copies, refreshed by hand: tests never write docs
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
