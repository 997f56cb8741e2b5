"""Faults injected for real: broker outages, failing sources, failing inference, stops, systemd."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edge_daemon.broker import start_mosquitto
from edge_daemon.pipeline import Daemon
from edge_daemon.settings import CameraSettings
from edge_daemon.systemd import Notifier
from tests.helpers import (
    MjpegServer,
    digit_frames,
    running,
    settings_for,
    spawn_daemon,
    subscriber,
    unique_prefix,
    wait_until,
    write_video,
)

pytestmark = pytest.mark.runtime


def test_broker_outage_of_20_seconds_loses_nothing(tmp_path: Path) -> None:
    """Default settings; the broker is down 20 s; every QoS 1 label arrives, in order."""
    video = write_video(tmp_path / "long.mp4", digit_frames(900, 48), fps=25)  # 36 s
    persistence = "persistence true\npersistence_location {dir}/\n"
    prefix = unique_prefix()
    with start_mosquitto(extra_config=persistence) as broker:
        settings = settings_for(
            prefix,
            mqtt={"port": broker.port, "client_id": "outage"},
            cameras={"cam": CameraSettings(source=str(video), loop=False)},
        )
        with subscriber(prefix, port=broker.port, persistent=True) as sub:
            daemon = Daemon(settings)
            with running(daemon):
                assert sub.wait_for(lambda: len(sub.labels()) >= 20)
                broker.kill()
                down_at = time.monotonic()
                time.sleep(20.0)
                assert not daemon.publisher.connected
                queued_during_outage = daemon.publisher.queued
                broker.relaunch()
                assert sub.wait_for(lambda: daemon.publisher.connected, timeout=45)
                recovered_after = time.monotonic() - down_at - 20.0
                print(
                    f"outage: {queued_during_outage} labels queued, reconnected "
                    f"{recovered_after:.1f} s after the broker returned"
                )
                # Let the rest of the file play out, then stop (which flushes).
                assert sub.wait_for(lambda: daemon.cameras[0].finished, timeout=40)
            assert sub.wait_for(lambda: len(sub.labels()) >= daemon.stats.predictions, timeout=20)
            frames = [p["frame"] for p in sub.labels()]
    assert queued_during_outage > 300
    assert daemon.publisher.dropped == 0
    # QoS 1 is "at least once": a label whose acknowledgement the outage cut off is sent again
    # (flagged as a duplicate), so a consumer may see it twice, never not at all.
    first_seen = list(dict.fromkeys(frames))
    print(
        f"received {len(frames)} labels for {daemon.stats.predictions} produced, "
        f"{len(frames) - len(first_seen)} duplicate(s)"
    )
    assert len(first_seen) == daemon.stats.predictions, "labels were lost"
    assert first_seen == sorted(first_seen), "labels arrived out of order"
    assert len(frames) - len(first_seen) <= 100  # at most the unacknowledged window


def test_queue_bound_drops_the_oldest_during_an_outage(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", digit_frames(200, 48), fps=50)
    with start_mosquitto() as broker:
        prefix = unique_prefix()
        settings = settings_for(
            prefix,
            mqtt={"port": broker.port, "queue_size": 50},
            cameras={"cam": CameraSettings(source=str(video), loop=False)},
        )
        daemon = Daemon(settings)
        with running(daemon):
            time.sleep(0.5)
            broker.kill()
            # 200 frames at 50 fps: the file ends within about 4 s of the start.
            assert wait_until(lambda: daemon.cameras[0].finished, timeout=20)
            # The labels' lane is bounded; states and events wait in their own.
            assert wait_until(lambda: len(daemon.publisher._queue) == 50, timeout=5)
            assert daemon.publisher.dropped > 0
            stats = daemon.stats_payload()
            assert stats["mqtt"]["dropped"] == daemon.publisher.dropped


def test_sigterm_stops_cleanly_within_5_seconds() -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        proc = spawn_daemon("run", env={"EDGE_MQTT__TOPIC_PREFIX": prefix})
        try:
            assert sub.wait_for(lambda: len(sub.labels()) >= 10, timeout=30)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
            code = proc.returncode
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert code == 0, stderr
        assert took < 5.0, f"took {took:.1f} s to stop"
        assert "received SIGTERM" in stderr
        assert sub.wait_for(
            lambda: sub.on("status")[-1:] != [] and sub.on("status")[-1].payload == b"offline"
        )
        assert sub.on("sample", "status")[-1].payload == b"offline"


def test_inference_errors_drop_the_batch_and_reload_the_model() -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix))
        real_invoke = daemon.engine.interpreter.invoke
        failures = {"left": 4}

        def flaky() -> None:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise RuntimeError("injected: the interpreter failed")
            real_invoke()

        daemon.engine.interpreter.invoke = flaky
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 10, timeout=30)
    assert daemon.stats.errors >= 3
    assert daemon.reloads >= 1
    assert daemon.fatal is None


# --- sources ------------------------------------------------------------------------------------


def test_stream_that_stalls_or_sends_broken_frames_and_a_file_that_ends(tmp_path: Path) -> None:
    broken = MjpegServer(digit_frames(12, 64), fps=20, corrupt_every=3).start()
    stalling = MjpegServer(digit_frames(12, 64, seed=5), fps=20).start()
    short = write_video(tmp_path / "short.mp4", digit_frames(30, 64), fps=30)
    prefix = unique_prefix()
    cameras = {
        "broken": CameraSettings(source=broken.url, read_timeout_s=2, open_timeout_s=2),
        "stalling": CameraSettings(source=stalling.url, read_timeout_s=2, open_timeout_s=2),
        "short": CameraSettings(source=str(short), loop=False),
    }
    try:
        with subscriber(prefix) as sub:
            daemon = Daemon(settings_for(prefix, cameras=cameras))
            with running(daemon):
                assert sub.wait_for(lambda: len(sub.labels("stalling")) >= 10)
                stalling.sending.clear()
                assert sub.wait_for(
                    lambda: [m.payload for m in sub.on("stalling", "status")][-1:] == [b"offline"],
                    timeout=15,
                )
                count = len(sub.labels("stalling"))
                stalling.sending.set()
                assert sub.wait_for(lambda: len(sub.labels("stalling")) > count + 5, timeout=40)
                assert [m.payload for m in sub.on("stalling", "status")][-1] == b"online"
                # Broken JPEG parts are skipped; the good ones keep coming.
                assert len(sub.labels("broken")) > 20
                # The file ended: offline, and it did not stop anything else.
                assert [m.payload for m in sub.on("short", "status")][-1] == b"offline"
                assert daemon.cameras[2].finished
    finally:
        broken.stop()
        stalling.stop()


# --- systemd ------------------------------------------------------------------------------------


def test_notify_ready_status_watchdog_and_pings_stop_when_inference_hangs(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    received: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            received.append((time.monotonic(), data))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    prefix = unique_prefix()
    daemon = Daemon(settings_for(prefix), notifier=notifier)
    hang = threading.Event()
    hanging = threading.Event()
    release = threading.Event()
    real_infer = daemon.engine.infer_shaped

    def maybe_hang(images):  # type: ignore[no-untyped-def]
        if hang.is_set():
            hanging.set()
            release.wait(30)
        return real_infer(images)

    daemon.engine.infer_shaped = maybe_hang  # type: ignore[method-assign]

    def pings(since: float) -> int:
        return sum(1 for at, text in received if at >= since and "WATCHDOG=1" in text)

    try:
        with running(daemon):
            time.sleep(3.0)
            assert received[0][1].startswith("READY=1")
            assert any("STATUS=" in text and "frames/s" in text for _, text in received)
            assert pings(received[0][0]) >= 3  # every half second while healthy
            hang.set()
            assert hanging.wait(10)  # the next batch blocks now
            # The progress made just before the hang may still earn one ping (at most every
            # half second): look from after that.
            time.sleep(0.6)
            stuck_since = time.monotonic()
            time.sleep(2.5)
            assert pings(stuck_since) == 0, "pinged the watchdog while inference was stuck"
            hang.clear()
            release.set()
            back = time.monotonic()
            time.sleep(2.0)
            assert pings(back) >= 2, "pings did not resume after inference recovered"
    finally:
        done.set()
        listener.join(2)
        sock.close()
    assert "STOPPING=1" in received[-1][1]


def test_the_real_command_notifies_systemd(tmp_path: Path) -> None:
    address = str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    proc = spawn_daemon(
        "run",
        "--duration",
        "3",
        env={"NOTIFY_SOCKET": address, "EDGE_MQTT__TOPIC_PREFIX": unique_prefix()},
        stdout=subprocess.DEVNULL,
    )
    messages = []
    try:
        while True:
            text = sock.recv(4096).decode()
            messages.append(text)
            if "STOPPING=1" in text:
                break
    finally:
        _, stderr = proc.communicate(timeout=15)
        sock.close()
    assert proc.returncode == 0, stderr
    assert messages[0].startswith("READY=1")
    assert f"MAINPID={proc.pid}" in messages[0]
