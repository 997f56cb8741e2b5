"""The conversion report: Markdown with the figures; a PNG of per-class accuracy and confusion."""

from __future__ import annotations

import io
import math
from pathlib import Path

from converter.evaluate import Evaluation
from edge_daemon.manifest import RESIZE_NAMES, ModelManifest


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.2f}%"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def markdown(
    manifest: ModelManifest, evaluation: Evaluation, max_drop: float, png_name: str
) -> str:
    """The report as Markdown."""
    acc = manifest.accuracy
    assert acc is not None
    float_pc, tflite_pc = evaluation.per_class(len(manifest.labels))
    verdict = "passed" if evaluation.drop_points <= max_drop else "FAILED"
    if evaluation.teacher:
        measured = [
            f"| top-1 agreement with the float model on {acc.heldout_samples} unlabelled "
            f"images | (reference) | {_pct(acc.top1_agreement)} |",
            f"| its 95% interval (Wilson) | | {_interval(evaluation.quantized_interval)} |",
        ]
        summary = (
            "No labels (teacher mode): the converted model was checked against the float "
            "model's own answers, so this measures agreement, not accuracy. Disagreement: "
            f"{evaluation.drop_points:.2f} points (gate: at most {max_drop:.2f}): **{verdict}**."
        )
    else:
        measured = [
            f"| accuracy on {acc.heldout_samples} held-out images "
            f"| {_pct(evaluation.float_accuracy)} | {_pct(evaluation.quantized_accuracy)} |",
            f"| its 95% interval (Wilson) | {_interval(evaluation.float_interval)} "
            f"| {_interval(evaluation.quantized_interval)} |",
        ]
        summary = (
            f"Top-1 agreement between the two: {_pct(acc.top1_agreement)}. "
            f"Accuracy drop: {evaluation.drop_points:.2f} points "
            f"(gate: at most {max_drop:.2f}): **{verdict}**."
        )
    lines = [
        f"# {manifest.name}: {manifest.quantization_mode} conversion report",
        "",
        f"Source `{manifest.source.name if manifest.source else '?'}` "
        f"(sha256 `{manifest.source.sha256[:16] if manifest.source else '?'}`), "
        f"converter {manifest.converter_version}, {manifest.created}.",
        "",
        "| figure | float (Keras) | converted (TFLite) |",
        "| --- | --- | --- |",
        *measured,
        f"| model size | {_size(acc.float_size_bytes)} | {_size(acc.tflite_size_bytes)} "
        f"({acc.tflite_size_bytes / max(acc.float_size_bytes, 1) * 100:.1f}% of float32) |",
        f"| mean latency per image, batch 1, this machine | {acc.float_latency_ms:.3f} ms "
        f"| {acc.tflite_latency_ms:.3f} ms |",
        "",
        summary,
        "",
        f"Input {manifest.input.height}x{manifest.input.width}x{manifest.input.channels} "
        f"{manifest.input.colour} {manifest.input.dtype}"
        + (
            f", quantisation scale {manifest.input.quantization.scale:.6g} zero point "
            f"{manifest.input.quantization.zero_point}"
            if manifest.input.quantization
            else ""
        )
        + f"; output {manifest.output.classes} {manifest.output.kind} {manifest.output.dtype}"
        + (
            f", scale {manifest.output.quantization.scale:.6g} zero point "
            f"{manifest.output.quantization.zero_point}"
            if manifest.output.quantization
            else ""
        )
        + f"; batch {'dynamic' if manifest.input.dynamic_batch else '1'}"
        + f"; larger crops shrunk by {RESIZE_NAMES[manifest.input.resize]}.",
        "",
        "## Per class",
        "",
    ]
    if evaluation.teacher:
        lines += [
            "| class, as the float model reads it | converted model agrees |",
            "| --- | --- |",
        ]
        lines += [
            f"| {lab} | {_pct(q)} |" for lab, q in zip(manifest.labels, tflite_pc, strict=True)
        ]
    else:
        lines += ["| class | float | converted |", "| --- | --- | --- |"]
        lines += [
            f"| {label} | {_pct(f_acc)} | {_pct(q_acc)} |"
            for label, f_acc, q_acc in zip(manifest.labels, float_pc, tflite_pc, strict=True)
        ]
    lines += ["", f"![per-class accuracy and confusion matrix]({png_name})", ""]
    return "\n".join(lines)


def _interval(bounds: tuple[float, float]) -> str:
    return f"{bounds[0] * 100:.1f}% to {bounds[1] * 100:.1f}%"


def figure_png(manifest: ModelManifest, evaluation: Evaluation) -> bytes:
    """Per-class accuracy (float against converted) and the converted model's confusion matrix."""
    import matplotlib as mpl  # noqa: PLC0415 - plotting loads only for reports

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = list(manifest.labels)
    n = len(labels)
    float_pc, tflite_pc = evaluation.per_class(n)
    fig, (bars, conf) = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    xs = range(n)
    bars.bar([x - 0.2 for x in xs], [v * 100 for v in float_pc], width=0.4, label="float")
    bars.bar(
        [x + 0.2 for x in xs],
        [v * 100 for v in tflite_pc],
        width=0.4,
        label=manifest.quantization_mode,
    )
    bars.set_xticks(list(xs), labels, rotation=45 if n > 12 else 0)
    bars.set_ylim(0, 105)
    teacher = evaluation.teacher
    bars.set_ylabel("agreement with the float model (%)" if teacher else "held-out accuracy (%)")
    bars.set_title(
        "Per class, as the float model reads it (no labels)" if teacher else "Per-class accuracy"
    )
    bars.legend(loc="lower right")
    matrix = evaluation.confusion(n)
    image = conf.imshow(matrix, cmap="Blues")
    conf.set_xticks(list(xs), labels, rotation=45 if n > 12 else 0)
    conf.set_yticks(list(xs), labels)
    conf.set_xlabel("predicted")
    conf.set_ylabel("float model's answer" if teacher else "true")
    conf.set_title(f"Confusion matrix ({manifest.quantization_mode})")
    if n <= 20:
        top = matrix.max(initial=1)
        for (row, col), value in _cells(matrix):
            conf.text(
                col,
                row,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > top / 2 else "black",
            )
    fig.colorbar(image, ax=conf)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _cells(matrix: object) -> list[tuple[tuple[int, int], int]]:
    import numpy as np  # noqa: PLC0415

    array = np.asarray(matrix)
    return [((int(r), int(c)), int(array[r, c])) for r, c in np.ndindex(*array.shape)]


def report_paths(output: Path, name: str) -> tuple[Path, Path]:
    """Where the Markdown and PNG reports go."""
    return output / f"{name}.report.md", output / f"{name}.report.png"
