"""A scene the tests render: a garage door seen by a fixed camera, closed, open or ajar, under
changing light and with sensor noise. Used to test training, conversion and the daemon on
images that are not digits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_daemon.preprocess import Image, as_image

STATES = ("ajar", "closed", "open")


def door(state: str, rng: np.random.Generator, size: int = 96) -> Image:
    """One camera view of the door in ``state`` (BGR, uint8)."""
    image = np.full((size, size, 3), (70, 90, 110), np.float32)  # a brick-ish wall
    left, right, top = size // 6, size - size // 6, size // 8
    panel = np.full((size - top, right - left, 3), (185, 185, 180), np.float32)
    for y in range(0, panel.shape[0], max(4, size // 8)):  # the door's horizontal sections
        panel[y : y + 2] = (120, 120, 118)
    opening = {"closed": 0.0, "ajar": 0.5, "open": 1.0}[state]
    gap = round(opening * panel.shape[0])
    if gap:
        panel[:gap] = (30, 28, 26)  # the dark garage inside
        panel[gap - max(2, size // 24) : gap] = (20, 20, 20)
    image[top:, left:right] = panel
    gain = rng.uniform(0.6, 1.3)  # daylight, clouds, dusk
    image = (image * gain + rng.normal(0, 8, image.shape)).astype(np.float32)
    dx, dy = rng.integers(-size // 20, size // 20 + 1, size=2)
    shifted = cv2.warpAffine(
        np.clip(image, 0, 255).astype(np.uint8),
        np.array([[1, 0, dx], [0, 1, dy]], np.float32),
        (size, size),
        borderMode=cv2.BORDER_REPLICATE,
    )
    return as_image(shifted)


def door_folder(root: Path, per_class: int, seed: int, size: int = 96) -> None:
    """``root/<state>/<n>.png``: a dataset folder of door views."""
    rng = np.random.default_rng(seed)
    for state in STATES:
        (root / state).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            cv2.imwrite(str(root / state / f"{n:03d}.png"), door(state, rng, size))
