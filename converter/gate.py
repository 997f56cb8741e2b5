"""What the accuracy gate's figures say beyond pass or fail: a float model that is probably
fed the wrong labels or input, a held-out set too small for the gate, and what to try."""

from __future__ import annotations

import math

from converter.datasets import Dataset
from converter.evaluate import Evaluation


def suspicious(
    evaluation: Evaluation, classes: int, heldout: Dataset, trained: float | None
) -> str | None:
    """Why the float model's own accuracy on this data says the labels (their order), the
    dataset or the input scaling are probably wrong, or None. The gate cannot see that: both
    models are measured on the same wrong input.

    Near chance: no better than a quarter of the way from guessing (the most common class, or
    one in ``classes``) to perfect, even at the top of its 95% interval. Far below training:
    30 points under the accuracy the model reached in training.
    """
    accuracy = evaluation.float_accuracy
    guess = max(1.0 / max(classes, 1), heldout.majority)
    if evaluation.float_interval[1] < guess + (1.0 - guess) * 0.25:
        return (
            f"the float model is right on only {accuracy * 100:.1f}% of the "
            f"{len(heldout)} held-out images, close to guessing ({guess * 100:.1f}%): "
            "the labels (their order), the dataset or the input scaling (--scale, --offset, "
            "--colour) are probably wrong"
        )
    if trained is not None and accuracy < trained - 0.30:
        return (
            f"the float model is right on {accuracy * 100:.1f}% of the held-out images, far "
            f"below the {trained * 100:.1f}% it reached in training: the labels (their order), "
            "the dataset or the input scaling are probably not what it was trained with"
        )
    return None


def small_heldout_warning(evaluation: Evaluation, max_drop: float) -> str | None:
    """When one prediction moves the accuracy by more than the gate allows, the gate can
    fail on noise alone: say so."""
    if max_drop <= 0 or evaluation.step_points <= max_drop:
        return None  # a gate of 0 asks for no flip at all, whatever the count
    n = len(evaluation.labels)
    needed = f"at least {math.ceil(100 / max_drop)}"
    return (
        f"with {n} held-out images one prediction is {evaluation.step_points:.2f} points, more "
        f"than the gate's {max_drop:.2f}: a single flip fails it, so the gate tells little; "
        f"it needs {needed} held-out images"
    )


def trained_accuracy(record: dict[str, object] | None) -> float | None:
    """The accuracy the model reached in its last training epoch, from its record."""
    history = record.get("history") if record is not None else None
    values = history.get("accuracy") if isinstance(history, dict) else None
    if isinstance(values, list) and values and isinstance(values[-1], int | float):
        return float(values[-1])
    return None


def gate_advice(mode: str) -> str:
    """What to try when the gate fails: more calibration only where calibration happens."""
    if mode == "int8":
        return "try more --calibration-samples, another --mode, or raise the limit"
    return "try another --mode, or raise the limit"
