"""The sample clip: held-out digits as a camera would see them, for the demo and the tests.

Each held-out digit (never trained on) is shown for a few frames, drifting across a dark panel
set in a textured, noisy scene. The sidecar JSON names the region of interest and the ground
truth of every frame, so a consumer can score what the daemon published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from converter.datasets import load_dataset
from converter.errors import BadInputError
from converter.train import read_record, split_from_record
from edge_daemon.manifest import write_atomic


@dataclass(frozen=True)
class ClipSpec:
    """How the clip looks."""

    width: int = 320
    height: int = 240
    fps: float = 10.0
    frames_per_digit: int = 5
    digits: int = 120
    digit_size: int = 96
    drift: int = 4
    noise: float = 3.0
    seed: int = 0


def _scene(spec: ClipSpec, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    y, x = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    base = 90 + 60 * (x / spec.width) + 30 * (y / spec.height)
    texture = cv2.GaussianBlur(
        rng.normal(0, 25, (spec.height, spec.width)).astype(np.float32), (0, 0), 3
    )
    gray = np.clip(base + texture, 0, 255)
    tint = np.array([1.0, 0.95, 0.85], dtype=np.float32)  # a warm light, in BGR
    scene: npt.NDArray[np.uint8] = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    return scene


def render(images: list[npt.NDArray[np.uint8]], spec: ClipSpec, path: Path) -> dict[str, object]:
    """Write the clip to ``path`` (MPEG-4) and return its sidecar description."""
    rng = np.random.default_rng(spec.seed)
    scene = _scene(spec, rng)
    size = spec.digit_size
    x0 = (spec.width - size) // 2
    y0 = (spec.height - size) // 2
    pad = spec.drift
    panel = (x0 - pad, y0 - pad, size + 2 * pad, size + 2 * pad)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    writer = cv2.VideoWriter(
        str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), spec.fps, (spec.width, spec.height)
    )
    if not writer.isOpened():
        raise BadInputError(f"OpenCV cannot write MPEG-4 video to {path}")
    try:
        for image in images:
            big = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            start, end = rng.integers(-spec.drift, spec.drift + 1, size=(2, 2))
            for k in range(spec.frames_per_digit):
                t = k / max(spec.frames_per_digit - 1, 1)
                dx, dy = np.round(start + (end - start) * t).astype(int)
                frame = scene.copy()
                px, py, pw, ph = panel
                frame[py : py + ph, px : px + pw] = 12
                region = frame[y0 + dy : y0 + dy + size, x0 + dx : x0 + dx + size]
                np.maximum(region, big[..., None], out=region)
                noisy = frame.astype(np.float32) + rng.normal(0, spec.noise, frame.shape)
                writer.write(np.clip(noisy, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    tmp.replace(path)
    return {
        "fps": spec.fps,
        "width": spec.width,
        "height": spec.height,
        "rois": {"digit": f"{x0},{y0},{size},{size}"},
    }


def make_clip(model_dir: Path, output: Path, spec: ClipSpec | None = None) -> Path:
    """Render the sample clip from the held-out digits of the model trained in ``model_dir``."""
    spec = spec or ClipSpec()
    records = sorted(model_dir.glob("*.train.json"))
    if not records:
        raise BadInputError(
            f"no training record (*.train.json) in {model_dir}: the clip shows "
            "the held-out digits of a trained model"
        )
    record = read_record(records[0])
    dataset = load_dataset(str(record["dataset"]))
    split = split_from_record(record, dataset, records[0])
    rng = np.random.default_rng(spec.seed)
    chosen = rng.permutation(split.heldout)[: spec.digits]
    images = [dataset.images[i] for i in chosen]
    truth = [dataset.classes[int(dataset.labels[i])] for i in chosen]
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = render(images, spec, output)
    meta.update(
        {
            "frames": len(images) * spec.frames_per_digit,
            "frames_per_digit": spec.frames_per_digit,
            "dataset_indices": [int(i) for i in chosen],
            "truth": [t for t in truth for _ in range(spec.frames_per_digit)],
            "note": "held-out digits (never trained on); truth[n] is the digit on frame n",
        }
    )
    write_atomic(output.with_suffix(".json"), (json.dumps(meta) + "\n").encode("utf-8"))
    return output
