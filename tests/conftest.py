"""Shared fixtures: a small zoo of converted models, made once per session.

The main environment (with TensorFlow) trains a small reference CNN and converts it in every
mode into ``build/test-models``, recording each converted model's predictions on the held-out
digits. The TensorFlow-free environment (``make test-tflite``) loads the same files with its
own runtime and must agree.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "build" / "test-models"
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
ZOO_MODES = ("int8", "float16", "dynamic", "float32", "edgetpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Converter tests need TensorFlow: skip them, saying why, where it is absent."""
    del config
    skip = pytest.mark.skip(reason="TensorFlow is not installed (the converter extra)")
    for item in items:
        if "converter" in item.keywords and not HAVE_TF:
            item.add_marker(skip)


@dataclass(frozen=True)
class Zoo:
    """Where the converted test models are, and the held-out digits they were evaluated on."""

    root: Path
    heldout_images: np.ndarray
    heldout_labels: np.ndarray

    def model(self, mode: str) -> Path:
        """The ``.tflite`` converted in ``mode`` (``edgetpu``: int8, batch 1)."""
        return self.root / mode / "small.tflite"

    def expected(self, mode: str) -> np.ndarray:
        """Top-1 classes the converter's own evaluation gave for ``mode``."""
        expected: np.ndarray = np.load(self.root / mode / "expected.npy")
        return expected


def _heldout(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    record = json.loads((root / "small.train.json").read_text())
    idx = np.asarray(record["heldout"], dtype=np.int64)
    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images[idx], bunch.target[idx].astype(np.int64)


def _build_zoo(root: Path) -> None:
    from converter.datasets import load_dataset
    from converter.train import train
    from converter.workflow import QuantizeOptions, quantize

    root.mkdir(parents=True, exist_ok=True)
    result = train(
        load_dataset("digits"),
        "digits",
        root,
        "small",
        epochs=4,
        input_size=16,
        seed=7,
        augment_copies=0,
    )
    for mode in ZOO_MODES:
        out = quantize(
            QuantizeOptions(
                model=result.model_path,
                mode="int8" if mode == "edgetpu" else mode,  # type: ignore[arg-type]
                output=root / mode,
                name="small",
                edgetpu=mode == "edgetpu",
                max_accuracy_drop=100.0,
            )
        )
        np.save(root / mode / "expected.npy", out.evaluation.tflite_pred)
    (root / "complete").write_text("ok\n")


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    """The converted test models; built here when TensorFlow is available."""
    if HAVE_TF:
        (ZOO / "complete").unlink(missing_ok=True)
        _build_zoo(ZOO)
    elif not (ZOO / "complete").is_file():
        pytest.skip("no converted test models: run the main test suite first (make test)")
    images, labels = _heldout(ZOO)
    return Zoo(ZOO, images, labels)


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The digits model that ships inside the package."""
    path = ROOT / "edge_daemon" / "models" / "digits.tflite"
    assert path.is_file(), "the bundled model is missing: run 'make model'"
    return path
