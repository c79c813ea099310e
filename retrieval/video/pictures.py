"""Pictures that stand for a video on a page: its poster frame and a strip of keyframes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from retrieval.video.formats import Frame
from retrieval.video.sampling import evenly

#: Poster: a frame darker than this mean luma (0-255), or flatter than this deviation, is skipped.
_DARK_LUMA = 24.0
_FLAT_STD = 8.0


def poster(frames: Sequence[Frame]) -> Frame:
    """Return the frame to show for the video: the first that is neither dark nor flat.

    Fades from black and title cards in one colour are skipped (mean luma under 24 of 255, or
    deviation under 8); when every frame is one of those, the one with the most contrast.
    """
    if not frames:
        raise ValueError("expected at least one frame")
    contrasts = []
    for frame in frames:
        luma = np.asarray(frame.image.convert("L"), dtype=np.float32)
        if luma.mean() >= _DARK_LUMA and luma.std() >= _FLAT_STD:
            return frame
        contrasts.append(float(luma.std()))
    return frames[int(np.argmax(contrasts))]


def keyframe_strip(
    frames: Sequence[Frame], *, height: int = 96, count: int = 8, gap: int = 2
) -> Image.Image:
    """Return a horizontal strip of up to `count` frames spread over the video, `height` pixels high.

    Args:
        frames: sampled frames, in time order.
        height: every frame is scaled to this height, aspect kept.
        count: frames in the strip at most (first and last included).
        gap: white pixels between frames.

    Returns:
        An RGB image; save it as JPEG for the web page.
    """
    if not frames:
        raise ValueError("expected at least one frame")
    chosen = evenly(frames, count)
    tiles = [
        f.image.resize((max(1, round(f.image.width * height / f.image.height)), height), Image.Resampling.LANCZOS)
        for f in chosen
    ]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return strip
