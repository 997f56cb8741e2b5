"""The one place that imports a TFLite interpreter, and loads hardware delegates.

The light runtimes come first so that a user who installed a runtime matched to their Edge
TPU library keeps it: ``tflite_runtime`` (the last release, 2.14, is what 32-bit ARM has),
then ``ai_edge_litert`` (its maintained successor), then TensorFlow's own ``tf.lite`` as a
last resort on a workstation. Imports happen when a model is loaded, never at import time.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import logging
import platform
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_daemon.errors import DelegateError, ModelError
from edge_daemon.flatbuffer import FlatbufferError, check_tflite

log = logging.getLogger(__name__)

RuntimeName = Literal["auto", "tflite_runtime", "ai_edge_litert", "tensorflow"]

#: Module that provides ``Interpreter`` and ``load_delegate``, for each runtime.
_MODULES: dict[str, str] = {
    "tflite_runtime": "tflite_runtime.interpreter",
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tensorflow": "tensorflow.lite",
}
_AUTO_ORDER = ("tflite_runtime", "ai_edge_litert", "tensorflow")
#: Files up to this size are checked structurally before a runtime reads them.
_CHECK_LIMIT = 512 * 1024 * 1024

_INSTALL_HINT = (
    "install a TFLite runtime: 'pip install ai-edge-litert' (x86_64, aarch64) or "
    "'pip install tflite-runtime==2.14.0 \"numpy<2\"' (32-bit ARM)"
)


@dataclass(frozen=True)
class Runtime:
    """An imported TFLite runtime: its name, interpreter class and delegate loader."""

    name: str
    interpreter_class: Callable[..., Any]
    load_delegate: Callable[..., Any]


def _import(name: str) -> Runtime:
    module = importlib.import_module(_MODULES[name])
    if name == "tensorflow":
        return Runtime(name, module.Interpreter, module.experimental.load_delegate)
    return Runtime(name, module.Interpreter, module.load_delegate)


def load_runtime(prefer: RuntimeName = "auto") -> Runtime:
    """Import a TFLite runtime: the one named, or the first that imports."""
    if prefer != "auto":
        try:
            return _import(prefer)
        except ImportError as exc:
            raise ModelError(
                f"the TFLite runtime {prefer!r} is not installed ({exc}): {_INSTALL_HINT}, "
                "or set EDGE_MODEL__RUNTIME=auto"
            ) from exc
    failures: list[str] = []
    for name in _AUTO_ORDER:
        try:
            runtime = _import(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        log.debug("TFLite runtime: %s", name)
        return runtime
    raise ModelError(
        f"no TFLite runtime could be imported ({'; '.join(failures)}): {_INSTALL_HINT}"
    )


def edgetpu_library() -> str:
    """The Edge TPU delegate library's file name on this operating system."""
    return {
        "Linux": "libedgetpu.so.1",
        "Darwin": "libedgetpu.1.dylib",
        "Windows": "edgetpu.dll",
    }.get(platform.system(), "libedgetpu.so.1")


def load_edgetpu_delegate(
    runtime: Runtime, device: str | None = None, library: str | None = None
) -> Any:
    """Load the Edge TPU delegate, turning the runtime's terse failure into what to check.

    ``device`` is ``usb``, ``usb:N``, ``pci``, ``pci:N`` or None for the first TPU found.
    """
    lib = library or edgetpu_library()
    options = {"device": device} if device else {}
    try:
        return runtime.load_delegate(lib, options)
    except (ValueError, OSError, RuntimeError) as exc:
        _drop_half_made_delegate(exc)
        where = f" {device}" if device else ""
        detail = str(exc).strip() or "no detail"
        raise DelegateError(
            f"cannot load the Edge TPU delegate from {lib}{where} ({detail}): "
            "check that the Coral is plugged in (USB 3 port, enough power) or its PCIe driver "
            "is loaded (/dev/apex_0), that the Edge TPU runtime (libedgetpu1-std) is "
            "installed, that this user is in the 'plugdev' (USB) or 'apex' (PCIe) group, and "
            "that the model was compiled with 'edge-convert quantize --edgetpu'; or set "
            "EDGE_MODEL__FALLBACK_PATH to a CPU model"
        ) from exc


