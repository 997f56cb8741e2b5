"""No silent death: a stage whose thread dies stops the daemon with exit 1 and says why.

Before, preprocessing ran outside the inference ``try`` and nothing watched the inference or
the publisher's threads: the daemon reported healthy, published nothing and exited 0.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_daemon import engine as engine_module
from edge_daemon import preprocess
from edge_daemon.control import release_memory
from edge_daemon.errors import DelegateError
from edge_daemon.inference import ReloadError
from edge_daemon.pipeline import Daemon, StageError
from edge_daemon.settings import BUNDLED_MODEL, CameraSettings, sample_camera
from edge_daemon.stage import StageThread
from tests.helpers import running, settings_for, subscriber, unique_prefix, wait_until

pytestmark = pytest.mark.runtime


def dies_with(daemon: Daemon, thread: str, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon stops by itself, blaming ``thread``, with an exit code systemd restarts."""
    assert wait_until(lambda: daemon.fatal is not None, timeout=20), "the death went unnoticed"
    assert isinstance(daemon.fatal, StageError)
    assert thread in str(daemon.fatal)
    assert daemon.fatal.exit_code == 1
    assert any(
        r.levelno == logging.CRITICAL and thread in r.getMessage() for r in caplog.records
    ), "no log line says which stage died"


def test_inference_thread_death_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    daemon = Daemon(settings_for(unique_prefix()))
    real = daemon.batcher.next_batch
    calls = {"n": 0}

    def breaks_after_a_few(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 5:
            raise MemoryError("injected")
        return real(*args, **kwargs)

    daemon.batcher.next_batch = breaks_after_a_few  # type: ignore[method-assign]
    with running(daemon):
        dies_with(daemon, "inference", caplog)


def test_mqtt_sender_death_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    daemon = Daemon(settings_for(unique_prefix()))

    real = daemon.publisher._can_send

    def broken(direct: bool = False) -> bool:
        if threading.current_thread().name != "mqtt-sender":
            return real(direct)  # labels handed over (or queued ones sent) by their caller
        raise RuntimeError("injected")

    daemon.publisher._can_send = broken  # type: ignore[method-assign]
    with running(daemon):
        dies_with(daemon, "mqtt-sender", caplog)


# The thread really dies with an exception, which pytest reports besides.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_paho_network_thread_death_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    daemon = Daemon(settings_for(unique_prefix()))

    def broken(*args: Any) -> None:
        raise RuntimeError("injected")

    daemon.publisher._client.on_publish = broken
    with running(daemon):
        dies_with(daemon, "mqtt-network", caplog)


def test_a_failing_preprocess_drops_the_batch_not_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = unique_prefix()
    real = preprocess.fit
    calls = {"n": 0}

    def fails_sometimes(image: np.ndarray, *args: Any) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] % 4 == 0:
            raise ValueError("injected: a crop the resize cannot take")
        return real(image, *args)

    monkeypatch.setattr(engine_module, "fit", fails_sometimes)
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix))
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 15, timeout=30)
            assert daemon.stats.errors >= 3
    assert daemon.fatal is None


def test_a_model_that_cannot_be_reloaded_exits_1_for_a_restart() -> None:
    """Exit 78 would tell systemd never to restart: wrong for a Coral that reset mid-run."""
    daemon = Daemon(settings_for(unique_prefix()))

    def fails(shaped: Any) -> Any:
        raise RuntimeError("injected: the delegate went away")

    def cannot_reload() -> Any:
        raise DelegateError("injected: cannot load the Edge TPU delegate")

    daemon.engine.infer_shaped = fails  # type: ignore[method-assign]
    daemon.engine.reopen = cannot_reload  # type: ignore[method-assign]
    daemon.inference._reload = cannot_reload
    with running(daemon):
        assert wait_until(lambda: daemon.fatal is not None, timeout=20)
    assert isinstance(daemon.fatal, ReloadError)
    assert daemon.fatal.exit_code == 1
    assert "Edge TPU" in str(daemon.fatal)


