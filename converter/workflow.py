"""``edge-convert quantize`` from end to end: convert, evaluate, gate, report, then publish.

Every output is first written under a temporary name in the output folder; only when the gate
passes are they renamed into place, the manifest last, so a failed run leaves no model or
manifest behind (a failed gate leaves its report, ``NAME.failed.report.md``, to read).
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
from converter.gate import gate_advice, small_heldout_warning, suspicious, trained_accuracy
from converter.labels import labels_for, same_dataset
from converter.quantize import IoType, calibration_indices, convert, native_stderr_to_log
from converter.report import figure_png, markdown, report_paths
from converter.source import SourceModel, expected_scaling, load_source
from converter.train import read_record, record_path_for, split_from_record
from edge_daemon.engine import Engine
from edge_daemon.manifest import (
    AccuracyReport,
    ColourOrder,
    InputSpec,
    ModelManifest,
    OutputSpec,
    QuantizationMode,
    ResizeMethod,
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
    resize: ResizeMethod | None = None
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


def _float_spec(
    opts: QuantizeOptions, source: SourceModel, record: dict[str, object] | None
) -> InputSpec:
    base = InputSpec.model_validate(record["input"]) if record and "input" in record else None
    colour = opts.colour or (base.colour if base else ("gray" if source.channels == 1 else "rgb"))
    scale, offset = (base.scale, base.offset) if base else (1.0 / 255.0, 0.0)
    resize = opts.resize or (base.resize if base else "area")
    if base is None and opts.scale is None:
        # Nothing the user or our training said: read what the model itself says.
        expected = expected_scaling(source.model)
        if expected is not None:
            scale, offset, why = expected
            log.info(
                "input = pixel * %.6g %+.6g: %s (--scale and --offset override it)",
                scale,
                offset,
                why,
            )
        else:
            log.warning(
                "edge-convert: warning: nothing says what input range %s expects (no training "
                "record, no Rescaling layer): assuming pixel / 255 (0 to 1). A model trained "
                "on another range converts and passes the gate with the wrong input, so pass "
                "--scale and --offset (for [-1, 1]: --scale 1/127.5 --offset -1)",
                source.path.name,
            )
    return InputSpec(
        height=source.height,
        width=source.width,
        channels=source.channels,  # type: ignore[arg-type]
        colour=colour,
        dtype="float32",
        scale=opts.scale if opts.scale is not None else scale,
        offset=opts.offset if opts.offset is not None else offset,
        resize=resize,
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
    labels, origin = labels_for(
        source,
        dataset,
        labels_file=opts.labels,
        dataset_spec=opts.dataset,
        record=record,
        record_path=record_path,
    )
    dataset = dataset.aligned(labels, origin)
    check_fits(dataset, source.channels, source.classes, str(opts.model))
    if record is not None and same_dataset(spec, str(record["dataset"])):
        split = split_from_record(record, dataset, record_path)
    else:
        split = make_split(dataset, spec, opts.seed, opts.holdout)
    if len(split.heldout) == 0:
        raise BadInputError(
            f"dataset {spec} leaves no image to hold out for the accuracy check "
            f"({len(dataset)} images): give more images, or a larger --holdout"
        )
    float_spec = _float_spec(opts, source, record)
    name = opts.name or opts.model.name.split(".")[0]
    output = opts.output or opts.model.parent
    output.mkdir(parents=True, exist_ok=True)

    training = dataset.subset(split.train)
    if opts.mode == "int8":
        picked = calibration_indices(len(training), opts.calibration_samples, opts.seed)
        calibration = preprocess_batch([training.images[i] for i in picked], float_spec).astype(
            np.float32
        )
    else:  # only full integer quantisation calibrates
        calibration = np.empty((0,), dtype=np.float32)
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
            trained=trained_accuracy(record),
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
    trained: float | None,
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
    log.info(
        "evaluating the float and the converted model on %d held-out images%s",
        len(heldout),
        " (no labels: the converted model is checked against the float one)"
        if not heldout.labelled
        else "",
    )
    evaluation = evaluate(source, float_spec, engine, heldout)
    warnings = [
        w
        for w in (
            None
            if evaluation.teacher
            else suspicious(evaluation, source.classes, heldout, trained),
            small_heldout_warning(evaluation, opts.max_accuracy_drop),
        )
        if w is not None
    ]
    for warning in warnings:
        log.warning("edge-convert: warning: %s", warning)
    manifest = manifest.model_copy(
        update={"accuracy": _accuracy(opts, source, evaluation, len(flatbuffer))}
    )
    md_path, png_path = report_paths(output, name)
    report = _report_or_fail(opts, manifest, evaluation, output, name, warnings=warnings)
    staging.write(md_path, report.encode("utf-8"))
    staging.write(png_path, figure_png(manifest, evaluation))
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


def _accuracy(
    opts: QuantizeOptions, source: SourceModel, evaluation: Evaluation, size: int
) -> AccuracyReport:
    """The manifest's record of what the gate measured (agreement only, without labels)."""
    teacher = evaluation.teacher
    return AccuracyReport(
        heldout_samples=len(evaluation.labels),
        reference="float_model" if teacher else "labels",
        float_accuracy=None if teacher else evaluation.float_accuracy,
        quantized_accuracy=None if teacher else evaluation.quantized_accuracy,
        top1_agreement=evaluation.agreement,
        accuracy_drop_points=None if teacher else round(evaluation.drop_points, 4),
        float_size_bytes=size if opts.mode == "float32" else _float32_size(source),
        tflite_size_bytes=size,
        float_latency_ms=round(evaluation.float_latency_ms, 4),
        tflite_latency_ms=round(evaluation.tflite_latency_ms, 4),
    )