def _drop_half_made_delegate(exc: BaseException) -> None:
    """Free, now and quietly, the delegate object the runtime left half made.

    When the library cannot be loaded, the runtime's ``Delegate.__init__`` fails before it sets
    ``_library``, and its ``__del__`` then fails on that missing attribute. Python reports that
    as "Exception ignored in ... Delegate.__del__" once the object is collected, which, with the
    failure's traceback keeping it alive, was after the daemon's one-line error. The traceback
    (what holds the object) is dropped here, with that one report silenced; any other goes to
    the hook as before."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        where = getattr(unraisable.object, "__qualname__", "")
        if not (isinstance(unraisable.exc_value, AttributeError) and where == "Delegate.__del__"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        exc.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = previous


#: Checks started early (:func:`probe_in_background`), by model path: the future gives the
#: digest of the bytes checked, the runtime's name, and the error found (None: loads fine).
_early: dict[str, Future[tuple[str, str, ModelError | None]]] = {}


def probe_in_background(model_path: Path, prefer: RuntimeName = "auto") -> None:
    """Start checking ``model_path`` in a child process now, on a thread of its own, while the
    daemon imports and wires everything else; :func:`make_interpreter` then waits for this
    outcome instead of checking the same bytes again. Anything wrong here (no file, no
    runtime) is left for the real load to report."""
    future: Future[tuple[str, str, ModelError | None]] = Future()
    _early[str(model_path)] = future

    def check() -> None:
        try:
            data = read_model(model_path)
            runtime = load_runtime(prefer)
            digest = hashlib.sha256(data).hexdigest()
            try:
                _probe_load(model_path, runtime, data)
            except ModelError as exc:
                future.set_result((digest, runtime.name, exc))
                return
            future.set_result((digest, runtime.name, None))
        except BaseException as exc:  # noqa: BLE001 - handed over, not lost
            future.set_exception(exc)

    threading.Thread(target=check, name="model-check", daemon=True).start()


def _probed_early(model_path: Path, runtime: Runtime, content: bytes) -> bool:
    """True when an early check of these very bytes on this runtime passed; raises what it
    found wrong. False when there was none (or it could not run): check now."""
    future = _early.pop(str(model_path), None)
    if future is None:
        return False
    try:
        digest, runtime_name, error = future.result(timeout=180)
    except Exception:  # noqa: BLE001 - the check is made again, here
        return False
    if runtime_name != runtime.name or digest != hashlib.sha256(content).hexdigest():
        return False
    if error is not None:
        raise error
    return True


#: The model check's child: it imports a runtime while it waits (the first of the light
#: ones that imports), then reads the name of the runtime to load with and the model's bytes.
#: Once the model has loaded it exits at once: the interpreter's teardown (unloading NumPy and
#: the runtime) took 25 of the 35 ms from the model's bytes to its exit here, and the daemon
#: waits for that exit before its first label. It has nothing to flush.
_CHECK_CODE = f"""\
import importlib, os, sys
for name in {[_MODULES[n] for n in _AUTO_ORDER[:2]]!r}:
    try:
        importlib.import_module(name)
        break
    except ImportError:
        pass
name = sys.stdin.buffer.readline().decode().strip()
if name:
    module = importlib.import_module(name)
    module.Interpreter(model_content=sys.stdin.buffer.read()).allocate_tensors()
    os._exit(0)
