"""Transfer learning for real scenes: Keras MobileNetV2 (alpha 0.35, RGB) with a trained head.

The base comes with the ImageNet weights Keras downloads on the user's machine (``imagenet``),
none (``none``: random, for tests and for the curious), or a weights file. It is frozen while a
new head (global average pooling, dropout, a softmax layer) learns the user's classes; then,
when asked, the top of the base is unfrozen and trained a little more at a low learning rate
(fine-tuning). MobileNetV2 wants pixels in [-1, 1]: the training record says so, and the
converter and the daemon feed it that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from converter.errors import BadInputError, InputMissingError
from edge_daemon.manifest import InputSpec

log = logging.getLogger(__name__)

#: Input sizes Keras has ImageNet weights for, for MobileNetV2.
IMAGENET_SIZES = (96, 128, 160, 192, 224)
#: Layers at the top of the base trained again when fine-tuning.
FINE_TUNE_LAYERS = 30


def mobilenet_input_spec(size: int) -> InputSpec:
    """MobileNetV2's float input: RGB, pixel / 127.5 - 1."""
    return InputSpec(
        height=size,
        width=size,
        channels=3,
        colour="rgb",
        dtype="float32",
        scale=1.0 / 127.5,
        offset=-1.0,
    )


def build_mobilenet(size: int, classes: int, alpha: float, weights: str) -> tuple[Any, Any]:
    """``(model, base)``: a frozen MobileNetV2 base and a new head, compiled."""
    import keras  # noqa: PLC0415

    if weights == "imagenet" and size not in IMAGENET_SIZES:
        raise BadInputError(
            f"--input-size {size}: Keras has ImageNet weights for MobileNetV2 at "
            f"{', '.join(map(str, IMAGENET_SIZES))} pixels only"
        )
    file = None if weights in ("imagenet", "none") else Path(weights)
    if file is not None and not file.is_file():
        raise InputMissingError(
            f"weights file {file} does not exist: give imagenet, none or a file"
        )
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        alpha=alpha,
        include_top=False,
        weights="imagenet" if weights == "imagenet" else None,
        pooling="avg",
    )
    if file is not None:
        try:
            base.load_weights(file)
        except (ValueError, OSError) as exc:
            raise BadInputError(
                f"weights file {file} does not fit MobileNetV2 alpha {alpha} at {size} pixels: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    features = base(inputs, training=False)
    features = keras.layers.Dropout(0.2)(features)
    outputs = keras.layers.Dense(classes, activation="softmax")(features)
    model = keras.Model(inputs, outputs, name=f"mobilenetv2_{alpha:.2f}_{size}_transfer")
    _compile(model, 1e-3)
    return model, base


def unfreeze_top(model: Any, base: Any) -> None:
    """Make the top of the base trainable (batch normalisation stays frozen) and recompile at a
    low learning rate, for fine-tuning."""
    import keras  # noqa: PLC0415

    base.trainable = True
    for layer in base.layers[:-FINE_TUNE_LAYERS]:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    _compile(model, 1e-5)


def _compile(model: Any, rate: float) -> None:
    import keras  # noqa: PLC0415

    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
