"""``edge-convert``: train, quantise, report and check models for edge-daemon.

Exit codes: 0 done; 1 unexpected failure; 2 bad command line; 3 a check failed (accuracy
drop over the limit, ops that stay off the Edge TPU); 65 unusable input (not a model, an
empty dataset, labels that do not fit); 66 an input that does not exist; 69 a tool that is
not installed; 78 a model or manifest the daemon could not use.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from converter import __version__
from converter.errors import GateFailedError, InputMissingError
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.fields import fraction
from edge_daemon.manifest import ResizeMethod

log = logging.getLogger("edge_convert")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-convert",
        description="Train, quantise and check TFLite image classifiers for edge-daemon.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log everything, TensorFlow included, and show tracebacks",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train the reference CNN, or MobileNetV2 transfer learning, on a dataset"
    )
    train.add_argument(
        "--dataset",
        default="digits",
        help="'digits', a folder with a sub-folder per class, or an .npz with "
        "x and y (default: digits)",
    )
    train.add_argument(
        "--output",
        type=Path,
        default=Path("build/model"),
        help="folder for NAME.keras, labels.txt, NAME.train.json (default: build/model)",
    )
    train.add_argument("--name", help="model name (default: the dataset's name)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument(
        "--input-size",
        type=int,
        help="the model's square input size in pixels (default: 28; 96 for mobilenetv2)",
    )
    train.add_argument(
        "--arch",
        choices=("cnn", "mobilenetv2"),
        default="cnn",
        help="cnn: the reference CNN, tiny and fast on a Pi; mobilenetv2: transfer learning "
        "for real scenes (default: cnn)",
    )
    train.add_argument(
        "--alpha", type=float, default=0.35, help="MobileNetV2 width: 0.35, 0.5, 0.75, 1.0"
    )
    train.add_argument(
        "--weights",
        default="imagenet",
        help="MobileNetV2 base weights: imagenet (Keras downloads them once), none, or a "
        ".weights.h5 file (default: imagenet)",
    )
    train.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=0,
        help="after the head, train the top of the MobileNetV2 base this many epochs (0)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    _resize_option(train, "area")
    train.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of the dataset held out for evaluation (default: 0.2)",
    )
    train.add_argument(
        "--augment",
        type=int,
        default=2,
        metavar="COPIES",
        help="add this many camera-like copies of each training image (shifted, turned, "
        "brighter or darker, noisy, blurred) (default: 2; 0 turns it off)",
    )

    quant = sub.add_parser("quantize", help="convert a Keras model to TFLite and check accuracy")
    quant.add_argument("model", type=Path, help="a .keras or .h5 file or a SavedModel folder")
    quant.add_argument(
        "--mode",
        choices=("int8", "float16", "dynamic", "float32"),
        default="int8",
        help="quantisation (default: int8, full integer)",
    )
    quant.add_argument("--output", type=Path, help="output folder (default: the model's)")
    quant.add_argument("--name", help="output name (default: the model's)")
    quant.add_argument(
        "--dataset",
        help="calibration and evaluation data (default: the one "
        "in the training record beside the model)",
    )
    quant.add_argument(
        "--labels",
        type=Path,
        help="labels file (default: labels.txt beside the model, else the dataset's class names)",
    )
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="held-out share when the model has no training record",
    )
    quant.add_argument("--calibration-samples", type=int, default=200)
    quant.add_argument(
        "--io-type",
        choices=("uint8", "int8"),
        default="uint8",
        help="input and output type of an int8 model (default: uint8)",
    )
    quant.add_argument(
        "--max-accuracy-drop",
        type=_points,
        default=1.0,
        metavar="POINTS",
        help="fail, writing no model (only NAME.failed.report.md), when accuracy drops by "
        "more (default: 1.0)",
    )
    quant.add_argument(
        "--edgetpu",
        action="store_true",
        help="full integer, uint8, batch 1, then compile with edgetpu_compiler",
    )
    quant.add_argument(
        "--allow-cpu-ops",
        action="store_true",
        help="accept an Edge TPU model that leaves ops on the CPU",
    )
    quant.add_argument(
        "--colour",
        choices=("gray", "rgb", "bgr"),
        help="the model's colour order (default: from the training record)",
    )
    quant.add_argument(
        "--scale", type=_number, help="input = pixel * SCALE + OFFSET (e.g. 1/127.5)"
    )
    quant.add_argument("--offset", type=_number, help="e.g. -1 with --scale 1/127.5")
    _resize_option(quant, None)

    report = sub.add_parser("report", help="print a converted model's report")
    report.add_argument("manifest", type=Path, help="NAME.json or NAME.tflite")

    clip = sub.add_parser("sample-clip", help="render the daemon's sample clip of held-out digits")
    clip.add_argument(
        "--model-dir",
        type=Path,
        default=Path("edge_daemon/models"),
        help="folder with the trained model's NAME.train.json (default: edge_daemon/models)",
    )
    clip.add_argument(
        "--output",
        type=Path,
        default=Path("edge_daemon/samples/digits.mp4"),
        help="the video to write; its sidecar NAME.json goes beside it",
    )

    label = sub.add_parser(
        "label", help="a local web page to sort crops into one sub-folder per class"
    )
    label.add_argument("dir", type=Path, help="a folder of crops (edge-daemon collect's)")
    label.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    label.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    check = sub.add_parser(
        "check-edgetpu", help="list a model's ops and whether the Edge TPU supports each"
    )
    check.add_argument("model", type=Path, help="a .tflite file")
    return parser


def _number(text: str) -> float:
    """A finite number, or a fraction such as ``1/127.5``."""
    try:
        value = float(fraction(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("give a finite number or a fraction such as 1/127.5")
    return value


def _resize_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--resize``: written to the manifest, so the daemon shrinks crops as training did."""
    parser.add_argument(
        "--resize",
        choices=get_args(ResizeMethod),
        default=default,
        help="how images larger than the model's input are shrunk, in training and evaluation "
        "and by the daemon: area (averaging) or bilinear (OpenCV's and TensorFlow's default, "
        "as Keras' image_dataset_from_directory trains) (default: "
        + (default or "from the training record, else area")
        + ")",
    )


