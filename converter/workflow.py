"""``edge-convert quantize`` from end to end: convert, evaluate, gate, report, then publish.

Every output is first written under a temporary name in the output folder; only when the gate
passes are they renamed into place, the manifest last, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from converter import __version__
from converter.datasets import Dataset, check_fits, load_dataset, make_split
from converter.edgetpu import INSTALL_COMPILER, compile_model
from converter.errors import BadInputError, GateFailedError, ToolMissingError
from converter.evaluate import Evaluation, evaluate
from converter.quantize import IoType, calibration_set, convert, native_stderr_to_log
from converter.report import figure_png, markdown, report_paths
from converter.source import SourceModel, load_source
from converter.train import read_record, record_path_for, split_from_record
from edge_daemon.engine import Engine
from edge_daemon.manifest import (
    AccuracyReport,
    ColourOrder,
    InputSpec,
    ModelManifest,
    OutputSpec,
    QuantizationMode,
    read_labels,
    write_atomic,
)
from edge_daemon.manifest import (
    SourceModel as ManifestSource,
)
from edge_daemon.preprocess import preprocess_batch

log = logging.getLogger(__name__)


@dataclass
class QuantizeOptions:
    """What ``edge-convert quantize`` was asked to do."""

    model: Path
    mode: QuantizationMode = "int8"
    output: Path | None = None
    name: str | None = None
    dataset: str | None = None
    labels: Path | None = None
    seed: int = 0
    holdout: float = 0.2
    calibration_samples: int = 200
    io_type: IoType = "uint8"
    max_accuracy_drop: float = 1.0
    edgetpu: bool = False
    allow_cpu_ops: bool = False
    colour: ColourOrder | None = None
    scale: float | None = None
    offset: float | None = None


@dataclass
class QuantizeResult:
    """The files written and the figures measured."""

    manifest: ModelManifest
    evaluation: Evaluation
    written: list[Path] = field(default_factory=list)
    edgetpu_note: str | None = None


class _Staging:
    """Files written under temporary names, renamed into place together or removed together."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.pending: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.partial")
        self.pending.append((tmp, final))
        return tmp

    def write(self, final: Path, data: bytes) -> Path:
        tmp = self.path(final)
        write_atomic(tmp, data)
        return tmp

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self.pending:
            if tmp.exists():
                tmp.replace(final)
                done.append(final)
        self.pending.clear()
        return done

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()


def _labels_for(opts: QuantizeOptions, source: SourceModel, dataset: Dataset) -> tuple[str, ...]:
    path = opts.labels or source.path.parent / "labels.txt"
    labels = read_labels(path) if path.is_file() or opts.labels is not None else dataset.classes
    if len(labels) != source.classes:
        raise BadInputError(
            f"{len(labels)} labels in {path} for the {source.classes} outputs of "
            f"{source.model.name}: give a labels file with one line per output "
            "(--labels)"
        )
    return labels


def _float_spec(
    opts: QuantizeOptions, source: SourceModel, record: dict[str, object] | None
) -> InputSpec:
    base = InputSpec.model_validate(record["input"]) if record and "input" in record else None
    colour = opts.colour or (base.colour if base else ("gray" if source.channels == 1 else "rgb"))
    return InputSpec(
        height=source.height,
        width=source.width,
        channels=source.channels,  # type: ignore[arg-type]
        colour=colour,
        dtype="float32",
        scale=opts.scale if opts.scale is not None else (base.scale if base else 1.0 / 255.0),
        offset=opts.offset if opts.offset is not None else (base.offset if base else 0.0),
    )


def _spec_from_engine(engine: Engine, float_spec: InputSpec) -> InputSpec:
    tensor = engine.input_spec
    return float_spec.model_copy(
        update={
            "dtype": tensor.dtype,
            "quantization": tensor.quantization,
            "dynamic_batch": tensor.dynamic_batch,
        }
    )


def quantize(opts: QuantizeOptions) -> QuantizeResult:
    """Convert, evaluate against the float model, apply the gate, write everything or nothing."""
    if opts.edgetpu and opts.mode != "int8":
        log.warning("--edgetpu needs full integer quantisation: using --mode int8")
        opts.mode = "int8"
    if opts.edgetpu:
        opts.io_type = "uint8"
    source = load_source(opts.model)
    record_path = record_path_for(opts.model)
    record = read_record(record_path) if record_path.is_file() else None
    spec = opts.dataset or (str(record["dataset"]) if record else None)
    if spec is None:
        raise BadInputError(
            f"no dataset for calibration and evaluation: pass --dataset (no training "
            f"record {record_path} beside the model)"
        )
    dataset = load_dataset(spec)
    check_fits(dataset, source.channels, source.classes, str(opts.model))
    if record is not None and spec == record["dataset"]:
        split = split_from_record(record, dataset, record_path)
    else:
        split = make_split(dataset, spec, opts.seed, opts.holdout)
    labels = _labels_for(opts, source, dataset)
    float_spec = _float_spec(opts, source, record)
    name = opts.name or opts.model.name.split(".")[0]
    output = opts.output or opts.model.parent
    output.mkdir(parents=True, exist_ok=True)

    training = dataset.subset(split.train)
    calibration = calibration_set(
        preprocess_batch(training.images, float_spec).astype(np.float32),
        opts.calibration_samples,
        opts.seed,
    )
    log.info(
        "converting %s to %s (%d calibration images from the training part)",
        opts.model,
        opts.mode,
        len(calibration) if opts.mode == "int8" else 0,
    )
    flatbuffer = convert(
        source, opts.mode, calibration, io_type=opts.io_type, fixed_batch=opts.edgetpu
    )
    staging = _Staging(output)
    try:
        result = _evaluate_and_publish(
            opts,
            source,
            dataset.subset(split.heldout),
            labels=labels,
            float_spec=float_spec,
            name=name,
            output=output,
            flatbuffer=flatbuffer,
            staging=staging,
        )
    except BaseException:
        staging.discard()
        raise
    return result


