"""The daemon's model runtime: loading, batching and predictions, on whichever runtime is installed.

These run in both environments (ai-edge-litert with NumPy 2; tflite-runtime 2.14 with NumPy 1).
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_daemon import runtime as runtime_module
from edge_daemon.engine import MAX_INTERPRETERS, Engine, model_summary
from edge_daemon.errors import DelegateError, ModelError
from edge_daemon.manifest import ModelManifest, read_manifest
from edge_daemon.preprocess import preprocess_batch
from edge_daemon.runtime import load_edgetpu_delegate, load_runtime
from tests.conftest import ZOO_MODES, Zoo

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("mode", ZOO_MODES)
def test_every_mode_predicts_what_the_converter_measured(zoo: Zoo, mode: str) -> None:
    engine = Engine.from_path(zoo.model(mode))
    assert engine.manifest is not None
    scores = engine.classify(list(zoo.heldout_images))
    predicted = np.argmax(scores, axis=1)
    # The converter evaluated this file with ai-edge-litert; any runtime must give the same
    # top-1 class on (nearly) every image.
    agreement = float(np.mean(predicted == zoo.expected(mode)))
    assert agreement >= 0.99, f"{mode}: only {agreement:.3f} agreement with the converter"
    accuracy = float(np.mean(predicted == zoo.heldout_labels))
    assert engine.manifest.accuracy is not None
    assert accuracy == pytest.approx(engine.manifest.accuracy.quantized_accuracy, abs=0.01)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=0.05)


def test_dynamic_batch_keeps_one_interpreter_per_size(zoo: Zoo) -> None:
    engine = Engine.from_path(zoo.model("int8"))
    assert engine.input_spec.dynamic_batch
    images = list(zoo.heldout_images[:8])
    single = np.concatenate([engine.classify(images[i : i + 1]) for i in range(8)])
    batched = engine.classify(images)
    assert engine.resizes == 1  # batch 1 was the loaded size; 8 made once
    # Alternating sizes (3 and 5, 2,000 times) resized 2,000 times before: now twice in all.
    for i in range(2000):
        engine.classify(images[: 3 if i % 2 else 5])
    assert engine.resizes == 3
    again = engine.classify(images)
    # Batching must not change any result.
    np.testing.assert_allclose(batched, single, atol=1e-6)
    np.testing.assert_array_equal(batched, again)
    # Preprocessing straight into the interpreter's input gives what a separate batch gives.
    spec = engine.input_spec
    np.testing.assert_array_equal(
        np.argmax(engine.scores(preprocess_batch(images, spec)), axis=1),
        np.argmax(batched, axis=1),
    )


def test_more_batch_sizes_than_kept_interpreters_still_run(zoo: Zoo) -> None:
    engine = Engine.from_path(zoo.model("float32"))
    images = list(zoo.heldout_images[:12])
    reference = engine.classify(images)
    for size in range(1, 13):  # 12 sizes, more than MAX_INTERPRETERS
        np.testing.assert_allclose(engine.classify(images[:size]), reference[:size], atol=1e-5)
    assert len(engine._interpreters) <= MAX_INTERPRETERS


def test_fixed_batch_model_runs_element_by_element(zoo: Zoo) -> None:
    engine = Engine.from_path(zoo.model("edgetpu"))
    assert not engine.input_spec.dynamic_batch
    images = list(zoo.heldout_images[:5])
    scores = engine.classify(images)
    assert scores.shape == (5, 10)
    np.testing.assert_array_equal(np.argmax(scores, axis=1), zoo.expected("edgetpu")[:5])


def test_bundled_model_meets_its_targets(bundled_model: Path) -> None:
    manifest = read_manifest(bundled_model.with_suffix(".json"))
    assert manifest.quantization_mode == "int8"
    acc = manifest.accuracy
    assert acc is not None
    assert acc.reference == "labels"
    assert acc.quantized_accuracy is not None
    assert acc.quantized_accuracy >= 0.95
    assert acc.accuracy_drop_points is not None
    assert acc.accuracy_drop_points <= 1.0
    assert acc.tflite_size_bytes <= 0.30 * acc.float_size_bytes
    assert bundled_model.stat().st_size == acc.tflite_size_bytes
    engine = Engine.from_path(bundled_model)
    assert engine.labels == tuple(str(i) for i in range(10))


def test_third_party_model_without_manifest_runs_from_tensors(zoo: Zoo, tmp_path: Path) -> None:
    bare = tmp_path / "bare.tflite"
    shutil.copy(zoo.model("int8"), bare)
    engine = Engine.from_path(bare, colour="gray")
    assert engine.manifest is None
    spec = engine.input_spec
    assert (spec.height, spec.width, spec.channels, spec.dtype) == (16, 16, 1, "uint8")
    assert spec.quantization is not None
    assert engine.labels == tuple(str(i) for i in range(10))
    # Raw uint8 pixels at scale 1/255 match what the manifest says for this model.
    predicted = np.argmax(engine.classify(list(zoo.heldout_images)), axis=1)
    assert float(np.mean(predicted == zoo.expected("int8"))) >= 0.99


def test_labels_file_beside_a_bare_model_is_used_and_checked(zoo: Zoo, tmp_path: Path) -> None:
    bare = tmp_path / "bare.tflite"
    shutil.copy(zoo.model("float32"), bare)
    (tmp_path / "labels.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    assert Engine.from_path(bare).labels[3] == "digit 3"
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(ModelError, match="3 labels for the 10 outputs"):
        Engine.from_path(bare)


def test_missing_truncated_and_foreign_model_files(zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Engine.from_path(tmp_path / "nope.tflite")
    not_tflite = tmp_path / "photo.tflite"
    not_tflite.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ModelError, match="not a TFLite model"):
        Engine.from_path(not_tflite)
    # Cut at several places: every runtime must refuse each with an error, never crash
    # (tflite-runtime 2.14 segfaults on some of these when loaded in-process).
    data = zoo.model("int8").read_bytes()
    for size in (64, 4096, len(data) // 2, len(data) - 100):
        truncated = tmp_path / f"cut{size}.tflite"
        truncated.write_bytes(data[:size])
        with pytest.raises(ModelError, match="is truncated or corrupt"):
            Engine.from_path(truncated)


def test_model_that_does_not_fit_its_manifest(zoo: Zoo, tmp_path: Path) -> None:
    shutil.copy(zoo.model("int8"), tmp_path / "small.tflite")
    manifest = json.loads(zoo.model("int8").with_suffix(".json").read_text())
    manifest["input"]["height"] = manifest["input"]["width"] = 32
    (tmp_path / "small.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"does not fit its manifest: input shape \[16, 16, 1\]"):
        Engine.from_path(tmp_path / "small.tflite")


def test_broken_manifest_is_one_clear_line(zoo: Zoo, tmp_path: Path) -> None:
    shutil.copy(zoo.model("int8"), tmp_path / "small.tflite")
    manifest = json.loads(zoo.model("int8").with_suffix(".json").read_text())
    manifest["labels"] = ["only", "three", "labels"]
    (tmp_path / "small.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError) as info:
        Engine.from_path(tmp_path / "small.tflite")
    assert "3 labels for 10 model outputs" in str(info.value)
    assert "\n" not in str(info.value)
    (tmp_path / "small.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid"):
        Engine.from_path(tmp_path / "small.tflite")


def test_manifest_round_trips(zoo: Zoo) -> None:
    text = zoo.model("int8").with_suffix(".json").read_text()
    manifest = ModelManifest.model_validate_json(text)
    assert ModelManifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_forcing_a_runtime_that_is_not_installed_says_how_to_install() -> None:
    installed = load_runtime().name
    missing = "ai_edge_litert" if installed == "tflite_runtime" else "tflite_runtime"
    with pytest.raises(ModelError, match="pip install"):
        load_runtime(missing)  # type: ignore[arg-type]


def test_edgetpu_delegate_failure_says_what_to_check(tmp_path: Path) -> None:
    runtime = load_runtime()
    with pytest.raises(DelegateError) as info:
        load_edgetpu_delegate(runtime, "usb:0", str(tmp_path / "libedgetpu.so.1"))
    message = str(info.value)
    assert "usb:0" in message
    assert "plugdev" in message
    assert "EDGE_MODEL__FALLBACK_PATH" in message


def test_a_delegate_that_fails_to_load_leaves_nothing_to_report_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's half-made delegate fails in ``__del__`` ("Exception ignored in ...") when
    collected: that happens before the one-line error, silently, and nothing else is hidden."""
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    runtime = load_runtime()
    with pytest.raises(DelegateError) as info:
        load_edgetpu_delegate(runtime, None, str(tmp_path / "libedgetpu.so.1"))
    del info
    gc.collect()
    assert reported == []
    assert sys.unraisablehook == reported.append  # the hook is put back

    class Broken:
        def __del__(self) -> None:
            raise AttributeError("not the delegate's")

    Broken()
    assert [type(r.exc_value) for r in reported] == [AttributeError]


