"""Keyed URLs built from a cached pattern equal Django's own reverse(), whatever the script prefix."""

from __future__ import annotations

import pytest
from django.urls import URLPattern, get_resolver, reverse, set_script_prefix

from webapp.links import keyed_url
from webapp.models import new_key


def _keyed_routes() -> list[str]:
    names = []
    for pattern in get_resolver().url_patterns:
        if isinstance(pattern, URLPattern) and pattern.name and list(pattern.pattern.converters) == ["key"]:
            names.append(pattern.name)
    return names


def test_there_are_keyed_routes_to_check() -> None:
    assert {"image", "collection", "video", "media_thumbnail", "media_thumbnail_small"} <= set(_keyed_routes())


@pytest.mark.parametrize("prefix", ["/", "/simili/"])
def test_a_keyed_url_is_what_reverse_gives(prefix: str) -> None:
    set_script_prefix(prefix)
    try:
        for name in _keyed_routes():
            for key in (new_key(), "abc-_XYZ09", "a key with spaces", "ünï"):
                assert keyed_url(name, key) == reverse(name, args=[key]), (name, key)
            assert keyed_url(name, "k1").startswith(prefix)
    finally:
        set_script_prefix("/")
