"""Train the reference CNN: Conv2D 32 3x3 ReLU, MaxPool 2x2, Flatten, Dense 128 ReLU, softmax."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from converter.datasets import Dataset, Split, make_split
from converter.errors import BadInputError
from edge_daemon.manifest import InputSpec, write_atomic, write_labels
from edge_daemon.preprocess import preprocess_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Where training wrote its files, and how the last epoch went."""

    model_path: Path
    labels_path: Path
    record_path: Path
    train_accuracy: float
    epochs: int


def record_path_for(model_path: Path) -> Path:
    """The training record beside a model: ``NAME.train.json``."""
    stem = model_path.name.split(".")[0] if model_path.suffix else model_path.name
    return model_path.parent / f"{stem}.train.json"


def float_input_spec(size: int, channels: int) -> InputSpec:
    """The float input of a model trained here: pixels scaled to 0..1."""
    return InputSpec(
        height=size,
        width=size,
        channels=channels,  # type: ignore[arg-type]
        colour="gray" if channels == 1 else "rgb",
        dtype="float32",
        scale=1.0 / 255.0,
        offset=0.0,
    )


def build_reference_cnn(size: int, channels: int, classes: int) -> Any:
    """The reference CNN, compiled with Adam and sparse categorical cross-entropy."""
    import keras  # noqa: PLC0415 - TensorFlow loads only when a model is built

    model = keras.Sequential(
        [
            keras.Input(shape=(size, size, channels)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ],
        name="reference_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def augment(
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.int64],
    copies: int,
    seed: int,
    max_shift: float = 0.1,
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
    """The images plus ``copies`` shifted copies of each (up to ``max_shift`` of the size).

    A camera never frames an object exactly as the dataset did; small shifts teach the model
    to not care. The original images are kept, so nothing of the dataset is lost.
    """
    if copies <= 0:
        return x, y
    rng = np.random.default_rng(seed)
    height, width = x.shape[1:3]
    limit = max(1, round(max_shift * min(height, width)))
    out = [x]
    for _ in range(copies):
        shifted = np.empty_like(x)
        for i, image in enumerate(x):
            dx, dy = rng.integers(-limit, limit + 1, size=2)
            matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
            moved = cv2.warpAffine(
                image,
                matrix,
                (width, height),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_REPLICATE,
            )
            shifted[i] = moved.reshape(image.shape)
        out.append(shifted)
    return np.concatenate(out), np.tile(y, copies + 1)


def train(
    dataset: Dataset,
    spec: str,
    output: Path,
    name: str,
    *,
    epochs: int = 10,
    input_size: int = 28,
    seed: int = 0,
    holdout: float = 0.2,
    batch_size: int = 32,
    augment_copies: int = 2,
) -> TrainResult:
    """Train on the training part of a seeded split; write the model, labels and record."""
    import keras  # noqa: PLC0415

    if not 0.0 < holdout < 1.0:
        raise BadInputError(f"--holdout {holdout} is not a fraction: give a value between 0 and 1")
    if epochs < 1 or input_size < 8:
        raise BadInputError("--epochs must be at least 1 and --input-size at least 8")
    if not dataset.labelled:
        raise BadInputError(
            f"dataset {spec} has images but no classes: training needs one sub-folder of "
            "images per class (an unlabelled folder can calibrate 'edge-convert quantize')"
        )
    keras.utils.set_random_seed(seed)
    split = make_split(dataset, spec, seed, holdout)
    in_spec = float_input_spec(input_size, dataset.channels)
    training = dataset.subset(split.train)
    x = preprocess_batch(training.images, in_spec)
    x, y = augment(x, training.labels, augment_copies, seed)
    model = build_reference_cnn(input_size, dataset.channels, len(dataset.classes))
    log.info(
        "training on %d images of %s (%d with shifted copies), holding out %d (seed %d)",
        len(training),
        spec,
        len(x),
        len(split.heldout),
        seed,
    )
    history = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=1 if sys.stderr.isatty() else 2,
    )
    output.mkdir(parents=True, exist_ok=True)
    model_path = output / f"{name}.keras"
    tmp = output / f".{name}.partial.keras"
    try:
        model.save(tmp)
        tmp.replace(model_path)
    finally:
        tmp.unlink(missing_ok=True)
    labels_path = output / "labels.txt"
    write_labels(list(dataset.classes), labels_path)
    record_path = record_path_for(model_path)
    write_record(
        record_path,
        split,
        in_spec,
        epochs=epochs,
        history={k: [float(v) for v in vals] for k, vals in history.history.items()},
        augment_copies=augment_copies,
        labels=dataset.classes,
    )
    accuracy = float(history.history["accuracy"][-1])
    return TrainResult(model_path, labels_path, record_path, accuracy, epochs)


def write_record(
    path: Path,
    split: Split,
    in_spec: InputSpec,
    *,
    epochs: int,
    history: dict[str, list[float]],
    augment_copies: int,
    labels: tuple[str, ...],
) -> None:
    """Save how a model was trained: the split (held-out indices), input spec, the output
    order (``labels``) and history."""
    record = {
        "dataset": split.dataset,
        "labels": list(labels),
        "seed": split.seed,
        "holdout": split.holdout,
        "count": split.count,
        "heldout": split.heldout.tolist(),
        "input": in_spec.model_dump(mode="json"),
        "epochs": epochs,
        "augment_copies": augment_copies,
        "history": history,
    }
    write_atomic(path, (json.dumps(record) + "\n").encode("utf-8"))


def read_record(path: Path) -> dict[str, Any]:
    """Load a training record, or raise :class:`BadInputError` saying what to do."""
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"cannot read the training record {path} ({exc}): train the model "
            "again, or delete the file and pass --dataset"
        ) from exc
    if not isinstance(record, dict) or "heldout" not in record or "dataset" not in record:
        raise BadInputError(
            f"{path} is not a training record: train the model again, or delete "
            "the file and pass --dataset"
        )
    return record


def split_from_record(record: dict[str, Any], dataset: Dataset, path: Path) -> Split:
    """The split a record describes, checked against ``dataset``."""
    count = int(record["count"])
    if count != len(dataset):
        raise BadInputError(
            f"{path} was made for a dataset of {count} images but "
            f"{record['dataset']} has {len(dataset)}: use the dataset the model was "
            "trained on"
        )
    return Split.from_heldout(
        str(record["dataset"]),
        int(record["seed"]),
        float(record["holdout"]),
        count,
        record["heldout"],
    )
