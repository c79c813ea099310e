"""Collections shared with editors: who sees, uploads, curates and manages, through HTTP."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, unit_vector
from webapp import selectors, storage
from webapp.models import Collection, CollectionEditor, Image, Visibility

pytestmark = pytest.mark.django_db


@pytest.fixture
def editor(django_user_model):
    return django_user_model.objects.create_user(username="edith", password="pw-edith-1")


@pytest.fixture
def editor_client(editor) -> Client:
    client = Client()
    client.force_login(editor)
    return client


@pytest.fixture
def shared(owner, editor) -> Collection:
    """A private collection of the owner, shared with the editor, holding one ready image."""
    collection = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE, name="Shared album")
    CollectionEditor.objects.create(collection=collection, user=editor)
    return collection


def test_the_owner_adds_an_editor_by_username(owner_client, owner, editor) -> None:
    collection = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    response = owner_client.post(reverse("collection_editor_add", args=[collection.key]), {"username": "edith"})
    assert response.status_code == 302
    assert list(collection.editors.all()) == [editor]
    page = owner_client.get(collection.get_absolute_url()).content.decode()
    assert "edith" in page and "Shared with" in page


def test_adding_an_unknown_user_or_the_owner_says_why(owner_client, owner) -> None:
    collection = CollectionFactory(owner=owner)
    response = owner_client.post(reverse("collection_editor_add", args=[collection.key]),
                                 {"username": "nobody"}, follow=True)
    assert "There is no user named nobody." in response.content.decode()
    response = owner_client.post(reverse("collection_editor_add", args=[collection.key]),
                                 {"username": "olivia"}, follow=True)
    assert "The owner already edits this collection." in response.content.decode()
    assert not CollectionEditor.objects.exists()


@pytest.mark.parametrize("persona", ["editor_client", "outsider_client", "anonymous_client"])
def test_only_the_owner_or_an_admin_manages_sharing(request, persona, shared, outsider) -> None:
    client = request.getfixturevalue(persona)
    response = client.post(reverse("collection_editor_add", args=[shared.key]), {"username": outsider.username})
    assert response.status_code in (302, 404)
    if response.status_code == 302:
        assert "/login/" in response["Location"]
    assert not CollectionEditor.objects.filter(user=outsider).exists()


def test_an_admin_may_share_any_collection(admin_client_, shared, outsider) -> None:
    admin_client_.post(reverse("collection_editor_add", args=[shared.key]), {"username": outsider.username})
    assert CollectionEditor.objects.filter(collection=shared, user=outsider).exists()


def test_the_owner_removes_an_editor_and_access_ends_at_once(owner_client, editor_client, shared, editor) -> None:
    assert editor_client.get(shared.get_absolute_url()).status_code == 200
    owner_client.post(reverse("collection_editor_remove", args=[shared.key, editor.pk]))
    assert not CollectionEditor.objects.exists()
    assert editor_client.get(shared.get_absolute_url()).status_code == 404


def test_an_editor_sees_a_private_shared_collection_listed_and_by_link(editor_client, outsider_client, shared) -> None:
    assert editor_client.get(shared.get_absolute_url()).status_code == 200
    assert shared.key in editor_client.get(reverse("home")).content.decode()
    assert outsider_client.get(shared.get_absolute_url()).status_code == 404
    assert shared.key not in outsider_client.get(reverse("home")).content.decode()


def test_an_editor_uploads_into_the_shared_collection(editor_client, outsider_client, shared, photos, editor) -> None:
    url = reverse("collection_upload", args=[shared.key])
    response = editor_client.post(url, {"files": [SimpleUploadedFile("cat.jpg", photos["chelsea.jpg"])]},
                                  HTTP_ACCEPT="application/json")
    assert response.status_code == 202
    assert Image.objects.get(collection=shared).uploaded_by == editor
    refused = outsider_client.post(url, {"files": [SimpleUploadedFile("x.jpg", photos["coffee.png"])]},
                                   HTTP_ACCEPT="application/json")
    assert refused.status_code == 404  # a private collection stays unknown to outsiders
    assert Image.objects.filter(collection=shared).count() == 1


def test_an_editor_deletes_an_image_but_an_outsider_cannot(
    editor_client, outsider_client, owner, photos, editor, django_capture_on_commit_callbacks
) -> None:
    public = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    CollectionEditor.objects.create(collection=public, user=editor)
    image = ImageFactory(collection=public)
    storage.write_atomic(image.file_path, photos["chelsea.jpg"])
    assert outsider_client.post(reverse("image_delete", args=[image.key])).status_code == 404
    assert Image.objects.filter(pk=image.pk).exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = editor_client.post(reverse("image_delete", args=[image.key]))
    assert response.status_code == 302 and response["Location"] == public.get_absolute_url()
    assert not Image.objects.filter(pk=image.pk).exists()
    assert not storage.media_path(image.file_path).exists()


def test_only_the_owner_changes_visibility_or_deletes_the_collection(editor_client, owner_client, shared) -> None:
    settings_url = reverse("collection_settings", args=[shared.key])
    assert editor_client.get(settings_url).status_code == 404
    assert editor_client.post(settings_url, {"name": "Mine", "visibility": "public"}).status_code == 404
    assert editor_client.post(reverse("collection_delete", args=[shared.key])).status_code == 404
    shared.refresh_from_db()
    assert shared.visibility == Visibility.PRIVATE and shared.name == "Shared album"

    response = owner_client.post(settings_url, {"name": "Album", "description": "", "visibility": "public"})
    assert response.status_code == 302
    shared.refresh_from_db()
    assert (shared.name, shared.visibility) == ("Album", Visibility.PUBLIC)
    assert owner_client.post(reverse("collection_delete", args=[shared.key])).status_code == 302
    assert not Collection.objects.filter(pk=shared.pk).exists()


def test_the_editor_link_is_offered_to_the_owner_only(owner_client, editor_client, shared) -> None:
    settings_link = reverse("collection_settings", args=[shared.key])
    assert settings_link in owner_client.get(shared.get_absolute_url()).content.decode()
    editor_page = editor_client.get(shared.get_absolute_url()).content.decode()
    assert settings_link not in editor_page and 'id="upload"' in editor_page


@pytest.fixture
def similar_world(owner, editor, settings):
    """A public query image, and in a private shared collection its nearest neighbour."""
    settings.SIMILAR_QE = 0
    version = default_version()
    public = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC)
    private = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE)
    CollectionEditor.objects.create(collection=private, user=editor)
    query = ImageFactory(collection=public)
    neighbour = ImageFactory(collection=private)
    embed(query, unit_vector(1), version)
    near = unit_vector(1) + 0.8 * unit_vector(2)  # similar, not a near-duplicate
    embed(neighbour, near / (near @ near) ** 0.5, version)
    return query, neighbour, private


def test_an_editor_gets_shared_images_as_similar_results(editor_client, outsider_client, similar_world) -> None:
    query, neighbour, _ = similar_world
    assert neighbour.key in editor_client.get(query.get_absolute_url()).content.decode()
    assert neighbour.key not in outsider_client.get(query.get_absolute_url()).content.decode()


def test_visibility_changes_take_effect_at_once(editor_client, outsider_client, anonymous_client, similar_world,
                                               owner_client) -> None:
    query, neighbour, private = similar_world
    assert neighbour.key not in anonymous_client.get(query.get_absolute_url()).content.decode()
    owner_client.post(reverse("collection_settings", args=[private.key]),
                      {"name": private.name, "description": "", "visibility": "public"})
    assert neighbour.key in anonymous_client.get(query.get_absolute_url()).content.decode()
    assert neighbour.key in outsider_client.get(query.get_absolute_url()).content.decode()
    owner_client.post(reverse("collection_settings", args=[private.key]),
                      {"name": private.name, "description": "", "visibility": "private"})
    assert neighbour.key not in outsider_client.get(query.get_absolute_url()).content.decode()
    assert neighbour.key in editor_client.get(query.get_absolute_url()).content.decode()


def test_the_visibility_predicates_agree_for_every_persona(owner, editor, outsider, admin_user, shared) -> None:
    from django.contrib.auth.models import AnonymousUser

    expected = {owner: True, editor: True, outsider: False, admin_user: True}
    for user, allowed in expected.items():
        assert selectors.can_view_collection(user, shared) is allowed
        assert selectors.collections_listed_for(user).filter(pk=shared.pk).exists() is allowed
    assert selectors.can_view_collection(AnonymousUser(), shared) is False
    assert selectors.can_upload(editor, shared) and selectors.can_curate(editor, shared)
    assert not selectors.can_manage(editor, shared)
    assert not selectors.can_upload(admin_user, shared) or selectors.can_manage(admin_user, shared)
