"""Fuzzing the image-loading path: mutated headers and bytes end in a clean rejection, never a crash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrieval import imaging
from retrieval.errors import ImageRejected

# Pillow warns about the damage it skips over; the damage is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _seed(fmt: str) -> bytes:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    if fmt == "GIF":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


SEEDS = {fmt: _seed(fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF")}


def _try(data: bytes) -> None:
    for check in (imaging.inspect_image, imaging.load_image):
        try:
            check(data, max_pixels=4_000_000)
        except ImageRejected:
            pass


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate" and len(data) > 1:
            del data[draw(st.integers(1, len(data) - 1)):]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "header":
            # Header fields (sizes, counts, offsets) are where decoders trust input most.
            for at in range(min(len(data), 64)):
                if draw(st.integers(0, 15)) == 0:
                    data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_load_or_are_rejected_cleanly(data: bytes) -> None:
    _try(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected_cleanly(data: bytes) -> None:
    _try(data)


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_every_seed_is_itself_accepted(fmt: str) -> None:
    assert imaging.inspect_image(SEEDS[fmt]).width == 32
