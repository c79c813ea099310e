"""Near-duplicates: found while a collection's vectors are refreshed, reviewed by its owner.

Exact copies never get this far (the upload is matched by its SHA-256 within the collection);
these are re-encoded, resized or lightly cropped copies, whose raw vectors are closer than
NEAR_DUPLICATE_DISTANCE (cosine distance; measured in docs/search.md). A reviewer keeps one
image of a group (the others are deleted) or marks a pair as not duplicates, which is
remembered: it is neither proposed again nor collapsed in similar-image results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from webapp.models import Collection, Image, NearDuplicate

Pair = tuple[int, int, float]


def pairs_in(scores: np.ndarray, image_ids: Sequence[int], *, rows: Sequence[int]) -> list[Pair]:
    """Return (first id, second id, distance) for each pair of rows closer than the threshold.

    `scores` holds cosine similarities of the collection's rows `rows` against all its rows; a
    pair whose two rows are both in `rows` comes twice (callers key pairs by their ids).
    """
    threshold = float(settings.NEAR_DUPLICATE_DISTANCE)
    if threshold <= 0:
        return []
    found, cols = np.nonzero(scores > 1.0 - threshold)
    pairs = []
    for row, col in zip(found.tolist(), cols.tolist(), strict=True):
        a, b = sorted((image_ids[rows[row]], image_ids[col]))
        pairs.append((a, b, max(0.0, 1.0 - float(scores[row, col]))))
    return pairs


def duplicates_record(*, collection_id: int, pairs: Sequence[Pair], image_ids: Sequence[int] | None = None) -> int:
    """Store the collection's current near-duplicate pairs; drop open ones that no longer hold.

    With `image_ids` (new or re-embedded images), `pairs` are theirs and only their open pairs
    are replaced: the collection's other pairs stand, as their vectors did not change. Pairs
    that still hold keep their rows (a review page may be about to dismiss one by id), and
    dismissed pairs stay as they are: a reviewer's answer outlives re-indexing.
    """
    found = {(a, b): distance for a, b, distance in pairs}
    with transaction.atomic():
        if found:
            # Only images in the collection now: a refresh reads its rows before it records, and
            # an image moved out meanwhile (its pairs deleted by the move) must not come back
            # into this collection's review. Read without row locks (they deadlocked with an
            # image's deletion, which removes pairs before the image): a move committing in the
            # instant between may leave a pair row, which the review never shows (below).
            here = set(Image.objects.filter(pk__in={i for pair in found for i in pair}, collection_id=collection_id)
                       .values_list("pk", flat=True))
            found = {pair: d for pair, d in found.items() if pair[0] in here and pair[1] in here}
        open_pairs = NearDuplicate.objects.filter(collection_id=collection_id, status=NearDuplicate.Status.OPEN)
        if image_ids is not None:
            open_pairs = open_pairs.filter(Q(first_id__in=image_ids) | Q(second_id__in=image_ids))
        stale = [pk for pk, a, b in open_pairs.values_list("pk", "first_id", "second_id") if (a, b) not in found]
        NearDuplicate.objects.filter(pk__in=stale).delete()
        NearDuplicate.objects.bulk_create(
            [NearDuplicate(collection_id=collection_id, first_id=a, second_id=b, distance=d) for (a, b), d in
             found.items()],
            ignore_conflicts=True,
        )
    return len(found)


@dataclass(frozen=True)
class DuplicateGroup:
    """Images linked by open near-duplicate pairs, and those pairs."""

    images: list[Image]
    pairs: list[NearDuplicate]


def duplicate_groups(*, collection: Collection) -> list[DuplicateGroup]:
    """Return the collection's groups of near-duplicates still to review, closest first."""
    pairs = list(
        # Both images in the collection: a pair never shows an image that has left it.
        NearDuplicate.objects.filter(collection=collection, status=NearDuplicate.Status.OPEN,
                                     first__collection=collection, second__collection=collection)
        .select_related("first", "second").order_by("distance", "id")
    )
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        parent[root(pair.first_id)] = root(pair.second_id)
    groups: dict[int, DuplicateGroup] = {}
    for pair in pairs:
        group = groups.setdefault(root(pair.first_id), DuplicateGroup(images=[], pairs=[]))
        group.pairs.append(pair)
        for image in (pair.first, pair.second):
            if image not in group.images:
                group.images.append(image)
    return list(groups.values())


def duplicate_pair(*, collection: Collection, pair_id: int) -> NearDuplicate | None:
    return NearDuplicate.objects.filter(collection=collection, pk=pair_id, first__collection=collection,
                                        second__collection=collection).first()


def duplicate_dismiss(*, pair: NearDuplicate, reviewer: object) -> None:
    """Remember that two images are not duplicates."""
    pair.status = NearDuplicate.Status.DISMISSED
    pair.reviewed_by = reviewer  # type: ignore[assignment]
    pair.reviewed_at = timezone.now()
    pair.save(update_fields=["status", "reviewed_by", "reviewed_at"])


def duplicate_keep(*, collection: Collection, keep: Image) -> list[Image]:
    """Keep one image of its group of open near-duplicates and delete the others; return them."""
    from webapp import services

    group = next((g for g in duplicate_groups(collection=collection) if keep in g.images), None)
    if group is None:
        return []
    # Only images linked by an open pair are in the group; dismissed pairs never join one.
    removed = []
    for image in group.images:
        if image.pk == keep.pk:
            continue
        with transaction.atomic():
            # Still in this collection at the moment it is deleted: a move committed since the
            # group was read takes it out of this reviewer's hands.
            current = Image.objects.select_for_update().filter(pk=image.pk, collection=collection).first()
            if current is not None:
                services.image_delete(image=current)
                removed.append(current)
    return removed


def open_duplicate_count(*, collection: Collection) -> int:
    return NearDuplicate.objects.filter(collection=collection, status=NearDuplicate.Status.OPEN,
                                        first__collection=collection, second__collection=collection).count()