"""

#: A model check's child started ahead of need (:func:`start_checker`), not yet used.
_waiting: list[subprocess.Popen[bytes]] = []
_waiting_lock = threading.Lock()


def _spawn_checker() -> subprocess.Popen[bytes]:
    # A session of its own: a stop signalled to the daemon's process group (systemd, Ctrl-C)
    # must not kill it and so pass for a corrupt model.
    return subprocess.Popen(
        [sys.executable, "-c", _CHECK_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_checker() -> None:
    """Start the model check's child now, before this process imports its settings and the
    rest: its interpreter starts and imports a runtime on another core meanwhile, so the
    check itself (:func:`probe_in_background`) is quick. :func:`dismiss_checker` ends it if
    no check comes."""
    try:
        child = _spawn_checker()
    except OSError:
        return  # the check spawns its own later, and says so if it cannot
    with _waiting_lock:
        _waiting.append(child)


def dismiss_checker() -> None:
    """End a child from :func:`start_checker` that no check used; it exits on its own."""
    with _waiting_lock:
        children = list(_waiting)
        _waiting.clear()
    for child in children:
        _hand_over(child, b"\n")  # no runtime named: it exits
        threading.Thread(target=child.wait, name="model-check-exit", daemon=True).start()


def _hand_over(child: subprocess.Popen[bytes], data: bytes) -> None:
    try:
        assert child.stdin is not None
        child.stdin.write(data)
        child.stdin.close()
    except OSError:
        pass  # it has gone: its exit status says how


def _probe_load(model_path: Path, runtime: Runtime, content: bytes) -> None:
    """Load the model (the very bytes this process will load) once in a child process first.

    tflite-runtime 2.14 crashes on some truncated files instead of raising; a crash in the
    child becomes a clear error here, not a segmentation fault of the daemon. The child is the
    one :func:`start_checker` started, when there is one.
    """
    with _waiting_lock:
        child = _waiting.pop() if _waiting else None
    try:
        if child is None:
            child = _spawn_checker()
        child.communicate(_MODULES[runtime.name].encode() + b"\n" + content, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if child is not None:
            child.kill()
            child.wait()
        log.warning(
            "could not check %s in a child process (%s); loading it directly", model_path, exc
        )
        return
    if child.returncode < 0:
        raise ModelError(
            f"the {runtime.name} runtime crashed loading {model_path} "
            f"(signal {-child.returncode}): the file is truncated or corrupt; copy it again or "
            "re-convert it with 'edge-convert quantize'"
        )


def read_model(model_path: Path) -> bytes:
    """The bytes of a ``.tflite`` file, checked: it exists, is TFLite, and its FlatBuffer's
    offsets stay inside the file (a truncated file must not crash the runtime)."""
    if not model_path.is_file():
        raise ModelError(
            f"model file {model_path} does not exist: set EDGE_MODEL__PATH to a "
            ".tflite file, or run 'make model' to build the bundled one"
        )
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc.strerror}") from exc
    if data[4:8] != b"TFL3":
        raise ModelError(
            f"{model_path} is not a TFLite model (no TFL3 identifier): convert "
            "it with 'edge-convert quantize MODEL'"
        )
    if len(data) < _CHECK_LIMIT:
        try:
            check_tflite(data)
        except FlatbufferError as exc:
            raise ModelError(
                f"{model_path} is truncated or corrupt ({exc}): copy it again or re-convert it "
                "with 'edge-convert quantize'"
            ) from exc
    return data


def make_interpreter(
    model_path: Path,
    *,
    runtime: Runtime,
    content: bytes | None = None,
    num_threads: int | None = None,
    delegates: list[Any] | None = None,
    verify: bool = True,
) -> Any:
    """Create an interpreter for ``model_path`` with tensors allocated.

    ``content`` is the file's bytes as :func:`read_model` gave them (read here when not given):
    an engine that makes more interpreters later makes them from the same bytes, never from a
    file that may have been replaced meanwhile. ``verify`` loads the file in a child process
    first (a fraction of a second) so a corrupt file cannot crash this process; the converter,
    which has just written the file, skips it. The caller keeps ``content`` alive for as long
    as the interpreter: the runtime does not copy it.
    """
    data = read_model(model_path) if content is None else content
    if verify and not delegates and not _probed_early(model_path, runtime, data):
        _probe_load(model_path, runtime, data)
    try:
        interpreter = runtime.interpreter_class(
            model_content=data,
            num_threads=num_threads,
            experimental_delegates=delegates or None,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Didn't find op" in detail or "custom op" in detail:
            fix = (
                "the model needs ops this runtime lacks: install ai-edge-litert, or for an "
                "Edge TPU model set EDGE_MODEL__DELEGATE=edgetpu"
            )
        else:
            fix = "the file may be truncated; re-convert it with 'edge-convert quantize'"
        raise ModelError(
            f"the {runtime.name} runtime cannot load {model_path} ({detail}): {fix}"
        ) from exc
    return interpreter