def _evaluate_and_publish(
    opts: QuantizeOptions,
    source: SourceModel,
    heldout: Dataset,
    *,
    labels: tuple[str, ...],
    float_spec: InputSpec,
    name: str,
    output: Path,
    flatbuffer: bytes,
    staging: _Staging,
) -> QuantizeResult:
    model_file = output / f"{name}.tflite"
    tmp_model = staging.write(model_file, flatbuffer)
    with native_stderr_to_log():
        probe = Engine(tmp_model, labels=labels, colour=float_spec.colour, verify=False)
    input_spec = _spec_from_engine(probe, float_spec)
    probabilities = _looks_like_probabilities(source, heldout, float_spec)
    output_spec = OutputSpec(
        classes=source.classes,
        kind="probabilities" if probabilities else "logits",
        dtype=probe.output_spec.dtype,
        quantization=probe.output_spec.quantization,
    )
    manifest = ModelManifest(
        name=name,
        model_file=model_file.name,
        labels=labels,
        input=input_spec,
        output=output_spec,
        quantization_mode=opts.mode,
        source=ManifestSource(name=source.path.name, sha256=source.sha256),
        converter_version=__version__,
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )
    with native_stderr_to_log():
        engine = Engine(tmp_model, manifest=manifest, verify=False)
    evaluation = evaluate(source, float_spec, engine, heldout)
    float_size = len(flatbuffer) if opts.mode == "float32" else _float32_size(source)
    manifest = manifest.model_copy(
        update={
            "accuracy": AccuracyReport(
                heldout_samples=len(heldout),
                float_accuracy=evaluation.float_accuracy,
                quantized_accuracy=evaluation.quantized_accuracy,
                top1_agreement=evaluation.agreement,
                accuracy_drop_points=round(evaluation.drop_points, 4),
                float_size_bytes=float_size,
                tflite_size_bytes=len(flatbuffer),
                float_latency_ms=round(evaluation.float_latency_ms, 4),
                tflite_latency_ms=round(evaluation.tflite_latency_ms, 4),
            )
        }
    )
    md_path, png_path = report_paths(output, name)
    staging.write(
        md_path,
        markdown(manifest, evaluation, opts.max_accuracy_drop, png_path.name).encode("utf-8"),
    )
    staging.write(png_path, figure_png(manifest, evaluation))
    if evaluation.drop_points > opts.max_accuracy_drop:
        raise GateFailedError(
            f"{opts.mode} conversion lost {evaluation.drop_points:.2f} accuracy points "
            f"({evaluation.float_accuracy * 100:.2f}% float, "
            f"{evaluation.quantized_accuracy * 100:.2f}% converted, on {len(heldout)} held-out "
            f"images), more than --max-accuracy-drop {opts.max_accuracy_drop}: try more "
            "--calibration-samples, another --mode, or raise the limit; nothing was written"
        )
    staging.write(output / "labels.txt", ("\n".join(labels) + "\n").encode("utf-8"))
    note = None
    compiled_manifest = None
    if opts.edgetpu:
        try:
            compiled = compile_model(tmp_model, output, allow_cpu_ops=opts.allow_cpu_ops)
        except ToolMissingError:
            note = (
                INSTALL_COMPILER.format(out=output, model=model_file)
                + f". The Edge TPU-ready model {model_file} was written, not compiled."
            )
        else:
            final_compiled = output / f"{name}_edgetpu.tflite"
            staging.pending.append((compiled.model_path, final_compiled))
            compiled_manifest = manifest.model_copy(
                update={
                    "name": f"{name}_edgetpu",
                    "model_file": final_compiled.name,
                    "edgetpu": True,
                }
            )
    manifest_path = output / f"{name}.json"
    staging.write(manifest_path, manifest.to_bytes())
    if compiled_manifest is not None:
        staging.write(
            output / f"{name}_edgetpu.json",
            compiled_manifest.to_bytes(),
        )
    written = staging.commit()
    return QuantizeResult(manifest, evaluation, written, note)


def _looks_like_probabilities(source: SourceModel, heldout: Dataset, spec: InputSpec) -> bool:
    out = source.predict(preprocess_batch(heldout.images[:32], spec).astype(np.float32))
    return bool(np.all(out >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def _float32_size(source: SourceModel) -> int:
    """Size of the plain float32 TFLite conversion, the yardstick for the others."""
    return len(convert(source, "float32", np.empty((0,), dtype=np.float32)))
