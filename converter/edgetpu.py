"""Edge TPU: which ops of a model can map to it, and running and reading ``edgetpu_compiler``."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import BadInputError, GateFailedError, ToolMissingError
from edge_daemon.runtime import load_runtime, make_interpreter

#: Ops the Edge TPU runs, from Coral's documented table ("TensorFlow models on the Edge TPU",
#: supported operations), in TFLite builtin names. Each also needs 8-bit quantised tensors.
SUPPORTED_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "HARD_SWISH",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
    }
)
_EIGHT_BIT = {np.dtype(np.uint8), np.dtype(np.int8)}
# Bias and shape tensors of quantised ops are 32-bit integers; they do not stop mapping.
_ALLOWED_EXTRA = {np.dtype(np.int32)}

INSTALL_COMPILER = (
    "edgetpu_compiler is not on PATH: on an x86-64 Debian or Ubuntu machine add Coral's "
    "apt repository (https://coral.ai/docs/edgetpu/compiler/) and run "
    "'sudo apt-get install edgetpu-compiler', then run: edgetpu_compiler -s -o {out} {model}"
)


@dataclass(frozen=True)
class OpCheck:
    """One op of a model and whether the Edge TPU can run it."""

    index: int
    name: str
    supported: bool
    reason: str


def check_ops(model_path: Path) -> list[OpCheck]:
    """Every op of a TFLite model, each with whether the Edge TPU supports it and why not."""
    runtime = load_runtime()
    interpreter = _plain_interpreter(model_path, runtime)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    checks = []
    for op in interpreter._get_ops_details():
        name = str(op["op_name"])
        if name == "DELEGATE":
            continue  # a node the CPU delegate added, not an op of the model
        shapes = [tensors[i] for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        dtypes = {np.dtype(t["dtype"]) for t in shapes}
        if name not in SUPPORTED_OPS:
            checks.append(OpCheck(op["index"], name, False, "not in the Edge TPU's op table"))
        elif not dtypes <= _EIGHT_BIT | _ALLOWED_EXTRA:
            kinds = ", ".join(sorted(d.name for d in dtypes))
            checks.append(
                OpCheck(
                    op["index"],
                    name,
                    False,
                    f"tensors are {kinds}, not 8-bit quantised (convert with --mode int8)",
                )
            )
        elif not dtypes & _EIGHT_BIT:
            checks.append(
                OpCheck(
                    op["index"],
                    name,
                    False,
                    "computes on int32 shapes, which a dynamic batch adds (convert with --edgetpu)",
                )
            )
        elif any(_dynamic(t) for t in shapes):
            checks.append(
                OpCheck(
                    op["index"], name, False, "a tensor has a dynamic size (convert with --edgetpu)"
                )
            )
        else:
            checks.append(OpCheck(op["index"], name, True, "supported"))
    return checks


def _dynamic(tensor: dict[str, Any]) -> bool:
    signature = tensor.get("shape_signature")
    return signature is not None and bool(np.any(np.asarray(signature) < 0))


def _plain_interpreter(model_path: Path, runtime: Any) -> Any:
    """An interpreter without the default CPU delegate, so the op list is the model's own."""
    module = __import__(runtime.interpreter_class.__module__, fromlist=["OpResolverType"])
    resolver = getattr(module, "OpResolverType", None)
    if resolver is not None:
        interpreter = runtime.interpreter_class(
            model_path=str(model_path),
            experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
        return interpreter
    return make_interpreter(model_path, runtime=runtime)


@dataclass(frozen=True)
class CompileResult:
    """What ``edgetpu_compiler`` made and said."""

    model_path: Path
    log: str
    ops_on_tpu: int
    ops_on_cpu: int
    subgraphs: int
    cpu_ops: tuple[str, ...]


_OP_LINE = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]+)\s+(?P<count>\d+)\s+(?P<status>\S.*)$")


def parse_compiler_log(text: str) -> tuple[int, int, int, tuple[str, ...]]:
    """(ops on the TPU, ops on the CPU, Edge TPU subgraphs, descriptions of CPU ops)."""
    on_tpu = on_cpu = 0
    cpu_ops = []
    for line in text.splitlines():
        match = _OP_LINE.match(line.strip())
        if not match:
            continue
        count, status = int(match["count"]), match["status"].strip()
        if status.startswith("Mapped to Edge TPU"):
            on_tpu += count
        else:
            on_cpu += count
            cpu_ops.append(f"{match['op']} x{count}: {status}")
    subgraphs = 1
    found = re.search(r"Number of Edge TPU subgraphs:\s*(\d+)", text)
    if found:
        subgraphs = int(found[1])
    cpu_total = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    if cpu_total:
        on_cpu = int(cpu_total[1])
    tpu_total = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    if tpu_total:
        on_tpu = int(tpu_total[1])
    return on_tpu, on_cpu, subgraphs, tuple(cpu_ops)


def compile_model(
    model_path: Path,
    out_dir: Path,
    *,
    allow_cpu_ops: bool = False,
    compiler: str = "edgetpu_compiler",
) -> CompileResult:
    """Run the Edge TPU compiler and fail unless the whole model maps to one TPU subgraph."""
    exe = shutil.which(compiler)
    if exe is None:
        raise ToolMissingError(INSTALL_COMPILER.format(out=out_dir, model=model_path))
    proc = subprocess.run(
        [exe, "-s", "-o", str(out_dir), str(model_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}"
        raise BadInputError(f"edgetpu_compiler failed on {model_path}: {last}")
    compiled = out_dir / f"{model_path.stem}_edgetpu.tflite"
    on_tpu, on_cpu, subgraphs, cpu_ops = parse_compiler_log(text)
    result = CompileResult(compiled, text, on_tpu, on_cpu, subgraphs, cpu_ops)
    if not allow_cpu_ops and (on_cpu > 0 or subgraphs > 1):
        compiled.unlink(missing_ok=True)
        detail = "; ".join(cpu_ops) or f"{subgraphs} Edge TPU subgraphs"
        raise GateFailedError(
            f"{on_cpu} op(s) would run on the CPU and the model splits into "
            f"{subgraphs} subgraph(s) ({detail}): change those ops, or pass "
            "--allow-cpu-ops to accept a partly mapped model"
        )
    return result
