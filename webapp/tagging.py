"""Auto-tags: the ImageNet labels the backbone's classifier is confident about, stored per image."""

from __future__ import annotations

import numpy as np
from django.conf import settings
from django.db import transaction

from retrieval.extraction import imagenet_labels
from webapp.models import Image, ImageTag

#: Tags kept per image at most; past five, ImageNet's softmax rarely has confident labels left.
MAX_TAGS = 5
#: Softmax confidence below which a label is noise (AUTO_TAG_THRESHOLD overrides it).
DEFAULT_THRESHOLD = 0.15


def short_label(description: str) -> str:
    """Return a label's first synonym: "tabby, tabby cat" becomes "tabby"."""
    return description.split(",", 1)[0].strip()[:100]


def tags_from_logits(logits: np.ndarray) -> dict[str, float]:
    """Return the confident ImageNet labels of one classifier row, best first, with confidences."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    threshold = float(getattr(settings, "AUTO_TAG_THRESHOLD", DEFAULT_THRESHOLD))
    chosen: dict[str, float] = {}
    for description, confidence in imagenet_labels(row[None], top=MAX_TAGS)[0]:
        label = short_label(description)
        if confidence >= threshold and label and label not in chosen:
            chosen[label] = confidence
    return chosen


def images_tags_replace(tags: dict[int, dict[str, float]]) -> None:
    """Replace the auto-tags of many images at once: one delete and one insert for a whole batch."""
    ImageTag.objects.filter(image_id__in=list(tags)).delete()
    ImageTag.objects.bulk_create(
        [ImageTag(image_id=image_id, label=label, confidence=conf)
         for image_id, chosen in tags.items() for label, conf in chosen.items()]
    )


def image_tags_store(*, image_id: int, logits: np.ndarray | None) -> list[str]:
    """Replace an image's auto-tags with its confident ImageNet labels; return them, best first.

    `logits` is the classifier's row for this image (1000 ImageNet classes), or None when the
    backbone has no classifier, which leaves the image untagged.
    """
    if logits is None:
        return []
    chosen = tags_from_logits(logits)
    with transaction.atomic():
        if not Image.objects.select_for_update().filter(pk=image_id).exists():
            return []
        images_tags_replace({image_id: chosen})
    return list(chosen)