def _report_or_fail(
    opts: QuantizeOptions,
    manifest: ModelManifest,
    evaluation: Evaluation,
    output: Path,
    name: str,
    *,
    warnings: list[str],
) -> str:
    """The report's Markdown; when the gate fails, the report written where nothing loads it
    as a model, and :class:`GateFailedError`."""
    _, png_path = report_paths(output, name)
    count = len(evaluation.labels)
    report = markdown(manifest, evaluation, opts.max_accuracy_drop, png_path.name)
    for warning in warnings:
        report += f"\n**Warning:** {warning}\n"
    failed_md, failed_png = report_paths(output, f"{name}.failed")
    if evaluation.drop_points > opts.max_accuracy_drop:
        # The report of a failed conversion, under a name nothing loads as a model.
        write_atomic(failed_md, report.replace(png_path.name, failed_png.name).encode("utf-8"))
        write_atomic(failed_png, figure_png(manifest, evaluation))
        advice = gate_advice(opts.mode)
        lost = (
            f"changed the float model's answer on {evaluation.drop_points:.2f}% of "
            f"{count} unlabelled images (top-1 agreement "
            f"{evaluation.agreement * 100:.2f}%)"
            if evaluation.teacher
            else f"lost {evaluation.drop_points:.2f} accuracy points "
            f"({evaluation.float_accuracy * 100:.2f}% float, "
            f"{evaluation.quantized_accuracy * 100:.2f}% converted, on {count} held-out images)"
        )
        raise GateFailedError(
            f"{opts.mode} conversion {lost}, more than --max-accuracy-drop "
            f"{opts.max_accuracy_drop}: {advice}. No model was written; the report is "
            f"{failed_md}"
        )
    failed_md.unlink(missing_ok=True)  # an earlier failure's report no longer applies
    failed_png.unlink(missing_ok=True)
    return report


def _looks_like_probabilities(source: SourceModel, heldout: Dataset, spec: InputSpec) -> bool:
    out = source.predict(preprocess_batch(heldout.images[:32], spec).astype(np.float32))
    return bool(np.all(out >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def _float32_size(source: SourceModel) -> int:
    """Size of the plain float32 TFLite conversion, the yardstick for the others."""
    return len(convert(source, "float32", np.empty((0,), dtype=np.float32)))