def test_failing_batches_reload_the_bytes_that_ran_not_a_file_replaced_since(
    tmp_path: Path,
) -> None:
    """A model file replaced by one a reload would refuse (half copied, broken) must not turn
    a passing fault (a Coral that reset) into a daemon that stops and cannot start again."""
    model = tmp_path / "digits.tflite"
    shutil.copy(BUNDLED_MODEL, model)
    shutil.copy(BUNDLED_MODEL.with_suffix(".json"), model.with_suffix(".json"))
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix, model={"path": str(model)}))
        broken = daemon.engine

        def fails(shaped: Any) -> Any:
            raise RuntimeError("injected: the delegate went away")

        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 3)
            model.write_bytes(b"not a model any more")
            broken.infer_shaped = fails  # type: ignore[method-assign]
            assert wait_until(lambda: daemon.reloads == 1, timeout=20)
            count = len(sub.labels())
            assert sub.wait_for(lambda: len(sub.labels()) >= count + 5)
        assert daemon.fatal is None
        assert daemon.engine is not broken
        assert sub.labels()[-1]["model_hash"] == broken.digest


def test_stop_does_not_wait_for_a_long_batch_delay() -> None:
    """With EDGE_INFERENCE__MAX_DELAY_MS=10000 the inference thread waits for more crops; a
    stop must end that wait, not outlast the 1 s it is given."""
    settings = settings_for(
        unique_prefix(),
        inference={"max_delay_ms": 10_000, "max_batch": 8},
        cameras={
            "sample": sample_camera()["sample"],
            "never": CameraSettings(source="/nonexistent/never.mp4"),
        },
    )
    daemon = Daemon(settings)
    daemon.start()
    assert wait_until(lambda: daemon.cameras[0].online)
    time.sleep(0.5)  # a batch is now waiting for the camera that never delivers
    started = time.monotonic()
    daemon.stop()
    took = time.monotonic() - started
    assert not daemon.inference.thread.is_alive()
    assert took < 4.0, f"stop took {took:.1f} s"


def test_an_error_while_a_camera_thread_runs_batches_stops_the_daemon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon = Daemon(settings_for(unique_prefix()))  # the sample clip, played in real time
    real = daemon.inference._emit
    calls = {"n": 0}

    def breaks_after_a_few(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise MemoryError("injected")
        real(*args)

    daemon.inference._emit = breaks_after_a_few
    with running(daemon):
        dies_with(daemon, "inference", caplog)
    assert "camera sample's thread" in str(daemon.fatal)


def test_a_batch_stuck_on_a_camera_thread_stops_feeding_the_watchdog() -> None:
    daemon = Daemon(settings_for(unique_prefix()))
    stuck = threading.Event()
    release = threading.Event()
    real = daemon.inference._emit

    def hangs_once(*args: Any) -> None:
        if not stuck.is_set():
            stuck.set()
            release.wait(30)  # a runtime call that never returns
        real(*args)

    daemon.inference._emit = hangs_once
    with running(daemon):
        try:
            assert stuck.wait(20)
            time.sleep(0.5)
            before = daemon.inference.last_progress
            time.sleep(1.0)  # the inference thread goes round five times meanwhile
            assert daemon.inference.last_progress == before, "progress without a batch"
            assert daemon.inference.thread.is_alive()
        finally:
            release.set()
        assert wait_until(lambda: daemon.inference.last_progress > before, timeout=5)


def test_a_stage_thread_is_named_in_the_operating_system_and_memory_can_be_handed_back() -> None:
    """``top -H`` shows which stage spends the CPU (the first 15 bytes of its name), and
    glibc's ``malloc_trim`` is found, both from the C library the process has loaded."""
    seen: dict[str, str] = {}

    def loop() -> None:
        task = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        seen["comm"] = task.read_text().strip()

    thread = StageThread("camera-front-garden", loop)
    thread.start()
    thread.join(5)
    assert seen == {"comm": "camera-front-ga"}
    assert release_memory() is True
