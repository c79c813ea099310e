"""Writes about who shares a collection: the owner adds and removes editors by username."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from webapp.models import Collection, CollectionEditor


def collection_editor_add(*, collection: Collection, username: str) -> CollectionEditor:
    """Make the user named `username` an editor of `collection`; adding twice is harmless.

    Raises `ValidationError` (code `unknown_user` or `owner`) when there is nobody to add.
    """
    name = username.strip()
    user = get_user_model().objects.filter(username=name).first()
    if user is None:
        raise ValidationError("There is no user named %(name)s.", code="unknown_user", params={"name": name})
    if user.pk == collection.owner_id:
        raise ValidationError("The owner already edits this collection.", code="owner")
    editor, _ = CollectionEditor.objects.get_or_create(collection=collection, user=user)
    return editor


def collection_editor_remove(*, collection: Collection, user_id: int) -> bool:
    """Stop sharing `collection` with a user; return whether they were an editor."""
    deleted, _ = CollectionEditor.objects.filter(collection=collection, user_id=user_id).delete()
    return deleted > 0
