"""Training: the reference CNN (Conv2D 32 3x3 ReLU, MaxPool 2x2, Flatten, Dense 128 ReLU,
softmax), or MobileNetV2 transfer learning (:mod:`converter.transfer`), with camera-like
augmentation and a class-balance report."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.augment import augment_images
from converter.datasets import Dataset, Split, make_split
from converter.errors import BadInputError
from converter.transfer import (
    FINE_TUNE_LAYERS,
    build_mobilenet,
    mobilenet_input_spec,
    unfreeze_top,
)
from edge_daemon.manifest import InputSpec, ResizeMethod, write_atomic, write_labels
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


#: A class with fewer training images than this gets a warning.
FEW_IMAGES = 20


def class_balance(dataset: Dataset) -> dict[str, int]:
    """Images per class, and a warning for classes too small or far smaller than the rest."""
    counts = {
        name: int((dataset.labels == index).sum()) for index, name in enumerate(dataset.classes)
    }
    log.info("images per class: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    few = [name for name, count in counts.items() if count < FEW_IMAGES]
    if few:
        log.warning(
            "edge-convert: warning: %s %s fewer than %d images: the model will know %s "
            "poorly; collect more (edge-daemon collect)",
            ", ".join(few),
            "has" if len(few) == 1 else "have",
            FEW_IMAGES,
            "it" if len(few) == 1 else "them",
        )
    largest, smallest = max(counts.values()), min(counts.values())
    if smallest and largest >= 5 * smallest:
        log.warning(
            "edge-convert: warning: the classes are unbalanced (%d images against %d): the "
            "model will lean towards the larger",
            largest,
            smallest,
        )
    return counts


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
    arch: str = "cnn",
    alpha: float = 0.35,
    weights: str = "imagenet",
    fine_tune_epochs: int = 0,
    resize: ResizeMethod = "area",
) -> TrainResult:
    """Train on the training part of a seeded split; write the model, labels and record.

    ``arch`` ``cnn`` is the reference CNN; ``mobilenetv2`` a frozen MobileNetV2 base with a new
    head (:mod:`converter.transfer`), then ``fine_tune_epochs`` with the top of the base
    unfrozen. ``resize`` is how images larger than the input are shrunk (the daemon shrinks
    crops the same way, from the manifest)."""
    import keras  # noqa: PLC0415

    if not 0.0 < holdout < 1.0:
        raise BadInputError(f"--holdout {holdout} is not a fraction: give a value between 0 and 1")
    if epochs < 1 or input_size < 8 or fine_tune_epochs < 0:
        raise BadInputError(
            "--epochs must be at least 1, --input-size at least 8, --fine-tune-epochs at least 0"
        )
    if arch == "mobilenetv2" and input_size < 32:
        raise BadInputError("--input-size must be at least 32 for MobileNetV2 (96 or 128 fit)")
    if not dataset.labelled:
        raise BadInputError(
            f"dataset {spec} has images but no classes: training needs one sub-folder of "
            "images per class (an unlabelled folder can calibrate 'edge-convert quantize')"
        )
    keras.utils.set_random_seed(seed)
    split = make_split(dataset, spec, seed, holdout)
    training = dataset.subset(split.train)
    counts = class_balance(training)
    images, y = augment_images(training.images, training.labels, augment_copies, seed)
    classes = len(dataset.classes)
    base = None
    if arch == "mobilenetv2":
        in_spec = mobilenet_input_spec(input_size)
        model, base = build_mobilenet(input_size, classes, alpha, weights)
    else:
        in_spec = float_input_spec(input_size, dataset.channels)
        model = build_reference_cnn(input_size, dataset.channels, classes)
    in_spec = in_spec.model_copy(update={"resize": resize})
    x = preprocess_batch(images, in_spec)
    log.info(
        "training %s on %d images of %s (%d with camera-like copies), holding out %d (seed %d)",
        model.name,
        len(training),
        spec,
        len(x),
        len(split.heldout),
        seed,
    )
    verbose = 1 if sys.stderr.isatty() else 2
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose)
    log_history = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    if base is not None and fine_tune_epochs:
        log.info("fine-tuning the top %d layers of the base", FINE_TUNE_LAYERS)
        unfreeze_top(model, base)
        tuned = model.fit(
            x, y, epochs=fine_tune_epochs, batch_size=batch_size, shuffle=True, verbose=verbose
        )
        for key, values in tuned.history.items():
            log_history.setdefault(key, []).extend(float(v) for v in values)
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
        epochs=epochs + (fine_tune_epochs if base is not None else 0),
        history=log_history,
        augment_copies=augment_copies,
        labels=dataset.classes,
        extra={"arch": arch, "class_counts": counts}
        | ({"alpha": alpha, "weights": weights} if base is not None else {}),
    )
    accuracy = float(log_history["accuracy"][-1])
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
    extra: dict[str, object] | None = None,
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
        **(extra or {}),
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
