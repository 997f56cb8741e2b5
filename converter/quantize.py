"""Keras to TFLite in one of four modes, with a representative dataset for full integer."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import numpy.typing as npt

from converter.errors import BadInputError
from converter.source import SourceModel
from edge_daemon.manifest import QuantizationMode

log = logging.getLogger(__name__)

IoType = Literal["uint8", "int8"]


def convert(
    source: SourceModel,
    mode: QuantizationMode,
    calibration: npt.NDArray[np.float32],
    *,
    io_type: IoType = "uint8",
    fixed_batch: bool = False,
) -> bytes:
    """Convert ``source`` to a TFLite flatbuffer.

    ``calibration`` holds preprocessed float inputs from the training part (full integer
    only). The batch dimension stays dynamic unless ``fixed_batch`` (the Edge TPU needs 1).
    """
    import tensorflow as tf  # noqa: PLC0415

    model = source.with_batch(1 if fixed_batch else None)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic" and hasattr(
        converter, "_experimental_disable_per_channel_quantization_for_dense_layers"
    ):
        # Per-channel dense weights need FULLY_CONNECTED version 12, which tflite-runtime 2.14
        # (what 32-bit ARM boards have) cannot load; per-tensor weights load everywhere.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if len(calibration) == 0:
            raise BadInputError(
                "full integer quantisation needs calibration images: give a dataset "
                "with training images (--dataset)"
            )

        def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
            for sample in calibration:
                yield [sample[None, ...]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if io_type == "uint8" else tf.int8
        converter.inference_output_type = converter.inference_input_type
    # Keras prints the exported signature on stdout and the converter's C++ side chats on
    # stderr; keep both for --debug and the terminal for results.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), native_stderr_to_log():
        flatbuffer = converter.convert()
    log.debug("converter output: %s", captured.getvalue())
    return bytes(flatbuffer)


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Send what native code writes to file descriptor 2, and Python warnings, to the log."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.debug("native output: %s", sink.read().decode("utf-8", "replace"))


def calibration_indices(available: int, count: int, seed: int) -> npt.NDArray[np.int64]:
    """Which of ``available`` training images calibrate: ``count`` drawn without replacement,
    seeded (all of them when there are no more). Only those are then preprocessed, so a large
    dataset at a large input size never sits in memory as float32 whole."""
    if count <= 0 or available <= count:
        return np.arange(available, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(available, size=count, replace=False)).astype(np.int64)
