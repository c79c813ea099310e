"""Writes that reorganise images between collections (admin actions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import F, Q

from webapp.models import Collection, Embedding, Image, NearDuplicate

logger = logging.getLogger(__name__)


@dataclass
class MoveSummary:
    moved: list[Image] = field(default_factory=list)
    #: Images left where they were because the target already holds the same file (by sha256).
    duplicates: list[Image] = field(default_factory=list)


def images_move(*, image_ids: list[int], target: Collection) -> MoveSummary:
    """Move images into `target`, skipping those whose content the target already holds."""
    summary = MoveSummary()
    sources: set[int] = set()
    with transaction.atomic():
        held = set(Image.objects.filter(collection=target).values_list("sha256", flat=True))
        for image in Image.objects.select_for_update().filter(pk__in=image_ids).order_by("id"):
            if image.collection_id == target.pk:
                continue
            if image.sha256 in held:
                summary.duplicates.append(image)
                continue
            sources.add(image.collection_id)
            held.add(image.sha256)
            image.collection = target
            image.save(update_fields=["collection", "updated_at"])
            summary.moved.append(image)
        # An augmented vector averages neighbours from its old collection; until the refresh
        # below runs, fall back to the image's own vector so nothing of the source leaks.
        Embedding.objects.filter(image__in=summary.moved).update(augmented=F("vector"), collection=target,
                                                                      augment_floor=None)
        # A near-duplicate pair belongs to one collection; the refresh finds the new ones.
        NearDuplicate.objects.filter(Q(first__in=summary.moved) | Q(second__in=summary.moved)).delete()
        for collection_id in sources | ({target.pk} if summary.moved else set()):
            transaction.on_commit(lambda cid=collection_id: _refresh(cid), robust=True)
    return summary


def _refresh(collection_id: int) -> None:
    from webapp.services import BULK_QUEUE, augment_full_request
    from webapp.tasks import augment_collection

    augment_full_request(collection_id)  # should this message be lost, the next refresh is full

    augment_collection.apply_async(args=[collection_id], queue=BULK_QUEUE)