def test_importing_the_daemon_and_running_a_model_never_imports_tensorflow(
    bundled_model: Path,
) -> None:
    code = (
        "import sys, numpy as np\n"
        "import edge_daemon, edge_daemon.engine, edge_daemon.manifest, edge_daemon.runtime\n"
        "from pathlib import Path\n"
        f"e = edge_daemon.engine.Engine.from_path(Path({str(bundled_model)!r}))\n"
        "e.classify([np.zeros((8, 8), np.uint8)])\n"
        "print(e.runtime.name)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "assert 'keras' not in sys.modules, 'keras was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in {"tflite_runtime", "ai_edge_litert"}


def test_every_truncation_is_refused_before_a_runtime_reads_it(zoo: Zoo, tmp_path: Path) -> None:
    """tflite-runtime 2.14 crashes by chance on truncated files, so none may reach it."""
    data = zoo.model("int8").read_bytes()
    cut = tmp_path / "cut.tflite"
    for size in range(8, len(data), len(data) // 97):
        cut.write_bytes(data[:size])
        with pytest.raises(ModelError, match="is truncated or corrupt"):
            Engine.from_path(cut)


def test_new_batch_sizes_use_the_bytes_loaded_not_a_replaced_file(zoo: Zoo, tmp_path: Path) -> None:
    model = tmp_path / "small.tflite"
    shutil.copy(zoo.model("int8"), model)
    shutil.copy(zoo.model("int8").with_suffix(".json"), model.with_suffix(".json"))
    engine = Engine.from_path(model)
    images = list(zoo.heldout_images[:3])
    single = np.concatenate([engine.classify(images[i : i + 1]) for i in range(3)])
    model.write_bytes(b"\0" * 64)  # half-copied, or another model: not what was loaded
    np.testing.assert_allclose(engine.classify(images), single, atol=1e-6)


def test_a_manifest_that_says_dynamic_batch_for_a_fixed_model_is_refused(
    zoo: Zoo, tmp_path: Path
) -> None:
    model = tmp_path / "tpu.tflite"
    shutil.copy(zoo.model("edgetpu"), model)
    manifest = json.loads(zoo.model("edgetpu").with_suffix(".json").read_text())
    manifest["input"]["dynamic_batch"] = True
    model.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="batch is dynamic"):
        Engine.from_path(model)


def test_the_model_check_runs_in_the_child_started_ahead(zoo: Zoo) -> None:
    path = zoo.model("int8")
    runtime_module.start_checker()
    assert len(runtime_module._waiting) == 1
    child = runtime_module._waiting[0]
    runtime_module._probe_load(path, load_runtime(), path.read_bytes())
    assert not runtime_module._waiting  # taken, not spawned anew
    assert child.returncode == 0  # it loaded the model and exited


def test_a_crash_in_the_model_check_is_one_clear_error(
    zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Which real file crashes a runtime changes with its version: the child crashes as one
    # would, after reading what it was given.
    crash = "import os, sys\nsys.stdin.buffer.read()\nos.kill(os.getpid(), 11)\n"
    monkeypatch.setattr(runtime_module, "_CHECK_CODE", crash)
    path = zoo.model("int8")
    for ahead in (True, False):
        if ahead:
            runtime_module.start_checker()
        with pytest.raises(ModelError, match=r"runtime crashed loading .* \(signal 11\)"):
            runtime_module._probe_load(path, load_runtime(), path.read_bytes())
        assert not runtime_module._waiting


def test_a_model_check_child_that_no_check_uses_is_ended() -> None:
    runtime_module.start_checker()
    child = runtime_module._waiting[0]
    runtime_module.dismiss_checker()
    assert not runtime_module._waiting
    assert child.wait(timeout=60) == 0


def test_a_model_shrinks_crops_as_its_manifest_says_it_was_trained(
    zoo: Zoo, tmp_path: Path
) -> None:
    """``input.resize``: area averaging unless the manifest (or, without one, the settings)
    says bilinear; a manifest that does not say stays readable by older daemons."""
    manifest = read_manifest(zoo.model("int8").with_suffix(".json"))
    assert manifest.input.resize == "area"
    assert "resize" not in json.loads(manifest.to_bytes())["input"]
    bilinear = manifest.model_copy(
        update={"input": manifest.input.model_copy(update={"resize": "bilinear"})}
    )
    assert json.loads(bilinear.to_bytes())["input"]["resize"] == "bilinear"
    shutil.copy(zoo.model("int8"), tmp_path / "small.tflite")
    (tmp_path / "small.json").write_bytes(bilinear.to_bytes())
    engine = Engine.from_path(tmp_path / "small.tflite")
    assert engine.input_spec.resize == "bilinear"
    assert "shrunk by bilinear sampling" in model_summary(engine)
    # Crops of one size, several at once: each sampled alone, as OpenCV's default resize.
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (61, 83), dtype=np.uint8) for _ in range(4)]
    sampled = [cv2.resize(c, (16, 16), interpolation=cv2.INTER_LINEAR)[..., None] for c in crops]
    for got, want in zip(engine.shape_many(crops), sampled, strict=True):
        assert np.array_equal(got, want)
    area = Engine.from_path(zoo.model("int8")).shape_many(crops)
    assert all(np.abs(a.astype(int) - s).mean() > 10 for a, s in zip(area, sampled, strict=True))
    # Without a manifest, from the settings' value.
    bare = tmp_path / "bare" / "bare.tflite"
    bare.parent.mkdir()
    shutil.copy(zoo.model("int8"), bare)
    assert Engine.from_path(bare).input_spec.resize == "area"
    assert Engine.from_path(bare, resize="bilinear").input_spec.resize == "bilinear"
    # A method the daemon does not know: one line naming the field.
    broken = json.loads(bilinear.to_bytes())
    broken["input"]["resize"] = "nearest"
    (tmp_path / "small.json").write_text(json.dumps(broken))
    with pytest.raises(ModelError, match=r"not valid at input\.resize: Input should be 'area'"):
        Engine.from_path(tmp_path / "small.tflite")


