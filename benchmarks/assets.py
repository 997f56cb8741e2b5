"""Models and clips the benchmarks need, built on demand by the project's own commands and
cached under ``build/bench-cache`` (git-ignored): nothing is downloaded.

- MobileNetV2 models with random weights (speed does not depend on the weights): ``edge-convert
  train --arch mobilenetv2 --weights none`` for one epoch on 60 digits, then ``edge-convert
  quantize`` to full integer, as a user converts their own.
- A model's twin that declares bilinear shrinking in its manifest (``input.resize``): the same
  ``.tflite`` bytes, as for a model trained on bilinear-shrunk images.
- A 1280x720 H.264 clip of a slowly panning, textured scene (PyAV's libx264).
- The sample clip at 30 fps, and a still scene with sensor noise, for paced cameras.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from edge_daemon.manifest import ResizeMethod, read_manifest, write_atomic
from edge_daemon.settings import BUNDLED_MODEL, SAMPLE_CLIP

__all__ = ["CACHE", "SAMPLE_CLIP"]

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BENCH_CACHE", ROOT / "build" / "bench-cache"))


def digits_model() -> Path:
    """The bundled digits model (8x8 gray, the reference CNN)."""
    return BUNDLED_MODEL


def shrinking_by(model: Path, resize: ResizeMethod) -> Path:
    """``model`` (with its manifest) copied into the cache, its manifest declaring ``resize``
    as the way its training images were shrunk."""
    manifest = read_manifest(model.with_suffix(".json"))
    if manifest.input.resize == resize:
        return model
    name = f"{model.stem}_{resize}"
    twin = CACHE / name / f"{name}.tflite"
    twin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, twin)
    spec = manifest.input.model_copy(update={"resize": resize})
    update = {"input": spec, "model_file": twin.name}
    write_atomic(twin.with_suffix(".json"), manifest.model_copy(update=update).to_bytes())
    return twin


def mobilenet(alpha: float, size: int) -> Path:
    """MobileNetV2 ``alpha`` at ``size``x``size``, int8 with uint8 input, random weights."""
    name = f"mnv2_{str(alpha).replace('.', '')}_{size}"
    folder = CACHE / name
    model = folder / f"{name}.tflite"
    if model.is_file() and model.with_suffix(".json").is_file():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.npz"
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    pick = np.random.default_rng(0).permutation(len(digits.images))[:60]
    np.savez(data, x=(digits.images[pick] * 255 / 16).astype(np.uint8), y=digits.target[pick])
    convert = [sys.executable, "-m", "converter"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    train = [
        *("train", "--dataset", str(data), "--arch", "mobilenetv2", "--alpha", str(alpha)),
        *("--input-size", str(size), "--weights", "none", "--epochs", "1"),
        *("--output", str(folder), "--name", name),
    ]
    quantize = [
        *("quantize", str(folder / f"{name}.keras"), "--mode", "int8"),
        *("--calibration-samples", "16", "--max-accuracy-drop", "100"),
    ]
    for args in (train, quantize):
        proc = subprocess.run(
            [*convert, *args], env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"edge-convert {args[0]} failed: {proc.stderr.strip()[-2000:]}")
    return model


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A large textured picture: gradients, shapes, text and fine detail, like a yard."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            90 + 60 * np.sin(xx / 170.0) + 30 * np.cos(yy / 90.0),
            110 + 50 * np.cos(xx / 230.0 + yy / 310.0),
            100 + 70 * np.sin(yy / 140.0),
        ],
        axis=-1,
    )
    image = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(160):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            w, h = (int(v) for v in rng.integers(20, 200, 2))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.circle(image, (x, y), int(rng.integers(10, 90)), colour, -1)
    for i in range(40):
        org = (int(rng.integers(0, width - 200)), int(rng.integers(30, height)))
        cv2.putText(image, f"door {i}", org, cv2.FONT_HERSHEY_SIMPLEX, 1.2, (240, 240, 240), 2)
    noise = rng.normal(0, 12, image.shape)
    noisy: np.ndarray = np.clip(image + noise, 0, 255).astype(np.uint8)
    return noisy


def h264_clip(width: int = 1280, height: int = 720, frames: int = 150, fps: int = 30) -> Path:
    """A ``width``x``height`` H.264 clip panning over :func:`scene`, with sensor noise."""
    path = CACHE / f"pan_{width}x{height}_{frames}.mp4"
    if path.is_file():
        return path
    import av  # noqa: PLC0415

    CACHE.mkdir(parents=True, exist_ok=True)
    big = scene(width * 2, height * 2)
    rng = np.random.default_rng(1)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for n in range(frames):
            x = int(n * (width / frames))
            y = int(n * (height / frames) / 2)
            view = big[y : y + height, x : x + width]
            noisy = np.clip(view + rng.normal(0, 3, view.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(noisy, format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


def _rewrite(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    partial = path.with_suffix(".partial.mp4")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    partial.rename(path)
    return path


def sample_frames(limit: int | None = None) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    frames: list[np.ndarray] = []
    while limit is None or len(frames) < limit:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def sample_clip_at(fps: int) -> Path:
    """The sample clip's frames at ``fps`` (a live camera's rate; the digits change faster)."""
    path = CACHE / f"sample_{fps}fps.mp4"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    return _rewrite(path, sample_frames(), fps)


def still_clip(fps: int = 30, frames: int = 150) -> Path:
    """One sample frame held still, with sensor noise (sigma 2) on every frame."""
    path = CACHE / f"still_{fps}fps_{frames}.mp4"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    first = sample_frames(1)[0]
    rng = np.random.default_rng(2)
    noisy = [
        np.clip(first + rng.normal(0, 2, first.shape), 0, 255).astype(np.uint8)
        for _ in range(frames)
    ]
    return _rewrite(path, noisy, fps)


def sample_rois() -> dict[str, str]:
    """The sample clip's digit region."""
    meta = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text(encoding="utf-8"))
    return dict(meta["rois"])


def grid_rois(width: int, height: int, per_side: int) -> dict[str, str]:
    """``per_side`` x ``per_side`` regions covering a ``width`` x ``height`` frame."""
    w, h = width // per_side, height // per_side
    return {
        f"r{row}{col}": f"{col * w},{row * h},{w},{h}"
        for row in range(per_side)
        for col in range(per_side)
    }
