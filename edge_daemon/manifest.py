"""The model manifest: the contract between the converter and the daemon.

A manifest is the JSON file written beside a ``.tflite`` (``NAME.json``). It says how to turn a
camera frame into the model's input (size, colour order, normalisation, quantisation) and how
to read the output (kind, quantisation, labels), and it records what the converter measured.
The converter writes it (:meth:`ModelManifest.to_bytes`); the daemon reads it with
:func:`read_manifest`. This module is the one place the schema lives.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_daemon.errors import ModelError

SCHEMA_VERSION: Literal[1] = 1

ColourOrder = Literal["gray", "rgb", "bgr"]
TensorType = Literal["uint8", "int8", "float32", "float16", "int16"]
OutputKind = Literal["probabilities", "logits"]
QuantizationMode = Literal["int8", "float16", "dynamic", "float32"]
#: How a crop larger than the input is shrunk: ``area`` averages every pixel it covers (what
#: the converter trains with); ``bilinear`` samples it, as OpenCV's and TensorFlow's default
#: resize do (Keras' ``image_dataset_from_directory`` trains so). Growing is bilinear either way.
ResizeMethod = Literal["area", "bilinear"]
#: Each way of shrinking as logs and reports name it.
RESIZE_NAMES: dict[ResizeMethod, str] = {"area": "area averaging", "bilinear": "bilinear sampling"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantization(_Frozen):
    """Affine quantisation of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class InputSpec(_Frozen):
    """How a frame becomes the model's input."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    colour: ColourOrder
    dtype: TensorType
    #: Normalisation from pixel values (0..255): ``x = pixel * scale + offset``.
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    quantization: Quantization | None = None
    #: True when the batch dimension can be resized; Edge TPU models have a fixed batch of 1.
    dynamic_batch: bool = True
    #: How the model's training images were shrunk; the daemon shrinks crops the same way.
    resize: ResizeMethod = "area"

    @model_validator(mode="after")
    def _colour_fits_channels(self) -> InputSpec:
        if (self.channels == 1) != (self.colour == "gray"):
            raise ValueError(
                f"colour {self.colour!r} does not fit {self.channels} channel(s): "
                "use 'gray' with 1 channel, 'rgb' or 'bgr' with 3"
            )
        return self


class OutputSpec(_Frozen):
    """How to read the model's output."""

    classes: int = Field(gt=0)
    kind: OutputKind = "probabilities"
    dtype: TensorType
    quantization: Quantization | None = None


class AccuracyReport(_Frozen):
    """What the converter measured on the held-out split, float model against converted."""

    heldout_samples: int = Field(ge=0)
    #: What the converted model was checked against: labelled images, or (no labels) the
    #: float model's own answers, when only the agreement is measured and no accuracy.
    reference: Literal["labels", "float_model"] = "labels"
    float_accuracy: float | None = Field(default=None, ge=0, le=1)
    quantized_accuracy: float | None = Field(default=None, ge=0, le=1)
    top1_agreement: float = Field(ge=0, le=1)
    #: ``float_accuracy - quantized_accuracy`` in percentage points (None without labels).
    accuracy_drop_points: float | None = None
    float_size_bytes: int = Field(ge=0)
    tflite_size_bytes: int = Field(ge=0)
    float_latency_ms: float = Field(ge=0)
    tflite_latency_ms: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> AccuracyReport:
        measured = (self.float_accuracy, self.quantized_accuracy, self.accuracy_drop_points)
        if self.reference == "labels" and None in measured:
            raise ValueError("accuracy measured against labels needs all three accuracy fields")
        if self.reference == "float_model" and measured != (None, None, None):
            raise ValueError("without labels (reference float_model) no accuracy is measured")
        return self


class SourceModel(_Frozen):
    """The Keras model the TFLite file was converted from."""

    name: str
    sha256: str


class ModelManifest(_Frozen):
    """Everything the daemon needs to run a converted model, and what the converter measured."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    model_file: str
    labels_file: str = "labels.txt"
    labels: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    quantization_mode: QuantizationMode
    edgetpu: bool = False
    source: SourceModel | None = None
    converter_version: str
    created: str
    accuracy: AccuracyReport | None = None

    def to_bytes(self) -> bytes:
        """The manifest as the JSON file the converter writes.

        ``accuracy.reference`` is left out when it is ``labels`` (its default), and
        ``input.resize`` when it is ``area``: a daemon older than those fields refuses unknown
        fields, and would refuse every new manifest. A teacher-mode manifest (no labels), or
        one for a model trained on bilinear shrinking, needs a daemon that knows the field."""
        data = self.model_dump(mode="json")
        if data.get("accuracy") and data["accuracy"].get("reference") == "labels":
            del data["accuracy"]["reference"]
        if data["input"].get("resize") == "area":
            del data["input"]["resize"]
        return json.dumps(data, indent=2).encode("utf-8") + b"\n"

    @model_validator(mode="after")
    def _labels_fit_outputs(self) -> ModelManifest:
        if len(self.labels) != self.output.classes:
            raise ValueError(
                f"{len(self.labels)} labels for {self.output.classes} model outputs: "
                "the labels file needs one line per output class"
            )
        return self


def read_manifest(path: Path) -> ModelManifest:
    """Read and validate a manifest, raising :class:`ModelError` with one clear line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(
            f"model manifest {path} does not exist: convert the model with "
            "'edge-convert quantize' or point EDGE_MODEL__PATH at its .tflite"
        ) from exc
    except OSError as exc:
        raise ModelError(f"cannot read model manifest {path}: {exc.strerror}") from exc
    try:
        return ModelManifest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ModelError(
            f"model manifest {path} is not valid at {where}: {first['msg']}; "
            "re-create it with 'edge-convert quantize'"
        ) from exc


def read_labels(path: Path) -> tuple[str, ...]:
    """Read a labels file: one label a line, blank lines at the end ignored."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no label
    except FileNotFoundError as exc:
        raise ModelError(
            f"labels file {path} does not exist: put one label a line "
            "beside the model, or set EDGE_MODEL__LABELS"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


def write_labels(labels: tuple[str, ...] | list[str], path: Path) -> None:
    """Write a labels file atomically, one label a line."""
    write_atomic(path, ("\n".join(labels) + "\n").encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
