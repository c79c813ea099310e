"""`{% key_url 'route' key %}`: `{% url %}` for keyed routes, without a `reverse()` per call."""

from __future__ import annotations

from django import template

from webapp.links import keyed_url

register = template.Library()


@register.simple_tag
def key_url(name: str, key: str) -> str:
    return keyed_url(name, key)
