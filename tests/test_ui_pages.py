"""The browsing pages at the HTTP level: home mosaics, collection grid filters, image page, tags."""

from __future__ import annotations

import io

import pytest
from django.urls import reverse
from PIL import Image as PILImage

from tests.conftest import photo_bytes
from tests.factories import CollectionFactory, ImageFactory
from webapp import storage
from webapp.models import CollectionEditor, ImageStatus, ImageTag, Visibility

pytestmark = pytest.mark.django_db


def _thumbed(collection, array=None, **fields):
    from skimage import data

    image = ImageFactory(collection=collection, **fields)
    storage.write_atomic(image.thumbnail_path, photo_bytes(data.chelsea() if array is None else array))
    return image


def test_home_shows_a_cover_of_at_most_four_ready_thumbnails_with_counts(anonymous_client, owner) -> None:
    public = CollectionFactory(owner=owner, name="Cats", visibility=Visibility.PUBLIC)
    ready = [_thumbed(public) for _ in range(5)]
    ImageFactory(collection=public, status=ImageStatus.PENDING, thumbnail_path="")
    page = anonymous_client.get(reverse("home")).content.decode()
    assert "5 of 6 images ready" in page
    covered = [image.key for image in ready if reverse("media_thumbnail_small", args=[image.key]) in page]
    assert covered == [image.key for image in ready[1:]]  # the four newest


def test_home_lists_only_collections_the_viewer_may_see(anonymous_client, outsider_client, owner_client,
                                                        owner, outsider) -> None:
    public = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    private = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    unlisted = CollectionFactory(owner=owner, visibility=Visibility.UNLISTED)
    secret = _thumbed(private)
    for client, expected in ((anonymous_client, {public}), (outsider_client, {public}),
                             (owner_client, {public, private, unlisted})):
        page = client.get(reverse("home")).content.decode()
        assert {c for c in (public, private, unlisted) if c.key in page} == expected
    assert secret.key not in anonymous_client.get(reverse("home")).content.decode()
    CollectionEditor.objects.create(collection=private, user=outsider)
    assert secret.key in outsider_client.get(reverse("home")).content.decode()


def test_the_collection_grid_has_lazy_thumbnails_in_two_sizes(anonymous_client, owner) -> None:
    collection = CollectionFactory(owner=owner)
    image = _thumbed(collection)
    page = anonymous_client.get(collection.get_absolute_url()).content.decode()
    small, large = reverse("media_thumbnail_small", args=[image.key]), reverse("media_thumbnail", args=[image.key])
    assert f'srcset="{small} 200w, {large} 400w"' in page
    assert 'loading="lazy"' in page and f'alt="{image.original_name}"' in page


def test_the_small_thumbnail_is_made_once_and_kept_on_disk(anonymous_client, owner) -> None:
    image = _thumbed(CollectionFactory(owner=owner))
    response = anonymous_client.get(reverse("media_thumbnail_small", args=[image.key]))
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"
    small = PILImage.open(io.BytesIO(b"".join(response.streaming_content)))
    assert max(small.size) == 200
    cached = storage.media_path("thumbnails-small/" + image.thumbnail_path.split("/", 1)[1])
    assert cached.exists()
    cached.write_bytes(photo_bytes(__import__("numpy").zeros((10, 10, 3), dtype="uint8")))
    again = anonymous_client.get(reverse("media_thumbnail_small", args=[image.key]))
    assert PILImage.open(io.BytesIO(b"".join(again.streaming_content))).size == (10, 10)  # served from disk


def test_the_small_thumbnail_of_a_private_image_is_refused(anonymous_client, outsider_client, owner) -> None:
    image = _thumbed(CollectionFactory(owner=owner, visibility=Visibility.PRIVATE))
    for client in (anonymous_client, outsider_client):
        assert client.get(reverse("media_thumbnail_small", args=[image.key])).status_code == 404


def test_pages_keep_sort_and_filters_in_their_links(anonymous_client, owner, settings) -> None:
    settings.PAGE_SIZE = 2
    collection = CollectionFactory(owner=owner)
    names = ["delta.jpg", "alpha.jpg", "charlie.jpg", "bravo.jpg", "echo.jpg"]
    images = [ImageFactory(collection=collection, original_name=name) for name in names]
    ImageTag.objects.create(image=images[0], label="tabby", confidence=0.8)
    ImageTag.objects.create(image=images[2], label="tabby", confidence=0.6)
    url = collection.get_absolute_url()

    page = anonymous_client.get(url, {"sort": "name"}).content.decode()
    assert page.index("alpha.jpg") < page.index("bravo.jpg") and "charlie.jpg" not in page
    assert "?page=2&amp;sort=name" in page
    page2 = anonymous_client.get(url, {"sort": "name", "page": 2}).content.decode()
    assert "charlie.jpg" in page2 and "delta.jpg" in page2 and "alpha.jpg" not in page2

    tagged = anonymous_client.get(url, {"tag": "tabby"}).content.decode()
    assert "delta.jpg" in tagged and "charlie.jpg" in tagged and "alpha.jpg" not in tagged
    assert 'aria-current="true">tabby' in tagged

    newest = anonymous_client.get(url).content.decode()
    assert newest.index("echo.jpg") < newest.index("bravo.jpg")


