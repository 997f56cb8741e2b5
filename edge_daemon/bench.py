"""``edge-daemon bench``: how fast the configured model runs here, at each batch size.

The model, runtime, threads and delegate come from the same settings as ``run`` (so on a Coral
box with ``EDGE_MODEL__DELEGATE=edgetpu`` it measures the Edge TPU). The images are crops of the
bundled sample clip, preprocessed as the daemon does. For each batch size it reports the time
per batch and per image, images per second, the speed-up over batch 1 from this same run, and
whether the predictions are the ones batch 1 gives (a runtime or delegate that batches wrongly
shows up here before it shows up in labels).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge_daemon.engine import Engine, load_engine, model_summary
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.preprocess import Image, preprocess_batch
from edge_daemon.settings import SAMPLE_CLIP, Settings, sample_camera


@dataclass(frozen=True)
class BatchResult:
    """The figures of one batch size."""

    batch: int
    runs: int
    ms_per_batch: float
    ms_per_image: float
    images_per_s: float
    speedup: float
    same_as_batch_1: bool


def sample_crops(count: int) -> list[Image]:
    """``count`` crops of the sample clip's digit region, one per digit shown, as cameras would
    hand them over (distinct images, so a batch that mixes up its rows is caught)."""
    meta = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text(encoding="utf-8"))
    stride = int(meta.get("frames_per_digit", 1))
    camera = sample_camera()["sample"]
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    if not capture.isOpened():
        raise EdgeDaemonError(
            f"cannot read the sample clip {SAMPLE_CLIP}: is OpenCV's FFmpeg there?"
        )
    crops: list[Image] = []
    number = 0
    try:
        while len(crops) < count:
            ok, image = capture.read()
            if not ok:
                if not crops:
                    raise EdgeDaemonError(f"the sample clip {SAMPLE_CLIP} gave no frames")
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                number = 0
                continue
            number += 1
            if (number - 1) % stride:
                continue
            for roi in camera.rois.values():
                x, y, w, h = roi.box(image.shape[1], image.shape[0])
                crops.append(np.asarray(image[y : y + h, x : x + w], dtype=np.uint8))
    finally:
        capture.release()
    return crops[:count]


def _time_batches(
    engine: Engine, batch: npt.NDArray[np.generic], seconds: float
) -> tuple[list[float], npt.NDArray[np.int64]]:
    """Run ``batch`` repeatedly for about ``seconds``; times in ms and the top-1 classes."""
    top1 = np.argmax(engine.scores(batch), axis=1)  # warm-up: resizes the interpreter
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        started = time.perf_counter()
        engine.scores(batch)
        times.append((time.perf_counter() - started) * 1000.0)
    return times, top1


def preprocess_ms(engine: Engine, crops: list[Image], seconds: float) -> float:
    """Median time to crop-resize-normalise one image into the model's input, in ms."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        started = time.perf_counter()
        preprocess_batch(crops, engine.input_spec)
        times.append((time.perf_counter() - started) * 1000.0 / len(crops))
    return statistics.median(times)


def run_bench(
    engine: Engine, sizes: list[int], seconds: float, crops: list[Image] | None = None
) -> list[BatchResult]:
    """Measure each batch size on the same images, batch 1 first."""
    largest = max(sizes)
    crops = crops[:largest] if crops is not None else sample_crops(largest)
    images = preprocess_batch(crops, engine.input_spec)
    reference = np.array(
        [np.argmax(engine.scores(images[i : i + 1]), axis=1)[0] for i in range(largest)]
    )
    results: list[BatchResult] = []
    base: float | None = None
    for size in [1, *(s for s in sizes if s != 1)]:
        times, top1 = _time_batches(engine, images[:size], seconds)
        ms = statistics.median(times)
        per_image = ms / size
        base = base or per_image
        if size in sizes:
            results.append(
                BatchResult(
                    batch=size,
                    runs=len(times),
                    ms_per_batch=round(ms, 4),
                    ms_per_image=round(per_image, 4),
                    images_per_s=round(1000.0 / per_image, 1),
                    speedup=round(base / per_image, 3),
                    same_as_batch_1=bool(np.array_equal(top1, reference[:size])),
                )
            )
    return results


def bench(settings: Settings, sizes: list[int], seconds: float, as_json: bool) -> int:
    """The ``bench`` command; prints a table (or JSON) and returns the exit code."""
    engine = load_engine(settings)
    crops = sample_crops(max(*sizes, 8))  # the clip is decoded once, for both timings
    results = run_bench(engine, sizes, seconds, crops)
    prep = preprocess_ms(engine, crops[:8], min(seconds, 1.0))
    delegate = "edgetpu" if engine.on_edgetpu else "cpu"
    if as_json:
        report = {
            "model": engine.name,
            "path": str(engine.model_path),
            "runtime": engine.runtime.name,
            "delegate": delegate,
            "num_threads": settings.model.num_threads,
            "dynamic_batch": engine.input_spec.dynamic_batch,
            "preprocess_ms_per_image": round(prep, 4),
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        threads = settings.model.num_threads or "runtime default"
        print(f"model {model_summary(engine)}, {delegate}, threads: {threads}")
        print(
            f"inference and dequantisation, median of about {seconds:g} s per batch size; "
            "speed-up is against batch 1"
        )
        print(f"{'batch':>5} {'ms/batch':>9} {'ms/image':>9} {'images/s':>9} {'speed-up':>8}  same")
        for r in results:
            print(
                f"{r.batch:>5} {r.ms_per_batch:>9.3f} {r.ms_per_image:>9.3f} "
                f"{r.images_per_s:>9.1f} {r.speedup:>7.2f}x  "
                f"{'yes' if r.same_as_batch_1 else 'NO'}"
            )
        print(f"preprocessing (crop to model input) adds {prep:.3f} ms per image")
        if not engine.input_spec.dynamic_batch:
            print("this model has a fixed batch of 1: larger batches run image by image")
    if not all(r.same_as_batch_1 for r in results):
        print(
            "edge-daemon: warning: batched predictions differ from batch 1 on this runtime; "
            "set EDGE_INFERENCE__BATCHING=off",
            file=sys.stderr,
        )
        return 1
    return 0
