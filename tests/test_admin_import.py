"""Bulk import of a zip from the admin: folders become collections, hostile members are skipped."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from tests.conftest import media_files
from tests.factories import CollectionFactory
from webapp import imports
from webapp.models import Collection, Image

pytestmark = pytest.mark.django_db


def _zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return out.getvalue()


def test_each_top_level_folder_becomes_a_private_collection(owner, photos) -> None:
    archive = _zip({
        "cats/chelsea.jpg": photos["chelsea.jpg"],
        "cats/again/chelsea.jpg": photos["chelsea.jpg"],
        "things/coffee.png": photos["coffee.png"],
        "things/notes.txt": b"not an image",
        "loose.jpg": photos["rocket.webp"],
        "__MACOSX/cats/._chelsea.jpg": b"resource fork",
    })
    summary = imports.import_zip(fileobj=io.BytesIO(archive), owner=owner)
    assert (summary.accepted, summary.duplicates) == (2, 1)
    assert sorted(c.name for c in summary.collections) == ["cats", "things"]
    assert {c.visibility for c in Collection.objects.filter(owner=owner)} == {"private"}
    assert [name for name, _ in summary.rejected] == ["things/notes.txt", "loose.jpg"]
    assert Image.objects.get(original_name="coffee.png").collection.name == "things"


def test_importing_again_adds_to_the_same_collections(owner, photos) -> None:
    archive = _zip({"cats/chelsea.jpg": photos["chelsea.jpg"]})
    imports.import_zip(fileobj=io.BytesIO(archive), owner=owner)
    again = imports.import_zip(fileobj=io.BytesIO(archive), owner=owner)
    assert (again.accepted, again.duplicates) == (0, 1)
    assert Collection.objects.filter(owner=owner).count() == 1


def test_unsafe_members_are_skipped_and_never_written_under_their_names(owner, photos, tmp_path) -> None:
    collection = CollectionFactory(owner=owner)
    archive = _zip(
        {"../escape.jpg": photos["chelsea.jpg"], "/abs/path.jpg": photos["coffee.png"],
         "ok/fine.jpg": photos["astronaut.jpg"]},
        symlinks={"ok/link.jpg": "/etc/passwd"},
    )
    summary = imports.import_zip(fileobj=io.BytesIO(archive), owner=owner, collection=collection)
    assert summary.accepted == 1
    reasons = dict(summary.rejected)
    assert "Unsafe path" in reasons["../escape.jpg"] and "Unsafe path" in reasons["/abs/path.jpg"]
    assert "Symbolic link" in reasons["ok/link.jpg"]
    assert all("escape" not in str(path) and "fine" not in str(path) for path in media_files())


def test_a_zip_bomb_stops_at_the_size_cap(owner, settings) -> None:
    settings.IMPORT_MAX_TOTAL_BYTES = 5_000_000
    bomb = _zip({f"bomb/{i}.jpg": b"\0" * 4_000_000 for i in range(3)})
    assert len(bomb) < 100_000
    summary = imports.import_zip(fileobj=io.BytesIO(bomb), owner=owner)
    assert summary.accepted == 0
    assert any("stopped here" in reason for _, reason in summary.rejected)
    assert len(summary.rejected) == 2  # the first member was read (and rejected), then reading stopped


def test_the_member_count_is_capped(owner, settings, photos) -> None:
    settings.IMPORT_MAX_MEMBERS = 2
    summary = imports.import_zip(
        fileobj=io.BytesIO(_zip({f"many/{i}.txt": b"x" for i in range(5)})), owner=owner
    )
    assert summary.rejected[0] == ("(archive)", "Only the first 2 members were read.")
    assert len(summary.rejected) == 3


def test_a_file_that_is_not_a_zip_is_reported(owner) -> None:
    summary = imports.import_zip(fileobj=io.BytesIO(b"PK not really"), owner=owner)
    assert summary.rejected[0][0] == "(archive)"


def test_the_admin_import_page_shows_the_summary(admin_client_, owner_client, owner, admin_user, photos) -> None:
    assert owner_client.get(reverse("admin_import")).status_code == 302
    upload = SimpleUploadedFile("photos.zip", _zip({"trip/cat.jpg": photos["chelsea.jpg"], "trip/x.txt": b"x"}))
    response = admin_client_.post(reverse("admin_import"), {"archive": upload, "owner": owner.pk})
    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="import-accepted">1<' in page and "trip/x.txt" in page
    assert Collection.objects.get(name="trip").owner == owner
