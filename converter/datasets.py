"""Datasets for training, calibration and evaluation, and the seeded held-out split.

A dataset is a list of images as a camera would deliver them to the daemon (uint8, BGR or
gray) with integer labels and class names; the model's own preprocessing (``edge_daemon
.preprocess``) turns them into input. Three kinds: ``digits`` (scikit-learn's bundled 8x8
digits), a folder with one sub-folder of images per class, or an ``.npz`` with ``x``/``y``
(optionally ``labels``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from converter.errors import BadInputError, InputMissingError
from edge_daemon.preprocess import Image, as_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass(frozen=True)
class Dataset:
    """Images (uint8, ``(H, W)`` gray or ``(H, W, 3)`` BGR), their labels and the class names."""

    name: str
    images: list[Image]
    labels: npt.NDArray[np.int64]
    classes: tuple[str, ...]
    #: True when only the class names mean anything (a folder's sub-folders, indexed in
    #: alphabetical order): a model's outputs must then be matched to them by name.
    by_name: bool = False
    #: False for a folder of images without class sub-folders: good for calibration, and for
    #: checking a converted model against the float one (teacher mode), never for accuracy.
    labelled: bool = True
    #: True when ``classes`` are real names (an .npz's ``labels``, the digits), not made up.
    named: bool = True

    @property
    def channels(self) -> int:
        """1 for gray images, 3 for colour."""
        return 1 if self.images[0].ndim == 2 else 3

    def subset(self, indices: npt.NDArray[np.int64]) -> Dataset:
        """The images and labels at ``indices``."""
        return Dataset(
            self.name,
            [self.images[i] for i in indices],
            self.labels[indices],
            self.classes,
            self.by_name,
            self.labelled,
            self.named,
        )

    def aligned(self, labels: tuple[str, ...], source: str) -> Dataset:
        """The same images, their classes renumbered to a model's output order ``labels``
        (from ``source``), matched by name; unchanged when the names do not all match and the
        dataset's indices mean something (an .npz's ``y``, the digits)."""
        if self.classes == labels or not self.labelled:
            return self
        missing = [c for c in self.classes if c not in labels]
        if missing:
            shared = len(missing) < len(self.classes)
            if not self.by_name and not (self.named and shared):
                return self  # indices into the model's outputs, as the dataset says
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise BadInputError(
                f"dataset classes {shown} are not among the model's labels in {source} "
                f"({', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''}): rename the "
                "folders to the labels, or give the right --labels"
            )
        where = np.array([labels.index(c) for c in self.classes], dtype=np.int64)
        return Dataset(self.name, self.images, where[self.labels], labels, False)

    @property
    def majority(self) -> float:
        """The share of the most common class: what always guessing it scores."""
        if not len(self.labels):
            return 0.0
        return float(np.bincount(self.labels[self.labels >= 0]).max(initial=0)) / len(self)

    def __len__(self) -> int:
        return len(self.images)


def load_dataset(spec: str) -> Dataset:
    """Load ``digits``, a class-per-folder directory, or an ``.npz`` file."""
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise InputMissingError(
            f"dataset {spec} does not exist: give 'digits', a folder with one "
            "sub-folder of images per class, or an .npz file with x and y"
        )
    dataset = _folder(path) if path.is_dir() else _npz(path)
    if dataset.labelled:
        _check(dataset, spec)
    return dataset


def _digits() -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only this dataset needs sklearn

    bunch = load_digits()
    # Pixel values are 0..16; spread them over 0..255 like a camera's.
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Dataset(
        "digits",
        list(images),
        bunch.target.astype(np.int64),
        tuple(str(c) for c in bunch.target_names),
    )


def _folder(path: Path) -> Dataset:
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[Image] = []
    labels: list[int] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            continue
        index = len(classes)
        classes.append(class_dir.name)
        for file in files:
            image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise BadInputError(
                    f"cannot decode image {file}: remove it or replace it with a PNG or JPEG file"
                )
            images.append(_as_frame(image, str(file)))
            labels.append(index)
    labelled = bool(images)
    if not images:  # images straight in the folder: unlabelled (calibration, teacher mode)
        for file in sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise BadInputError(
                    f"cannot decode image {file}: remove it or replace it with a PNG or JPEG file"
                )
            images.append(_as_frame(image, str(file)))
            labels.append(-1)
    if not images:
        raise BadInputError(
            f"dataset folder {path} has no images: put one sub-folder of images "
            "(PNG, JPEG, ...) per class inside it, or, to calibrate and check a model "
            "without labels, the images themselves"
        )
    gray = {img.ndim == 2 for img in images}
    if len(gray) > 1:
        # Mixed gray and colour files: treat the set as colour.
        images = [
            as_image(cv2.cvtColor(i, cv2.COLOR_GRAY2BGR)) if i.ndim == 2 else i for i in images
        ]
    return Dataset(
        path.name,
        images,
        np.asarray(labels, dtype=np.int64),
        tuple(classes),
        by_name=labelled,
        labelled=labelled,
    )


def _as_frame(decoded: npt.NDArray[np.generic], where: str) -> Image:
    if decoded.dtype == np.uint16:
        decoded = (decoded.astype(np.uint16) >> 8).astype(np.uint8)
    if decoded.dtype != np.uint8:
        raise BadInputError(f"{where} has {decoded.dtype} pixels: use 8-bit images")
    image = as_image(decoded)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = as_image(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise BadInputError(f"{where} is not a gray or colour image (shape {image.shape})")
    return image


def _npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise BadInputError(
                    f"{path} has no 'x' and 'y' arrays (it has {sorted(data.files)}): "
                    "save images as x (N, H, W[, C]) and class indices as y (N,)"
                )
            x, y = data["x"], data["y"]
            names = data.get("labels", None)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"{path} is not a readable .npz file ({exc}): write it with "
            "numpy.savez(path, x=images, y=labels)"
        ) from exc
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise BadInputError(
            f"{path}: x has shape {x.shape}, not images: it must be (N, H, W) gray or "
            "(N, H, W, 3) RGB"
        )
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(
            f"{path}: y must be N={x.shape[0]} integer class indices (has shape "
            f"{y.shape}, type {y.dtype})"
        )
    if np.issubdtype(x.dtype, np.floating):
        # Floats in 0..1 are pixel fractions; anything else is taken as 0..255.
        x = x * 255.0 if float(x.max(initial=0.0)) <= 1.0 else x
        x = np.clip(np.round(x), 0, 255)
    x = x.astype(np.uint8)
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    images = list(x) if x.ndim == 3 else [as_image(cv2.cvtColor(i, cv2.COLOR_RGB2BGR)) for i in x]
    count = int(y.max(initial=-1)) + 1
    classes = tuple(str(n) for n in names) if names is not None else tuple(map(str, range(count)))
    if int(y.min(initial=0)) < 0 or count > len(classes):
        raise BadInputError(f"{path}: y holds class indices outside 0..{len(classes) - 1}")
    return Dataset(path.stem, images, y.astype(np.int64), classes, named=names is not None)


def _check(dataset: Dataset, spec: str) -> None:
    present = np.unique(dataset.labels)
    if len(present) < 2:
        raise BadInputError(
            f"dataset {spec} has a single class ({dataset.classes[int(present[0])]}): "
            "a classifier needs at least two classes"
        )


def check_fits(dataset: Dataset, channels: int, classes: int, model: str) -> None:
    """Raise :class:`BadInputError` unless the labels fit the model's output. Gray images for
    a colour model, or colour ones for a gray model, are converted as the daemon converts a
    camera's frames (a gray scene arrives as equal red, green and blue)."""
    if dataset.channels != channels:
        kind = {1: "gray", 3: "colour"}
        log.info(
            "dataset %s has %s images and %s takes %s input: converting them as the daemon "
            "converts camera frames",
            dataset.name,
            kind[dataset.channels],
            model,
            kind.get(channels, f"{channels}-channel"),
        )
    top = int(dataset.labels.max())
    if top >= classes:
        raise BadInputError(
            f"dataset {dataset.name} has class index {top} but {model} has {classes} "
            "outputs: use the dataset the model was trained on"
        )


@dataclass(frozen=True)
class Split:
    """A fixed, seeded split: indices for training and for the held-out evaluation set."""

    dataset: str
    seed: int
    holdout: float
    count: int
    train: npt.NDArray[np.int64]
    heldout: npt.NDArray[np.int64]

    @classmethod
    def from_heldout(
        cls, dataset: str, seed: int, holdout: float, count: int, heldout: npt.ArrayLike
    ) -> Split:
        """The split whose held-out indices are ``heldout``; the rest of ``count`` trains."""
        held = np.sort(np.asarray(heldout, dtype=np.int64))
        train = np.setdiff1d(np.arange(count, dtype=np.int64), held)
        return cls(dataset, seed, holdout, count, train, held)


def make_split(dataset: Dataset, spec: str, seed: int, holdout: float = 0.2) -> Split:
    """A stratified, seeded split: the same dataset and seed give the same split everywhere."""
    rng = np.random.default_rng(seed)
    heldout: list[int] = []
    for cls in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == cls)
        rng.shuffle(members)
        take = max(1, round(len(members) * holdout)) if len(members) > 1 else 0
        heldout.extend(int(i) for i in members[:take])
    return Split.from_heldout(spec, seed, holdout, len(dataset), heldout)
