"""Model output to predictions: dequantise, softmax where needed, top-k with a threshold.

Pure functions; the dequantisation uses the output tensor's own scale and zero point (dividing
by 255 is only right for one quantisation, and wrong for the rest).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_daemon.manifest import OutputSpec, Quantization

Scores = npt.NDArray[np.float32]

#: Up to this many classes, the best ones are picked in Python (see :func:`top_k_rows`).
SMALL_OUTPUT = 64


@dataclass(frozen=True, slots=True)
class Class:
    """One class of a prediction: its index, label and score (0..1)."""

    index: int
    label: str
    score: float


def dequantize(raw: npt.NDArray[np.generic], quantization: Quantization | None) -> Scores:
    """Real values from a (possibly quantised) output tensor."""
    if quantization is None:
        return raw.astype(np.float32, copy=False)
    scale = np.float32(quantization.scale)
    return (raw.astype(np.float32) - np.float32(quantization.zero_point)) * scale


def softmax(logits: Scores) -> Scores:
    """Softmax over the last axis, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    out: Scores = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


#: How far outside 0..1 a value may stray (float rounding) and still be a probability.
LOGIT_TOLERANCE = 1e-3


def looks_like_logits(values: Scores) -> bool:
    """True when finite values stray outside 0..1: the model gives logits, whatever it says."""
    finite = values[finite_rows(values)]
    return bool(((finite < -LOGIT_TOLERANCE) | (finite > 1.0 + LOGIT_TOLERANCE)).any())


def scores(raw: npt.NDArray[np.generic], spec: OutputSpec, logits: bool | None = None) -> Scores:
    """Class probabilities in [0, 1], shape ``(batch, classes)``, from the raw output tensor.

    ``logits`` (default: the spec's ``kind``) says the model gives logits, which get a softmax;
    decide it per model, not per row (see :func:`looks_like_logits`), or a row of logits that
    happens to fall inside 0..1 would pass for probabilities. A row with NaN or infinity stays
    non-finite (see :func:`finite_rows`): it is not guessed at.
    """
    return to_probabilities(
        real_values(raw, spec), spec.kind == "logits" if logits is None else logits
    )


def real_values(raw: npt.NDArray[np.generic], spec: OutputSpec) -> Scores:
    """The output dequantised, shape ``(batch, classes)``: a new array, never ``raw`` itself."""
    return np.array(dequantize(raw, spec.quantization), dtype=np.float32).reshape(raw.shape[0], -1)


def to_probabilities(values: Scores, logits: bool) -> Scores:
    """``values`` (from :func:`real_values`) made probabilities in place: softmax for logits,
    then clipped to 0..1; non-finite rows are left as they are."""
    finite = finite_rows(values)
    if not finite.any():
        return values
    if logits:
        values[finite] = softmax(values[finite])
    values[finite] = np.clip(values[finite], 0.0, 1.0)
    return values


def finite_rows(values: Scores) -> npt.NDArray[np.bool_]:
    """Which rows hold only finite numbers."""
    return np.asarray(np.isfinite(values).all(axis=1), dtype=np.bool_)


def top_k(
    row: Scores, labels: tuple[str, ...], k: int = 1, threshold: float = 0.0
) -> tuple[Class, ...]:
    """The ``k`` best classes of one score row at or above ``threshold``, best first.

    Ties go to the lower class index, so results are the same on every runtime.
    """
    k = min(k, row.shape[0])
    order = np.argsort(-row, kind="stable")[:k]
    return tuple(Class(int(i), labels[i], float(row[i])) for i in order if row[i] >= threshold)


def top_k_rows(rows: Scores, labels: tuple[str, ...], k: int = 1) -> list[tuple[Class, ...]]:
    """:func:`top_k` of every row at once (one sort for the whole batch), best first, ties to
    the lower class index."""
    k = min(k, rows.shape[1])
    if rows.shape[1] <= SMALL_OUTPUT:
        # A few classes: one call into NumPy, then plain Python (``nlargest`` keeps equal
        # scores in index order), cheaper than a sort and a gather through NumPy.
        out = []
        for row in rows.tolist():
            best = heapq.nlargest(k, range(len(row)), key=row.__getitem__)
            out.append(tuple(Class(i, labels[i], row[i]) for i in best))
        return out
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(rows, order, axis=1).tolist()
    return [
        tuple(Class(i, labels[i], v) for i, v in zip(indices, scores, strict=True))
        for indices, scores in zip(order.tolist(), values, strict=True)
    ]
