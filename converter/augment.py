"""Camera-like augmentation: what a fixed camera does to a scene from one frame to the next.

Each copy of a training image is shifted and turned a little (a camera is never framed exactly
as the dataset was), made brighter or darker and of more or less contrast (daylight, clouds,
headlights, auto-exposure), given sensor noise, and sometimes blurred (focus, motion,
compression). It works on the 8-bit images the daemon sees, before preprocessing, so the same
code path prepares originals and copies. The originals are always kept.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from edge_daemon.preprocess import Image, as_image


def camera_like(image: Image, rng: np.random.Generator, strength: float = 1.0) -> Image:
    """One randomly changed copy of ``image`` (gray or BGR, uint8)."""
    height, width = image.shape[:2]
    angle = rng.uniform(-10, 10) * strength
    shift = 0.1 * strength * min(height, width)
    dx, dy = rng.uniform(-shift, shift, size=2)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    matrix[:, 2] += (dx, dy)
    moved = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    pixels = moved.astype(np.float32)
    contrast = rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    brightness = rng.uniform(-30, 30) * strength
    mean = float(pixels.mean())
    pixels = (pixels - mean) * contrast + mean + brightness
    pixels += rng.normal(0.0, rng.uniform(0, 8) * strength, size=pixels.shape)
    out = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    if rng.random() < 0.3 * strength:
        out = as_image(cv2.GaussianBlur(out, (3, 3), 0))
    return as_image(out.reshape(image.shape))


def augment_images(
    images: list[Image],
    labels: npt.NDArray[np.int64],
    copies: int,
    seed: int,
) -> tuple[list[Image], npt.NDArray[np.int64]]:
    """The images plus ``copies`` camera-like copies of each, seeded; labels to match."""
    if copies <= 0:
        return list(images), labels
    rng = np.random.default_rng(seed)
    out = list(images)
    for _ in range(copies):
        out += [camera_like(image, rng) for image in images]
    return out, np.tile(labels, copies + 1)
