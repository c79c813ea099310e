"""The embeddable widget in a real browser, on a page served from another origin."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS, photo_bytes
from tests.factories import CollectionFactory, ImageFactory, default_version, embed, unit_vector
from webapp import storage
from webapp.models import Visibility

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gallery(owner, photos, settings):
    """A public query image with four neighbours (real thumbnails), and a private image."""
    from skimage import data

    settings.SIMILAR_QE = 0  # the vectors are synthetic: keep their plain cosine order

    version = default_version()
    public = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    private = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    arrays = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut(), data.stereo_motorcycle()[0]]
    images = []
    for index, array in enumerate(arrays):
        image = ImageFactory(collection=public, original_name=f"photo {index}")
        thumb = photo_bytes(array)
        storage.write_atomic(image.thumbnail_path, thumb)
        storage.write_atomic(image.file_path, thumb)
        # Further from photo 0 as the index grows, each off in its own direction: an order to
        # check, and no two results near-duplicates of each other (they would show once).
        vector = unit_vector(1) + 0.5 * index * unit_vector(10 + index)
        embed(image, vector / (vector @ vector) ** 0.5, version)
        images.append(image)
    secret = ImageFactory(collection=private)
    storage.write_atomic(secret.thumbnail_path, photo_bytes(arrays[0]))
    embed(secret, unit_vector(1), version)
    return images, secret


def test_the_widget_and_iframe_render_on_another_origin(browser, live_server, other_origin, gallery) -> None:
    images, secret = gallery
    site_dir, site_url = other_origin
    app = live_server.url
    (site_dir / "index.html").write_text(f"""<!doctype html><html><head><title>A blog</title></head><body>
      <h1>My blog post</h1>
      <div id="one" data-simili-similar="{images[0].key}" data-limit="3"></div>
      <div id="two" data-simili-similar="{images[1].key}" data-limit="2"></div>
      <div id="secret" data-simili-similar="{secret.key}"></div>
      <div id="unknown" data-simili-similar="no-such-image"></div>
      <div id="down" data-simili-similar="{images[0].key}" data-simili-base="http://127.0.0.1:9"></div>
      <iframe id="frame" src="{app}/embed/similar/{images[0].key}/?limit=4" width="600" height="200"></iframe>
      <script src="{app}/static/widget.js" async></script>
    </body></html>""")
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(f"{site_url}/index.html")
    for selector in ("#one", "#two", "#secret", "#unknown", "#down"):
        page.wait_for_selector(
            f"{selector}[data-simili-state=done], {selector}[data-simili-state=error]", state="attached"
        )

    one = page.locator("#one img")
    assert one.count() == 3
    assert [one.nth(i).get_attribute("alt") for i in range(3)] == ["photo 1", "photo 2", "photo 3"]
    assert one.nth(0).get_attribute("loading") == "lazy"
    page.wait_for_function("() => [...document.querySelectorAll('#one img')].every(i => i.naturalWidth > 0)")
    assert page.locator("#two img").count() == 2
    assert page.locator("#secret *").count() == 0
    assert page.locator("#unknown *").count() == 0
    assert page.locator("#down *").count() == 0  # a server that is down: nothing, no broken layout
    assert page.locator("#down").get_attribute("data-simili-state") == "error"
    assert any("Simili widget" in e for e in errors)

    href = page.locator("#one a").first.get_attribute("href")
    assert href == f"{app}/i/{images[1].key}/"
    frame = page.frame_locator("#frame")
    assert frame.locator("img").count() == 4
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "widget.png"), full_page=True)

    page.goto(href)
    assert page.title().startswith("photo 1")


def test_a_private_image_renders_nothing_in_the_iframe(browser, live_server, other_origin, gallery) -> None:
    _, secret = gallery
    site_dir, site_url = other_origin
    (site_dir / "frame.html").write_text(
        f'<iframe id="f" src="{live_server.url}/embed/similar/{secret.key}/"></iframe>'
    )
    page = browser.new_page()
    response = page.request.get(f"{live_server.url}/embed/similar/{secret.key}/")
    assert response.status == 404
    page.goto(f"{site_url}/frame.html")
    page.wait_for_timeout(500)
    assert page.frame_locator("#f").locator("img[src*='/media/']").count() == 0


def test_other_pages_refuse_to_be_framed(client, gallery) -> None:
    images, _ = gallery
    assert client.get(f"/i/{images[0].key}/")["X-Frame-Options"] == "DENY"
    embed_page = client.get(f"/embed/similar/{images[0].key}/")
    assert "X-Frame-Options" not in embed_page
    assert embed_page["Content-Security-Policy"] == "frame-ancestors *"