def test_filter_by_status_and_text_search_over_names_and_tags(anonymous_client, owner) -> None:
    collection = CollectionFactory(owner=owner)
    ImageFactory(collection=collection, original_name="ready.jpg")
    failed = ImageFactory(collection=collection, original_name="broken.jpg", status=ImageStatus.FAILED, error="bad")
    kitty = ImageFactory(collection=collection, original_name="IMG_0001.jpg")
    ImageTag.objects.create(image=kitty, label="tiger cat", confidence=0.5)
    url = collection.get_absolute_url()
    page = anonymous_client.get(url, {"status": "failed"}).content.decode()
    assert failed.key in page and "ready.jpg" not in page
    assert kitty.key in anonymous_client.get(url, {"q": "tiger"}).content.decode()
    by_name = anonymous_client.get(url, {"q": "broken"}).content.decode()
    assert failed.key in by_name and kitty.key not in by_name
    assert "No images match." in anonymous_client.get(url, {"q": "zebra"}).content.decode()


def test_the_image_page_shows_metadata_tags_and_neighbours(anonymous_client, owner) -> None:
    collection = CollectionFactory(owner=owner, name="Holiday")
    older, middle, newer = (ImageFactory(collection=collection, uploaded_by=owner) for _ in range(3))
    ImageTag.objects.create(image=middle, label="tabby", confidence=0.42)
    page = anonymous_client.get(middle.get_absolute_url()).content.decode()
    assert "640 × 480 px" in page and "image/jpeg" in page and "olivia" in page and "Holiday" in page
    assert f'id="prev-image" href="{newer.get_absolute_url()}"' in page
    assert f'id="next-image" href="{older.get_absolute_url()}"' in page
    assert f'{collection.get_absolute_url()}?tag=tabby' in page and "42%" in page
    first = anonymous_client.get(newer.get_absolute_url()).content.decode()
    assert 'id="prev-image"' not in first and 'id="next-image"' in first
    assert 'id="region-search"' in page and "js/image.js" in page


def test_the_tag_page_respects_visibility(anonymous_client, outsider_client, owner_client, owner, outsider) -> None:
    public = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PUBLIC))
    unlisted = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.UNLISTED))
    private = ImageFactory(collection=CollectionFactory(owner=owner, visibility=Visibility.PRIVATE))
    for image in (public, unlisted, private):
        ImageTag.objects.create(image=image, label="golden retriever", confidence=0.9)
    url = reverse("tag", args=["golden retriever"])
    for client, expected in ((anonymous_client, {public}), (outsider_client, {public}),
                             (owner_client, {public, unlisted, private})):
        page = client.get(url).content.decode()
        assert {i for i in (public, unlisted, private) if i.key in page} == expected
    CollectionEditor.objects.create(collection=private.collection, user=outsider)
    assert private.key in outsider_client.get(url).content.decode()


def test_the_settings_page_is_for_the_owner(owner_client, outsider_client, anonymous_client, owner) -> None:
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    url = reverse("collection_settings", args=[collection.key])
    assert owner_client.get(url).status_code == 200
    assert outsider_client.get(url).status_code == 404
    assert anonymous_client.get(url).status_code == 302


def test_pages_have_a_skip_link_and_labelled_controls(owner_client, owner) -> None:
    collection = CollectionFactory(owner=owner)
    page = owner_client.get(collection.get_absolute_url()).content.decode()
    assert 'href="#main"' in page and 'id="main"' in page
    for control in ("files", "f-q", "f-sort", "f-status", "id_username"):
        assert f'for="{control}"' in page


def test_the_small_thumbnail_keeps_the_colour_profile_of_the_thumbnail(anonymous_client, owner) -> None:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = _thumbed(CollectionFactory(owner=owner))
    out = io.BytesIO()
    PILImage.new("RGB", (400, 300), (200, 40, 40)).save(out, format="JPEG", icc_profile=profile)
    storage.write_atomic(image.thumbnail_path, out.getvalue())
    response = anonymous_client.get(reverse("media_thumbnail_small", args=[image.key]))
    small = PILImage.open(io.BytesIO(b"".join(response.streaming_content)))
    assert small.size == (200, 150) and small.info.get("icc_profile") == profile