_FAKE_RUNTIME = """
import atexit, os, pathlib, signal

class Interpreter:
    def __init__(self, model_content):
        if os.environ.get("FAKE_RUNTIME_CRASH"):
            os.kill(os.getpid(), signal.SIGSEGV)  # as tflite-runtime 2.14 on some files
        atexit.register(pathlib.Path(os.environ["FAKE_RUNTIME_TORN_DOWN"]).touch)

    def allocate_tensors(self):
        pass
"""


@pytest.mark.parametrize("crash", [False, True])
def test_the_model_check_child_catches_a_crash_and_skips_teardown_after_a_load(
    crash: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check loads the model in a child: a runtime that crashes there is a clear
    ModelError, not a dead daemon; one that loads is left at once (no interpreter teardown,
    which the daemon's first label would wait for)."""
    (tmp_path / "fake_runtime.py").write_text(_FAKE_RUNTIME)
    torn_down = tmp_path / "torn-down"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_RUNTIME_TORN_DOWN", str(torn_down))
    if crash:
        monkeypatch.setenv("FAKE_RUNTIME_CRASH", "1")
    monkeypatch.setitem(runtime_module._MODULES, "fake", "fake_runtime")
    monkeypatch.setattr(runtime_module, "_waiting", [])  # a child of its own, with this env
    fake = runtime_module.Runtime("fake", object, object)
    model = tmp_path / "m.tflite"
    if crash:
        with pytest.raises(ModelError, match=r"crashed loading .*m\.tflite \(signal 11\)"):
            runtime_module._probe_load(model, fake, b"model bytes")
    else:
        runtime_module._probe_load(model, fake, b"model bytes")
    assert not torn_down.exists()
