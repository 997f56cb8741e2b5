"""Snapshot JPEGs: a camera frame scaled down, with a region's box and label drawn on it."""

from __future__ import annotations

import cv2
import numpy as np

from edge_daemon.preprocess import Image

#: Box and label colours (BGR): green for a label, grey for nothing recognised.
LABEL_COLOUR = (60, 200, 60)
NONE_COLOUR = (160, 160, 160)


def render(
    image: Image,
    box: tuple[int, int, int, int],
    text: str,
    *,
    recognised: bool,
    max_width: int,
    quality: int,
) -> bytes:
    """The frame as a JPEG, at most ``max_width`` wide, with ``box`` (x, y, w, h in the frame's
    pixels) outlined and ``text`` written above it (below when there is no room)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_width / width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    else:
        picture = image.copy()
    if picture.ndim == 2 or picture.shape[2] == 1:
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
    colour = LABEL_COLOUR if recognised else NONE_COLOUR
    x, y, w, h = (round(v * scale) for v in box)
    out_h, out_w = picture.shape[:2]
    thickness = max(2, round(out_w / 320))
    cv2.rectangle(picture, (x, y), (x + w - 1, y + h - 1), colour, thickness)
    font_scale = max(0.4, out_w / 800)
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    pad = 3
    top = y - text_h - baseline - 2 * pad
    if top < 0:  # no room above the box: inside it, at its top
        top = min(y, out_h - text_h - baseline - 2 * pad)
    left = min(x, max(0, out_w - text_w - 2 * pad))
    bottom = top + text_h + baseline + 2 * pad
    cv2.rectangle(picture, (left, max(0, top)), (left + text_w + 2 * pad, bottom), colour, -1)
    cv2.putText(
        picture,
        text,
        (left + pad, bottom - baseline - pad),
        cv2.FONT_HERSHEY_SIMPLEX,
        font_scale,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    ok, jpeg = cv2.imencode(
        ".jpg", np.ascontiguousarray(picture), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("the frame could not be encoded as JPEG")
    return bytes(jpeg.tobytes())
