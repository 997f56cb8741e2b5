"""The accuracy gate's measurements: float model against converted model on the held-out set.

Both models see the held-out images through the daemon's own preprocessing, and the TFLite
model runs in the daemon's own :class:`~edge_daemon.engine.Engine`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from converter.datasets import Dataset
from converter.source import SourceModel
from edge_daemon.engine import Engine
from edge_daemon.manifest import InputSpec
from edge_daemon.preprocess import preprocess_batch

log = logging.getLogger(__name__)

#: Held-out images preprocessed and run at a time.
CHUNK = 256


@dataclass(frozen=True)
class Evaluation:
    """Predictions and figures from one comparison."""

    labels: npt.NDArray[np.int64]
    float_pred: npt.NDArray[np.int64]
    tflite_pred: npt.NDArray[np.int64]
    float_latency_ms: float
    tflite_latency_ms: float
    #: No labels: ``labels`` are the float model's answers (teacher mode), so only the
    #: agreement means anything, never an accuracy.
    teacher: bool = False

    @property
    def float_accuracy(self) -> float:
        """Share of held-out images the float model gets right."""
        return float(np.mean(self.float_pred == self.labels))

    @property
    def quantized_accuracy(self) -> float:
        """Share of held-out images the converted model gets right."""
        return float(np.mean(self.tflite_pred == self.labels))

    @property
    def agreement(self) -> float:
        """Share of held-out images where both models give the same top-1 class."""
        return float(np.mean(self.float_pred == self.tflite_pred))

    @property
    def float_interval(self) -> tuple[float, float]:
        """95% confidence interval of the float accuracy (Wilson score)."""
        return wilson(int(np.sum(self.float_pred == self.labels)), len(self.labels))

    @property
    def quantized_interval(self) -> tuple[float, float]:
        """95% confidence interval of the converted accuracy (Wilson score)."""
        return wilson(int(np.sum(self.tflite_pred == self.labels)), len(self.labels))

    @property
    def step_points(self) -> float:
        """What one prediction more or less right moves the accuracy by, in points."""
        return 100.0 / max(len(self.labels), 1)

    @property
    def drop_points(self) -> float:
        """Accuracy lost by conversion, in percentage points."""
        return (self.float_accuracy - self.quantized_accuracy) * 100.0

    def per_class(self, classes: int) -> tuple[list[float], list[float]]:
        """Per-class accuracy of the float and the converted model (NaN for absent classes)."""
        float_acc, tflite_acc = [], []
        for c in range(classes):
            members = self.labels == c
            if not members.any():
                float_acc.append(float("nan"))
                tflite_acc.append(float("nan"))
                continue
            float_acc.append(float(np.mean(self.float_pred[members] == c)))
            tflite_acc.append(float(np.mean(self.tflite_pred[members] == c)))
        return float_acc, tflite_acc

    def confusion(self, classes: int) -> npt.NDArray[np.int64]:
        """Confusion matrix of the converted model: rows true class, columns predicted."""
        matrix = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.tflite_pred), 1)
        return matrix


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound for small ``n`` and for proportions
    near 0 or 1, where the normal approximation is not."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    source: SourceModel,
    float_spec: InputSpec,
    engine: Engine,
    heldout: Dataset,
    latency_samples: int = 100,
) -> Evaluation:
    """Run both models over the held-out set and time each at batch 1."""
    float_parts, tflite_parts = [], []
    # In chunks: a large held-out set at a large input size never sits in memory whole.
    for start in range(0, len(heldout), CHUNK):
        images = heldout.images[start : start + CHUNK]
        x_float = preprocess_batch(images, float_spec).astype(np.float32)
        float_parts.append(np.argmax(source.predict(x_float), axis=1))
        x_tflite = preprocess_batch(images, engine.input_spec)
        tflite_parts.append(np.argmax(engine.scores(x_tflite), axis=1))
        if len(heldout) > CHUNK:
            done = min(start + CHUNK, len(heldout))
            log.info("evaluated %d of %d held-out images", done, len(heldout))
    float_pred = np.concatenate(float_parts).astype(np.int64)
    tflite_pred = np.concatenate(tflite_parts).astype(np.int64)
    n = min(latency_samples, len(heldout))
    x_float = preprocess_batch(heldout.images[:n], float_spec).astype(np.float32)
    x_tflite = preprocess_batch(heldout.images[:n], engine.input_spec)
    float_ms = _time_per_image(lambda i: source.model(x_float[i : i + 1], training=False), n)
    tflite_ms = _time_per_image(lambda i: engine.run(x_tflite[i : i + 1]), n)
    teacher = not heldout.labelled
    labels = float_pred if teacher else heldout.labels
    return Evaluation(labels, float_pred, tflite_pred, float_ms, tflite_ms, teacher)


def _time_per_image(call: Callable[[int], object], n: int) -> float:
    call(0)  # warm-up: first calls allocate and trace
    started = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - started) * 1000.0 / max(n, 1)
