"""The accuracy gate's measurements: float model against converted model on the held-out set.

Both models see the held-out images through the daemon's own preprocessing, and the TFLite
model runs in the daemon's own :class:`~edge_daemon.engine.Engine`.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Evaluation:
    """Predictions and figures from one comparison."""

    labels: npt.NDArray[np.int64]
    float_pred: npt.NDArray[np.int64]
    tflite_pred: npt.NDArray[np.int64]
    float_latency_ms: float
    tflite_latency_ms: float

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


def evaluate(
    source: SourceModel,
    float_spec: InputSpec,
    engine: Engine,
    heldout: Dataset,
    latency_samples: int = 100,
) -> Evaluation:
    """Run both models over the held-out set and time each at batch 1."""
    x_float = preprocess_batch(heldout.images, float_spec).astype(np.float32)
    float_pred = np.argmax(source.predict(x_float), axis=1).astype(np.int64)
    x_tflite = preprocess_batch(heldout.images, engine.input_spec)
    tflite_pred = np.argmax(engine.scores(x_tflite), axis=1).astype(np.int64)
    n = min(latency_samples, len(heldout))
    float_ms = _time_per_image(lambda i: source.model(x_float[i : i + 1], training=False), n)
    tflite_ms = _time_per_image(lambda i: engine.run(x_tflite[i : i + 1]), n)
    return Evaluation(heldout.labels, float_pred, tflite_pred, float_ms, tflite_ms)


def _time_per_image(call: Callable[[int], object], n: int) -> float:
    call(0)  # warm-up: first calls allocate and trace
    started = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - started) * 1000.0 / max(n, 1)