def _points(text: str) -> float:
    """Accuracy points from 0 to 100."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("give points from 0 to 100")
    return value


def _setup_logging(debug: bool) -> None:
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
    )
    if not debug:
        for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _train(args: argparse.Namespace) -> int:
    from converter.datasets import load_dataset  # noqa: PLC0415 - TensorFlow loads on demand
    from converter.train import train  # noqa: PLC0415

    dataset = load_dataset(args.dataset)
    name = args.name or dataset.name
    result = train(
        dataset,
        args.dataset,
        args.output,
        name,
        epochs=args.epochs,
        input_size=args.input_size or (96 if args.arch == "mobilenetv2" else 28),
        seed=args.seed,
        holdout=args.holdout,
        augment_copies=args.augment,
        arch=args.arch,
        alpha=args.alpha,
        weights=args.weights,
        fine_tune_epochs=args.fine_tune_epochs,
        resize=args.resize,
    )
    print(
        f"trained {result.model_path} ({result.epochs} epochs, training accuracy "
        f"{result.train_accuracy * 100:.2f}%); labels {result.labels_path}; held-out split "
        f"in {result.record_path}"
    )
    print(f"next: edge-convert quantize {result.model_path}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from converter.workflow import QuantizeOptions, quantize  # noqa: PLC0415

    opts = QuantizeOptions(
        model=args.model,
        mode=args.mode,
        output=args.output,
        name=args.name,
        dataset=args.dataset,
        labels=args.labels,
        seed=args.seed,
        holdout=args.holdout,
        calibration_samples=args.calibration_samples,
        io_type=args.io_type,
        max_accuracy_drop=args.max_accuracy_drop,
        edgetpu=args.edgetpu,
        allow_cpu_ops=args.allow_cpu_ops,
        colour=args.colour,
        resize=args.resize,
        scale=args.scale,
        offset=args.offset,
    )
    result = quantize(opts)
    acc = result.manifest.accuracy
    assert acc is not None
    low_f, high_f = result.evaluation.float_interval
    low_q, high_q = result.evaluation.quantized_interval
    if acc.float_accuracy is None or acc.quantized_accuracy is None:
        print(
            f"{result.manifest.quantization_mode}: top-1 agreement "
            f"{acc.top1_agreement * 100:.2f}% (95% interval {low_q * 100:.1f}-"
            f"{high_q * 100:.1f}) with the float model on {acc.heldout_samples} unlabelled "
            f"held-out images (gate {opts.max_accuracy_drop} points of disagreement); no "
            "labels, so no accuracy was measured"
        )
    else:
        print(
            f"{result.manifest.quantization_mode}: accuracy {acc.float_accuracy * 100:.2f}% "
            f"float (95% interval {low_f * 100:.1f}-{high_f * 100:.1f}) -> "
            f"{acc.quantized_accuracy * 100:.2f}% converted ({low_q * 100:.1f}-"
            f"{high_q * 100:.1f}); {result.evaluation.drop_points:.2f} points lost (gate "
            f"{opts.max_accuracy_drop}) on {acc.heldout_samples} held-out images; top-1 "
            f"agreement {acc.top1_agreement * 100:.2f}%"
        )
    print(
        f"size {acc.tflite_size_bytes / 1024:.1f} KiB "
        f"({acc.tflite_size_bytes / acc.float_size_bytes * 100:.1f}% of float32 "
        f"{acc.float_size_bytes / 1024:.1f} KiB); latency {acc.tflite_latency_ms:.3f} ms/image "
        f"(float {acc.float_latency_ms:.3f} ms)"
    )
    for path in result.written:
        print(f"wrote {path}")
    if result.edgetpu_note:
        print(f"edge-convert: warning: {result.edgetpu_note}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    path: Path = args.manifest
    if path.suffix == ".tflite":
        path = path.with_suffix(".json")
    report = path.with_name(f"{path.stem}.report.md")
    if not path.is_file():
        raise InputMissingError(
            f"{path} does not exist: give the NAME.json that 'edge-convert quantize' wrote"
        )
    if not report.is_file():
        raise InputMissingError(
            f"no report {report} beside {path}: run 'edge-convert quantize' again to write it"
        )
    print(report.read_text(encoding="utf-8"), end="")
    print(f"\n(figure: {report.with_suffix('').with_suffix('.report.png')})")
    return 0


def _check_edgetpu(args: argparse.Namespace) -> int:
    from converter.edgetpu import check_ops  # noqa: PLC0415

    if not args.model.is_file():
        raise InputMissingError(f"model {args.model} does not exist: give a .tflite file")
    checks = check_ops(args.model)
    width = max((len(c.name) for c in checks), default=4)
    for check in checks:
        mark = "yes" if check.supported else "NO "
        print(f"{check.index:4d}  {check.name:<{width}}  {mark}  {check.reason}")
    unsupported = [c for c in checks if not c.supported]
    print(f"{len(checks) - len(unsupported)} of {len(checks)} ops can run on the Edge TPU")
    if unsupported:
        first = unsupported[0]
        raise GateFailedError(
            f"{len(unsupported)} op(s) cannot run on the Edge TPU, the first is "
            f"{first.name} (op {first.index}): {first.reason}; the compiler maps "
            "ops up to the first unsupported one and leaves the rest to the CPU"
        )
    return 0


def _sample_clip(args: argparse.Namespace) -> int:
    from converter.clip import make_clip  # noqa: PLC0415

    path = make_clip(args.model_dir, args.output)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _label(args: argparse.Namespace) -> int:
    from converter.label import serve  # noqa: PLC0415

    if not 0 <= args.port <= 65535:
        raise InputMissingError(f"--port {args.port}: give a port from 0 to 65535")
    try:
        server = serve(args.dir, args.host, args.port)
    except OSError as exc:
        raise InputMissingError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror}): give another --port"
        ) from exc
    if args.host not in ("127.0.0.1", "localhost"):
        log.warning(
            "edge-convert: warning: listening on %s: anyone who can reach it can sort your files",
            args.host,
        )
    port = server.server_address[1]
    print(f"sorting {args.dir}: open http://{args.host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


_COMMANDS = {
    "train": _train,
    "sample-clip": _sample_clip,
    "quantize": _quantize,
    "report": _report,
    "check-edgetpu": _check_edgetpu,
    "label": _label,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edge-convert``; returns the exit code."""
    args = _parser().parse_args(argv)
    _setup_logging(args.debug)
    try:
        return _COMMANDS[args.command](args)
    except EdgeDaemonError as exc:
        if args.debug:
            log.exception("edge-convert failed")
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-convert: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            log.exception("edge-convert failed")
        print(
            f"edge-convert: unexpected error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
