"""Auto-tags from the backbone's real ImageNet logits, stored per image and shown as filters."""

from __future__ import annotations

import numpy as np
import pytest

from tests.factories import CollectionFactory, ImageFactory
from webapp import tagging
from webapp.models import ImageTag

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def chelsea_logits() -> np.ndarray:
    from PIL import Image as PILImage
    from skimage import data

    from retrieval.backbones import get_backbone
    from retrieval.extraction import Extractor

    extractor = Extractor(get_backbone("efficientnet_lite0"), device="cpu")
    logits = extractor.embed([PILImage.fromarray(data.chelsea())]).logits
    assert logits is not None
    return logits[0]


def test_a_cat_photo_is_tagged_with_short_cat_labels(chelsea_logits) -> None:
    image = ImageFactory()
    labels = tagging.image_tags_store(image_id=image.pk, logits=chelsea_logits)
    assert labels and labels[0] in {"tabby", "tiger cat", "Egyptian cat"}
    stored = list(ImageTag.objects.filter(image=image))
    assert [tag.label for tag in stored] == labels  # most confident first
    assert all(tag.confidence >= 0.15 and "," not in tag.label for tag in stored)
    assert len(stored) <= tagging.MAX_TAGS


def test_the_threshold_setting_drops_unsure_labels_and_storing_again_replaces(chelsea_logits, settings) -> None:
    image = ImageFactory()
    settings.AUTO_TAG_THRESHOLD = 0.0
    assert len(tagging.image_tags_store(image_id=image.pk, logits=chelsea_logits)) == tagging.MAX_TAGS
    settings.AUTO_TAG_THRESHOLD = 0.99
    assert tagging.image_tags_store(image_id=image.pk, logits=chelsea_logits) == []
    assert not ImageTag.objects.filter(image=image).exists()


def test_no_logits_or_a_deleted_image_store_nothing(chelsea_logits) -> None:
    image = ImageFactory()
    assert tagging.image_tags_store(image_id=image.pk, logits=None) == []
    assert tagging.image_tags_store(image_id=10**9, logits=chelsea_logits) == []
    assert not ImageTag.objects.exists()


def test_labels_keep_their_first_synonym() -> None:
    assert tagging.short_label("tabby, tabby cat") == "tabby"
    assert tagging.short_label("golden retriever") == "golden retriever"


def test_stored_tags_become_collection_filters(client, chelsea_logits) -> None:
    collection = CollectionFactory()
    cat, other = ImageFactory(collection=collection), ImageFactory(collection=collection)
    label = tagging.image_tags_store(image_id=cat.pk, logits=chelsea_logits)[0]
    page = client.get(collection.get_absolute_url()).content.decode()
    assert f">{label} <span class=\"n\">1</span>" in page
    filtered = client.get(collection.get_absolute_url(), {"tag": label}).content.decode()
    assert cat.key in filtered and other.key not in filtered
