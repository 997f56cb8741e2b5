"""A loaded model: its input and output specs, batch resizing, and ``run(batch)``.

An :class:`Engine` belongs to one thread (TFLite interpreters are not thread-safe). With a
manifest, the specs come from it and are checked against the tensors; without one (a
third-party ``.tflite``), shapes and quantisation come from the tensors and the caller supplies
what tensors cannot say: labels, colour order and scaling.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon import postprocess
from edge_daemon.errors import ModelError
from edge_daemon.manifest import (
    ColourOrder,
    InputSpec,
    ModelManifest,
    OutputSpec,
    Quantization,
    read_labels,
    read_manifest,
)
from edge_daemon.preprocess import Frame, preprocess_batch
from edge_daemon.runtime import RuntimeName, load_edgetpu_delegate, load_runtime, make_interpreter

log = logging.getLogger(__name__)


def _quantization(detail: dict[str, Any]) -> Quantization | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return Quantization(scale=float(scale), zero_point=int(zero_point))


def _dtype_name(detail: dict[str, Any]) -> str:
    return str(np.dtype(detail["dtype"]).name)


class Engine:
    """A TFLite model ready to run batches on one thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        manifest: ModelManifest | None = None,
        labels: tuple[str, ...] | None = None,
        colour: ColourOrder | None = None,
        scale: float | None = None,
        offset: float | None = None,
        runtime: RuntimeName = "auto",
        num_threads: int | None = None,
        edgetpu_device: str | None = None,
        edgetpu_library: str | None = None,
        use_edgetpu: bool = False,
        verify: bool = True,
    ) -> None:
        self.model_path = model_path
        self.runtime = load_runtime(runtime)
        delegates = []
        if use_edgetpu:
            delegates.append(load_edgetpu_delegate(self.runtime, edgetpu_device, edgetpu_library))
        #: True when the model runs on an Edge TPU (its delegate loaded).
        self.on_edgetpu = use_edgetpu
        self.interpreter = make_interpreter(
            model_path,
            runtime=self.runtime,
            num_threads=num_threads,
            delegates=delegates,
            verify=verify,
        )
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{model_path} has {len(inputs)} inputs and {len(outputs)} outputs: "
                "edge-daemon runs image classifiers with one input and one output"
            )
        self._input = inputs[0]
        self._output = outputs[0]
        self.manifest = manifest
        if manifest is not None:
            self.input_spec, self.output_spec = manifest.input, manifest.output
            self.labels = labels or manifest.labels
            self._check_against_tensors()
        else:
            self.input_spec, self.output_spec = self._specs_from_tensors(colour, scale, offset)
            self.labels = labels or tuple(str(i) for i in range(self.output_spec.classes))
        if len(self.labels) != self.output_spec.classes:
            raise ModelError(
                f"{len(self.labels)} labels for the {self.output_spec.classes} "
                f"outputs of {model_path}: the labels file needs one line per class"
            )
        self._batch_size = int(self._input["shape"][0])
        if not self.input_spec.dynamic_batch and self._batch_size != 1:
            raise ModelError(
                f"{model_path} has a fixed batch of {self._batch_size}: convert it "
                "with a dynamic batch dimension, or a batch of 1"
            )

    @classmethod
    def from_path(cls, model_path: Path, **kwargs: Any) -> Engine:
        """Load a model with its manifest (``NAME.json`` beside it) when there is one."""
        manifest_path = model_path.with_suffix(".json")
        if "manifest" not in kwargs and manifest_path.is_file():
            kwargs["manifest"] = read_manifest(manifest_path)
        elif "manifest" not in kwargs and "labels" not in kwargs:
            labels_path = model_path.parent / "labels.txt"
            if labels_path.is_file():
                kwargs["labels"] = read_labels(labels_path)
        return cls(model_path, **kwargs)

    # --- specs -----------------------------------------------------------------------------

    def _specs_from_tensors(
        self, colour: ColourOrder | None, scale: float | None, offset: float | None
    ) -> tuple[InputSpec, OutputSpec]:
        shape = self._input["shape"]
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise ModelError(
                f"{self.model_path} takes input of shape {list(shape)}: edge-daemon "
                "needs images shaped (batch, height, width, 1 or 3)"
            )
        channels = int(shape[3])
        in_dtype = _dtype_name(self._input)
        in_quant = _quantization(self._input)
        if scale is None:
            # A quantised uint8 input is usually fed raw pixels; a float one wants 0..1.
            scale = 1.0 / 255.0 if in_dtype.startswith("float") or in_quant is not None else 1.0
        signature = self._input.get("shape_signature", shape)
        input_spec = InputSpec(
            height=int(shape[1]),
            width=int(shape[2]),
            channels=channels,  # type: ignore[arg-type]
            colour=colour or ("gray" if channels == 1 else "rgb"),
            dtype=in_dtype,  # type: ignore[arg-type]
            scale=scale,
            offset=offset or 0.0,
            quantization=in_quant,
            dynamic_batch=int(signature[0]) == -1,
        )
        out_shape = self._output["shape"]
        output_spec = OutputSpec(
            classes=int(np.prod(out_shape[1:])),
            dtype=_dtype_name(self._output),  # type: ignore[arg-type]
            quantization=_quantization(self._output),
        )
        return input_spec, output_spec

    def _check_against_tensors(self) -> None:
        spec = self.input_spec
        shape = [int(v) for v in self._input["shape"]]
        expected = [spec.height, spec.width, spec.channels]
        problems = []
        if shape[1:] != expected:
            problems.append(f"input shape {shape[1:]} is not the manifest's {expected}")
        if _dtype_name(self._input) != spec.dtype:
            problems.append(
                f"input type {_dtype_name(self._input)} is not the manifest's {spec.dtype}"
            )
        classes = int(np.prod(self._output["shape"][1:]))
        if classes != self.output_spec.classes:
            problems.append(f"{classes} outputs, not the manifest's {self.output_spec.classes}")
        if problems:
            raise ModelError(
                f"{self.model_path} does not fit its manifest: {'; '.join(problems)}; "
                "convert the model and its manifest together with 'edge-convert'"
            )

    # --- running ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The model's name: the manifest's, else the file's stem."""
        return self.manifest.name if self.manifest is not None else self.model_path.stem

    def _resize(self, size: int) -> None:
        if size == self._batch_size:
            return
        shape = [size, self.input_spec.height, self.input_spec.width, self.input_spec.channels]
        started = time.perf_counter()
        self.interpreter.resize_tensor_input(self._input["index"], shape, strict=True)
        self.interpreter.allocate_tensors()
        self._batch_size = size
        log.debug(
            "resized %s to batch %d in %.1f ms",
            self.name,
            size,
            (time.perf_counter() - started) * 1000,
        )

    def run(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """Raw output for a preprocessed batch, shape ``(n, ...)``.

        A model with a dynamic batch runs the batch in one call, resizing the interpreter
        only when the size changes; a model with a fixed batch of 1 runs element by element.
        """
        n = batch.shape[0]
        if self.input_spec.dynamic_batch:
            self._resize(n)
            self.interpreter.set_tensor(self._input["index"], batch)
            self.interpreter.invoke()
            out: npt.NDArray[np.generic] = self.interpreter.get_tensor(self._output["index"])
            return out.copy()
        results = []
        for i in range(n):
            self.interpreter.set_tensor(self._input["index"], batch[i : i + 1])
            self.interpreter.invoke()
            results.append(self.interpreter.get_tensor(self._output["index"]).copy())
        return np.concatenate(results, axis=0)

    def scores(self, batch: npt.NDArray[np.generic]) -> postprocess.Scores:
        """Class probabilities for a preprocessed batch."""
        return postprocess.scores(self.run(batch), self.output_spec)

    def classify(self, images: list[Frame] | npt.NDArray[np.uint8]) -> postprocess.Scores:
        """Class probabilities for raw images (BGR or gray), preprocessed as the daemon does."""
        return self.scores(preprocess_batch(images, self.input_spec))
