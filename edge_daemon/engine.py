"""A loaded model: its input and output specs, batch resizing, and ``run(batch)``.

An :class:`Engine` belongs to one thread (TFLite interpreters are not thread-safe). With a
manifest, the specs come from it and are checked against the tensors; without one (a
third-party ``.tflite``), shapes and quantisation come from the tensors and the caller supplies
what tensors cannot say: labels, colour order and scaling.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon import postprocess
from edge_daemon.batching import BatchChoice
from edge_daemon.errors import DelegateError, ModelError
from edge_daemon.manifest import (
    RESIZE_NAMES,
    ColourOrder,
    InputSpec,
    ModelManifest,
    OutputSpec,
    Quantization,
    ResizeMethod,
    read_labels,
    read_manifest,
)
from edge_daemon.preprocess import (
    Image,
    fit,
    fit_stack,
    lookup_into,
    pixel_table,
)
from edge_daemon.runtime import (
    RuntimeName,
    load_edgetpu_delegate,
    load_runtime,
    make_interpreter,
    read_model,
)
from edge_daemon.settings import Settings
from edge_daemon.threads import ThreadChoice, usable_cores

log = logging.getLogger(__name__)

#: Interpreters kept, one per batch size (and thread count) used; more than this resize the
#: oldest.
MAX_INTERPRETERS = 8


def thread_options(num_threads: int | None, use_edgetpu: bool) -> tuple[int | None, ...]:
    """The interpreter threads to choose between: the setting when there is one (or on an
    Edge TPU, where the CPU's threads do not run the model); else the runtime's default of
    one, or every core this process may use (:mod:`edge_daemon.threads`)."""
    cores = usable_cores()
    if num_threads is not None or use_edgetpu or cores < 2:
        return (num_threads,)
    return (None, cores)


def _quantization(detail: dict[str, Any]) -> Quantization | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return Quantization(scale=float(scale), zero_point=int(zero_point))


def _bounded(dtype: np.dtype[Any], quantization: Quantization | None) -> bool:
    """Whether every value of an integer tensor dequantises into 0..1 (in float32, as
    :func:`postprocess.dequantize` computes)."""
    if quantization is None or not np.issubdtype(dtype, np.integer):
        return False
    limits = np.iinfo(dtype)
    ends = postprocess.dequantize(np.array([limits.min, limits.max], dtype=dtype), quantization)
    return bool(ends.min() >= 0.0 and ends.max() <= 1.0)


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
        resize: ResizeMethod | None = None,
        scale: float | None = None,
        offset: float | None = None,
        runtime: RuntimeName = "auto",
        num_threads: int | None = None,
        edgetpu_device: str | None = None,
        edgetpu_library: str | None = None,
        use_edgetpu: bool = False,
        verify: bool = True,
        content: bytes | None = None,
    ) -> None:
        self.model_path = model_path
        #: How this engine was made, for :meth:`reopen`.
        self._made_with: dict[str, Any] = {
            "manifest": manifest,
            "labels": labels,
            "colour": colour,
            "resize": resize,
            "scale": scale,
            "offset": offset,
            "runtime": runtime,
            "num_threads": num_threads,
            "edgetpu_device": edgetpu_device,
            "edgetpu_library": edgetpu_library,
            "use_edgetpu": use_edgetpu,
            "verify": verify,
        }
        self.runtime = load_runtime(runtime)
        delegates = []
        if use_edgetpu:
            delegates.append(load_edgetpu_delegate(self.runtime, edgetpu_device, edgetpu_library))
        #: True when the model runs on an Edge TPU (its delegate loaded).
        self.on_edgetpu = use_edgetpu
        self._num_threads = num_threads
        # Read once: interpreters made later for other batch sizes come from these bytes, not
        # from a file that may have been replaced (or half-copied) since.
        self._content = read_model(model_path) if content is None else content
        #: A short hash of the model's bytes: says which model produced a label, across reloads.
        self.digest = hashlib.sha256(self._content).hexdigest()[:12]
        first = make_interpreter(
            model_path,
            runtime=self.runtime,
            content=self._content,
            num_threads=num_threads,
            delegates=delegates,
            verify=verify,
        )
        inputs = first.get_input_details()
        outputs = first.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{model_path} has {len(inputs)} inputs and {len(outputs)} outputs: "
                "edge-daemon runs image classifiers with one input and one output"
            )
        self._input = inputs[0]
        self._output = outputs[0]
        out_shape = [int(v) for v in self._output["shape"]]
        if len(out_shape) != 2 or out_shape[1] < 1:
            raise ModelError(
                f"{model_path} gives output of shape {out_shape}: edge-daemon runs image "
                "classifiers, whose output is (batch, classes)"
            )
        self.manifest = manifest
        #: No manifest and no scale or offset from the settings: the input range is a guess.
        self.scaling_assumed = manifest is None and scale is None and offset is None
        if manifest is not None:
            self.input_spec, self.output_spec = manifest.input, manifest.output
            self.labels = labels or manifest.labels
            self._check_against_tensors()
        else:
            self.input_spec, self.output_spec = self._specs_from_tensors(
                colour, resize, scale, offset
            )
            self.labels = labels or tuple(str(i) for i in range(self.output_spec.classes))
        if len(self.labels) != self.output_spec.classes:
            raise ModelError(
                f"{len(self.labels)} labels for the {self.output_spec.classes} "
                f"outputs of {model_path}: the labels file needs one line per class"
            )
        self._first_size = int(self._input["shape"][0])
        if not self.input_spec.dynamic_batch and self._first_size != 1:
            raise ModelError(
                f"{model_path} has a fixed batch of {self._first_size}: convert it "
                "with a dynamic batch dimension, or a batch of 1"
            )
        #: Batches run in one call (a dynamic batch on the CPU); otherwise image by image. An
        #: Edge TPU runs one image at a time, and more interpreters would fight over its cache.
        self.batched = self.input_spec.dynamic_batch and not use_edgetpu
        #: Interpreters by the batch size their input is shaped for and their threads, least
        #: recently used first.
        self._first_key = (self._first_size, num_threads)
        self._interpreters: OrderedDict[tuple[int, int | None], Any] = OrderedDict(
            {self._first_key: first}
        )
        #: Interpreters made or resized for a new batch size since loading.
        self.resizes = 0
        #: Set once any output showed values outside 0..1: the model gives logits.
        self._logits = self.output_spec.kind == "logits"
        #: The output is integers whose every value dequantises into 0..1: each output is
        #: probabilities as it stands, finite, with nothing to check or clip.
        self.output_bounded = not self._logits and _bounded(
            np.dtype(self._output["dtype"]), self.output_spec.quantization
        )
        #: Whether ``infer`` runs several crops as one batch (learnt per size in ``auto``).
        self.batching = BatchChoice("auto", self.name)
        #: How many threads :meth:`infer_shaped` runs the interpreter on: the setting here; the
        #: daemon's engine learns it when unset (:func:`load_engine`).
        self.threads = ThreadChoice((num_threads,), self.name)
        #: The size of the batch the last call ran in (1: one by one).
        self.last_batch = 1

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
        self,
        colour: ColourOrder | None,
        resize: ResizeMethod | None,
        scale: float | None,
        offset: float | None,
    ) -> tuple[InputSpec, OutputSpec]:
        shape = [int(v) for v in self._input["shape"]]
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise ModelError(
                f"{self.model_path} takes input of shape {shape}: edge-daemon "
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
            resize=resize or "area",
        )
        output_spec = OutputSpec(
            classes=int(self._output["shape"][1]),
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
        classes = int(self._output["shape"][1])
        if classes != self.output_spec.classes:
            problems.append(f"{classes} outputs, not the manifest's {self.output_spec.classes}")
        signature = self._input.get("shape_signature", self._input["shape"])
        if spec.dynamic_batch and int(signature[0]) != -1:
            problems.append("the manifest says the batch is dynamic, the model's is fixed")
        if problems:
            raise ModelError(
                f"{self.model_path} does not fit its manifest: {'; '.join(problems)}; "
                "convert the model and its manifest together with 'edge-convert'"
            )

    # --- running ---------------------------------------------------------------------------

    def reopen(self) -> Engine:
        """The same model made again from the bytes it was loaded from, never from the file,
        which may have been replaced since (by a model a reload refused, say)."""
        engine = Engine(self.model_path, content=self._content, **self._made_with)
        engine.batching = BatchChoice(self.batching.mode, engine.name)
        engine.threads = ThreadChoice(self.threads.options, engine.name)
        return engine

    @property
    def name(self) -> str:
        """The model's name: the manifest's, else the file's stem."""
        return self.manifest.name if self.manifest is not None else self.model_path.stem

    @property
    def interpreter(self) -> Any:
        """The interpreter loaded first (batch 1); it is never resized or dropped."""
        return self._interpreters[self._first_key]

    def _interpreter_for(self, size: int, threads: int | None) -> Any:
        """An interpreter on ``threads`` whose input holds ``size`` images: kept from an
        earlier batch of that size, or made now. Resizing re-plans memory, so alternating sizes
        must not resize on every batch; past ``MAX_INTERPRETERS``, the least recently used is
        resized (or, on other threads, replaced)."""
        key = (size, threads)
        kept = self._interpreters.get(key)
        if kept is not None:
            self._interpreters.move_to_end(key)
            return kept
        started = time.perf_counter()
        interpreter = None
        if len(self._interpreters) >= MAX_INTERPRETERS:
            oldest = next(k for k in self._interpreters if k != self._first_key)
            dropped = self._interpreters.pop(oldest)
            interpreter = dropped if oldest[1] == threads else None
        if interpreter is None:
            interpreter = make_interpreter(
                self.model_path,
                runtime=self.runtime,
                content=self._content,
                num_threads=threads,
                verify=False,  # the same bytes were checked when the engine loaded
            )
        shape = [size, self.input_spec.height, self.input_spec.width, self.input_spec.channels]
        interpreter.resize_tensor_input(self._input["index"], shape, strict=True)
        interpreter.allocate_tensors()
        self.resizes += 1
        self._interpreters[key] = interpreter
        log.debug(
            "%s: interpreter for batch %d on %s thread(s) ready in %.1f ms",
            self.name,
            size,
            threads or 1,
            (time.perf_counter() - started) * 1000,
        )
        return interpreter

    def _invoke(
        self, interpreter: Any, fill: Callable[[npt.NDArray[np.generic]], None]
    ) -> npt.NDArray[np.generic]:
        """Write the input in place with ``fill(view)``, invoke, return a copy of the output."""
        view = interpreter.tensor(self._input["index"])()
        try:
            fill(view)
        except BaseException as exc:
            # The runtime refuses to invoke while a view of its buffers is alive, and the
            # traceback's frames hold views (kept for as long as a log record keeps it).
            del view
            traceback.clear_frames(exc.__traceback__)
            raise
        del view
        interpreter.invoke()
        out: npt.NDArray[np.generic] = interpreter.get_tensor(self._output["index"])  # a copy
        return out

    def run(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """Raw output for a preprocessed batch, shape ``(n, classes)``.

        A model with a dynamic batch runs the batch in one call; a model with a fixed batch of
        1 (every Edge TPU model) runs element by element.
        """

        def copy_from(source: npt.NDArray[np.generic]) -> Callable[[Any], None]:
            return lambda view: np.copyto(view, source)

        n = batch.shape[0]
        if self.batched:
            return self._invoke(self._interpreter_for(n, self._num_threads), copy_from(batch))
        one = self.interpreter
        return np.concatenate([self._invoke(one, copy_from(batch[i : i + 1])) for i in range(n)])

    def infer(self, images: Sequence[Image]) -> npt.NDArray[np.generic]:
        """Raw output for raw images (BGR or gray crops)."""
        return self.infer_shaped([self.shape(image) for image in images])

    def shape(self, image: Image) -> Image:
        """A crop resized and colour-converted for the model: still 8-bit pixels, small (the
        daemon compares these to see whether a region changed)."""
        spec = self.input_spec
        return fit(image, spec.width, spec.height, spec.colour, spec.resize)

    def shape_many(self, images: Sequence[Image]) -> list[Image]:
        """:meth:`shape` of each image; crops of one size that shrink by area averaging go
        through OpenCV together (:func:`~edge_daemon.preprocess.fit_stack`), the same pixels
        as one by one. Bilinear shrinking would blend neighbouring crops: one by one."""
        spec = self.input_spec
        if spec.resize != "area":
            return [self.shape(image) for image in images]
        out: list[Image | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for size, members in groups.items():
            shrinking = size[0] >= spec.height and size[1] >= spec.width
            if len(members) < 2 or not shrinking or size[:2] == (spec.height, spec.width):
                for i in members:
                    out[i] = self.shape(images[i])
                continue
            crops = [images[i] for i in members]
            tall = fit_stack(crops, spec.width, spec.height, spec.colour)
            for n, i in enumerate(members):
                out[i] = tall[n * spec.height : (n + 1) * spec.height]
        return [image for image in out if image is not None]

    def infer_shaped(self, shaped: Sequence[Image]) -> npt.NDArray[np.generic]:
        """Raw output for images from :meth:`shape`, each converted straight into the
        interpreter's input tensor (one table lookup: no batch array in between)."""
        table = pixel_table(self.input_spec)

        def fill_all(view: npt.NDArray[np.generic]) -> None:
            for slot, image in zip(view, shaped, strict=True):
                lookup_into(table, image, slot)

        n = len(shaped)
        started = time.perf_counter()
        batched = self.batched and self.batching.batch(n)
        self.last_batch = n if batched else 1
        threads = self.threads.current
        if batched:
            out = self._invoke(self._interpreter_for(n, threads), fill_all)
        else:

            def fill_one(image: Image) -> Callable[[npt.NDArray[np.generic]], None]:
                return lambda view: lookup_into(table, image, view[0])

            one = self._interpreter_for(self._first_size, threads)
            if n == 1:
                out = self._invoke(one, fill_one(shaped[0]))
            else:
                out = np.concatenate([self._invoke(one, fill_one(image)) for image in shaped])
        ended = time.perf_counter()
        if self.batched:
            self.batching.record(n, batched, ended - started)
        if self.threads.record(n, ended - started, ended):
            self._drop_other_threads(self.threads.current)
        return out

    def _drop_other_threads(self, threads: int | None) -> None:
        """Drop the interpreters made for threads no longer used (their memory, their idle
        worker threads), except the first, which is never dropped."""
        for key in [k for k in self._interpreters if k[1] != threads and k != self._first_key]:
            del self._interpreters[key]

    def probabilities(self, raw: npt.NDArray[np.generic]) -> postprocess.Scores:
        """Class probabilities in [0, 1] from raw output; rows with NaN or infinity stay
        non-finite so the caller can drop them. Once an output strays outside 0..1 the model
        is taken to give logits, from then on."""
        values = postprocess.real_values(raw, self.output_spec)
        if self.output_bounded:
            return values
        if not self._logits and postprocess.looks_like_logits(values):
            self._logits = True
            log.warning(
                "%s: the model's output is not probabilities (values outside 0..1): applying "
                'softmax from now on; set "kind": "logits" in its manifest to say so',
                self.name,
            )
        return postprocess.to_probabilities(values, self._logits)

    def scores(self, batch: npt.NDArray[np.generic]) -> postprocess.Scores:
        """Class probabilities for a preprocessed batch."""
        return self.probabilities(self.run(batch))

    def classify(self, images: Sequence[Image] | npt.NDArray[np.uint8]) -> postprocess.Scores:
        """Class probabilities for raw images (BGR or gray), preprocessed as the daemon does."""
        return self.probabilities(self.infer(list(images)))


def load_engine(settings: Settings) -> Engine:
    """Load the configured model; on the Edge TPU, fall back to a CPU model when one is set."""
    engine = _load_engine(settings)
    engine.batching = BatchChoice(settings.inference.batching, engine.name)
    threads = settings.model.num_threads
    engine.threads = ThreadChoice(thread_options(threads, engine.on_edgetpu), engine.name)
    return engine


def _load_engine(settings: Settings) -> Engine:
    cfg = settings.model
    labels = read_labels(cfg.labels) if cfg.labels else None
    common: dict[str, object] = {
        "runtime": cfg.runtime,
        "num_threads": cfg.num_threads,
        "colour": cfg.colour,
        "resize": cfg.resize,
        "scale": cfg.scale,
        "offset": cfg.offset,
    }
    if labels is not None:
        common["labels"] = labels
    if cfg.delegate == "edgetpu":
        try:
            return Engine.from_path(
                cfg.path,
                use_edgetpu=True,
                edgetpu_device=cfg.device,
                edgetpu_library=cfg.edgetpu_library,
                **common,
            )
        except DelegateError as exc:
            if cfg.fallback_path is None:
                raise
            log.warning("%s; running the fallback model %s on the CPU", exc, cfg.fallback_path)
            return Engine.from_path(cfg.fallback_path, **common)
    return Engine.from_path(cfg.path, **common)


def model_summary(engine: Engine) -> str:
    """One line about the loaded model, for logs and ``check``."""
    spec = engine.input_spec
    scaling = (
        f"input = pixel * {spec.scale:.6g} {'-' if spec.offset < 0 else '+'} {abs(spec.offset):.6g}"
    )
    if engine.scaling_assumed:
        # Nothing says what the model wants: a wrong guess changes labels without an error.
        scaling += (
            " (assumed: no manifest beside the model; a model that wants [-1, 1] needs "
            "EDGE_MODEL__SCALE=1/127.5 and EDGE_MODEL__OFFSET=-1)"
        )
    return (
        f"{engine.name} ({Path(engine.model_path).name}, {engine.runtime.name}): "
        f"{spec.height}x{spec.width}x{spec.channels} {spec.colour} {spec.dtype}, "
        f"{len(engine.labels)} classes, batch {'dynamic' if spec.dynamic_batch else '1'}, "
        f"shrunk by {RESIZE_NAMES[spec.resize]}, "
        f"{scaling}"
    )
