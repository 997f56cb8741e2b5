"""Loading the Keras model to convert: a ``.keras`` file, a legacy ``.h5``, or a SavedModel."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.errors import BadInputError, InputMissingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceModel:
    """A Keras model (SavedModels are wrapped in one) with the facts conversion needs."""

    path: Path
    model: Any
    height: int
    width: int
    channels: int
    classes: int
    sha256: str

    def predict(self, x: npt.NDArray[np.float32], batch_size: int = 256) -> npt.NDArray[np.float32]:
        """The float model's outputs for a preprocessed batch."""
        out = self.model.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)

    def with_batch(self, batch: int | None) -> Any:
        """The model with a fixed batch dimension (``None`` keeps it dynamic)."""
        import keras  # noqa: PLC0415

        if batch is None:
            return self.model
        inp = keras.Input((self.height, self.width, self.channels), batch_size=batch)
        return keras.Model(inp, self.model(inp), name=f"{self.model.name}_batch{batch}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of every file in a folder (sorted by relative path)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):  # type: ignore[misc]
                digest.update(chunk)
    return digest.hexdigest()


def load_source(path: Path) -> SourceModel:
    """Load a Keras model from ``path`` and check it is an image classifier."""
    import keras  # noqa: PLC0415

    if not path.exists():
        raise InputMissingError(
            f"model {path} does not exist: give a .keras or .h5 file or a "
            "SavedModel folder (train one with 'edge-convert train')"
        )
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").is_file():
                raise BadInputError(
                    f"{path} is a folder without saved_model.pb: give a .keras or .h5 "
                    "file or a SavedModel folder"
                )
            model = _wrap_saved_model(path)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                model = keras.models.load_model(path, compile=False)
    except BadInputError:
        raise
    except PermissionError as exc:
        raise InputMissingError(f"cannot read model {path}: permission denied") from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(
            f"{path} is not a Keras model ({first[:160]}): give a .keras or .h5 file "
            "or a SavedModel folder"
        ) from exc
    in_shape = tuple(model.inputs[0].shape)
    out_shape = tuple(model.outputs[0].shape)
    if (
        len(model.inputs) != 1
        or len(in_shape) != 4
        or in_shape[3] not in (1, 3)
        or None in in_shape[1:]
    ):
        raise BadInputError(
            f"{path} takes input of shape {in_shape}: edge-convert converts image "
            "classifiers with one input shaped (batch, height, width, 1 or 3)"
        )
    if len(model.outputs) != 1 or len(out_shape) != 2 or out_shape[1] is None:
        raise BadInputError(
            f"{path} gives output of shape {out_shape}: edge-convert converts "
            "classifiers with one output shaped (batch, classes)"
        )
    return SourceModel(
        path,
        model,
        int(in_shape[1]),
        int(in_shape[2]),
        int(in_shape[3]),
        int(out_shape[1]),
        file_sha256(path),
    )


def _wrap_saved_model(path: Path) -> Any:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise BadInputError(
            f"SavedModel {path} has no serving signature: export it with model.export(path)"
        )
    endpoint = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    spec = next(iter(signatures[endpoint].structured_input_signature[1].values()))
    shape = tuple(spec.shape)
    if len(shape) != 4 or None in shape[1:]:
        raise BadInputError(
            f"SavedModel {path} takes input of shape {shape}: edge-convert converts "
            "image classifiers shaped (batch, height, width, 1 or 3)"
        )
    layer = keras.layers.TFSMLayer(str(path), call_endpoint=endpoint)
    inp = keras.Input(shape[1:])
    out = layer(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return keras.Model(inp, out, name=path.name)


def _layers(model: Any) -> list[Any]:
    """Every layer in order, nested models opened (a Keras application inside a Sequential)."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if getattr(layer, "layers", None):
            out += _layers(layer)
    return out


#: Names Keras gives its MobileNet applications (``mobilenetv2_0.35_96``): they want [-1, 1].
#: MobileNetV3 and EfficientNet carry a Rescaling layer of their own instead.
KERAS_MOBILENET = re.compile(r"^mobilenet(v2)?_\d\.\d+_\d+$")


def expected_scaling(model: Any) -> tuple[float, float, str] | None:
    """``(scale, offset, why)`` of the input a model says it wants, where it says so.

    A ``Rescaling`` layer of 1/255 or 1/127.5 before the first convolution or dense layer
    means the model scales pixels itself: it wants them as they are (0 to 255). A Keras
    MobileNet application (by the name Keras gives it, inside the model) wants
    ``pixel / 127.5 - 1``. None when nothing says.
    """
    for layer in _layers(model):
        kind = type(layer).__name__
        if kind == "Rescaling":
            factor = float(np.ravel(getattr(layer, "scale", 0.0))[0])
            if any(abs(factor - f) < 1e-6 for f in (1 / 255, 1 / 127.5)):
                return 1.0, 0.0, f"its Rescaling layer {layer.name!r} scales 0-255 pixels itself"
            return None
        if kind.startswith(("Conv", "Dense", "DepthwiseConv", "SeparableConv")):
            break
    for layer in [model, *_layers(model)]:
        name = str(getattr(layer, "name", ""))
        if KERAS_MOBILENET.match(name):
            return 1.0 / 127.5, -1.0, f"{name!r} is a Keras MobileNet, which wants [-1, 1]"
    return None
