"""Third-party models whose output is not what a classifier gives.

Before: an output of shape ``(batch, 10, 4)`` ran as 40 classes; a model emitting logits
published ``"score": 1.241``, one emitting infinities ``"score": Infinity`` (not JSON). Now the
first is refused at start with exit 78, and every published score is a finite probability.
The models are built here with TensorFlow (the converter's environment).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_daemon.pipeline import Daemon
from tests.helpers import run_daemon, running, settings_for, subscriber, unique_prefix

pytestmark = pytest.mark.converter


def tflite_model(folder: Path, name: str, head: Callable[[Any], Any]) -> Path:
    """A float model on 28x28 gray input: flatten, ``head``; with a labels file beside it."""
    import keras
    import tensorflow as tf

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, head(x))
    path = folder / f"{name}.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    outputs = int(math.prod(model.output_shape[1:]))
    (folder / "labels.txt").write_text("".join(f"class {i}\n" for i in range(outputs)))
    return path


def test_an_output_that_is_not_batch_by_classes_is_refused_with_78(tmp_path: Path) -> None:
    import keras

    path = tflite_model(
        tmp_path,
        "boxes",
        lambda x: keras.layers.Reshape((10, 4))(keras.layers.Dense(40)(x)),
    )
    result = run_daemon("run", "--duration", "2", env={"EDGE_MODEL__PATH": str(path)})
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("edge-daemon: error: ")
    assert "(batch, classes)" in lines[-1]
    assert "[1, 10, 4]" in lines[-1]
    assert "np." not in result.stderr  # no numpy reprs such as np.int32(1)
    assert "Traceback" not in result.stderr


def test_logits_are_published_as_probabilities(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import keras

    # Large weights: outputs far outside 0..1, as a model without its softmax gives them.
    path = tflite_model(
        tmp_path,
        "logits",
        keras.layers.Dense(10, kernel_initializer=keras.initializers.RandomNormal(0, 5)),
    )
    caplog.set_level(logging.WARNING)
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(
            settings_for(prefix, model={"path": path}, inference={"top_k": 10, "threshold": 0})
        )
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 10, timeout=30)
        assert sub.validate_all() >= 10  # the schema bounds every score to 0..1
    for label in sub.labels():
        scores = [c["score"] for c in label["top"]]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert sum(scores) == pytest.approx(1.0, abs=1e-3)  # a softmax over all 10
    said = [r for r in caplog.records if "applying softmax" in r.getMessage()]
    assert len(said) == 1


def test_infinite_outputs_are_dropped_and_counted_never_published(tmp_path: Path) -> None:
    import keras

    def overflow(x: Any) -> Any:
        dense = keras.layers.Dense(10, kernel_initializer="ones")(x)
        return keras.layers.Rescaling(1e30)(keras.layers.Rescaling(1e30)(dense))

    path = tflite_model(tmp_path, "overflow", overflow)
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix, model={"path": path}))
        with running(daemon):
            # Ten dropped, and a stats message (sent each second) that counts some.
            assert sub.wait_for(
                lambda: daemon.stats.invalid >= 10 and bool(sub.on("stats")), timeout=30
            )
    raw = [m.payload for m in sub.messages if m.topic.endswith("/label")]
    assert not any(b"Infinity" in p or b"NaN" in p for p in raw)
    assert sub.validate_all() == len(sub.on("stats"))
    stats = [m.json() for m in sub.on("stats")]
    assert stats
    assert stats[-1]["inference"]["invalid"] >= 1
