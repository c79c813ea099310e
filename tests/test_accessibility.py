"""Accessibility in a real browser: alt text, labelled controls, text contrast (WCAG AA), and the
skip link first in the tab order (or the form field a page autofocuses)."""

from __future__ import annotations

import pytest

from tests.factories import CollectionFactory, ImageFactory
from webapp import storage
from webapp.models import Visibility

pytestmark = pytest.mark.django_db(transaction=True)

AUDIT = """() => {
  const lum = (rgb) => {
    const [r, g, b] = rgb.match(/[\\d.]+/g).slice(0, 3).map(Number).map(v => v / 255)
      .map(c => c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const background = (el) => { for (let e = el; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
      if (c && !c.startsWith('rgba(0, 0, 0, 0)') && c !== 'transparent') return c; } return 'rgb(255, 255, 255)'; };
  const problems = [];
  document.querySelectorAll('img').forEach(i => {
    if (!i.alt || !i.alt.trim()) problems.push('img without alt: ' + i.src);
  });
  document.querySelectorAll('input, select, textarea').forEach(c => {
    if (['hidden', 'submit', 'button'].includes(c.type) || c.closest('[hidden]')) return;
    const named = c.labels && c.labels.length || c.getAttribute('aria-label') || c.getAttribute('aria-labelledby');
    if (!named) problems.push('unlabelled control: ' + (c.name || c.id));
  });
  document.querySelectorAll('p, a, button, label, h1, h2, li, span, td, th').forEach(e => {
    if (!e.textContent.trim() || e.offsetParent === null) return;
    const s = getComputedStyle(e); const fg = lum(s.color), bg = lum(background(e));
    const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    const large = parseFloat(s.fontSize) >= 24 || (parseFloat(s.fontSize) >= 18.66 && Number(s.fontWeight) >= 700);
    const text = e.textContent.trim().slice(0, 30);
    if (ratio < (large ? 3 : 4.5)) problems.push(`contrast ${ratio.toFixed(2)} for "${text}"`);
  });
  return problems;
}"""


def test_main_pages_pass_a_basic_accessibility_audit(browser, live_server, owner, photos) -> None:
    collection = CollectionFactory(owner=owner, visibility=Visibility.PUBLIC, name="Audit")
    image = ImageFactory(collection=collection, original_name="cat.jpg")
    storage.write_atomic(image.thumbnail_path, photos["chelsea.jpg"])
    storage.write_atomic(image.file_path, photos["chelsea.jpg"])
    page = browser.new_page()
    for path in ("/", f"/c/{collection.key}/", f"/i/{image.key}/", "/search/", "/signup/", "/login/"):
        page.goto(live_server.url + path)
        assert page.evaluate(AUDIT) == [], path
        if page.evaluate("() => document.activeElement.autofocus"):
            continue  # sign-up and log-in forms start in their first field, as people expect
        page.keyboard.press("Tab")
        first = page.evaluate("() => document.activeElement.textContent.trim() || document.activeElement.tagName")
        assert first.lower().startswith("skip"), (path, first)
