"""Soak: two 30 fps cameras and a broker restarted twice; memory, threads and messages hold.

Skipped unless SOAK_SECONDS is set: ``make soak`` runs it for 3 minutes (CI does), and
``make soak SOAK_SECONDS=3600`` for an hour. The daemon runs as its own process, as in service.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.broker import start_mosquitto
from edge_daemon.publisher import close_client
from tests.helpers import (
    MjpegServer,
    digit_frames,
    spawn_daemon,
    subscriber,
    unique_prefix,
    write_video,
)

pytestmark = pytest.mark.soak


def proc_status(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, threads) of a process, from /proc."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def test_soak_two_cameras_broker_restarted_twice(tmp_path: Path) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "0"))
    if seconds <= 0:
        pytest.skip("soak runs only with SOAK_SECONDS set (make soak)")
    warmup = min(30.0, seconds / 6)
    video = write_video(tmp_path / "cam.mp4", digit_frames(300, 160), fps=30)
    stream = MjpegServer(digit_frames(60, 160, seed=9), fps=30).start()
    prefix = unique_prefix()
    broker = start_mosquitto(extra_config="persistence true\npersistence_location {dir}/\n")
    env = {
        "EDGE_MQTT__PORT": str(broker.port),
        "EDGE_MQTT__TOPIC_PREFIX": prefix,
        "EDGE_MQTT__CLIENT_ID": f"soak-{prefix[-6:]}",
        "EDGE_MQTT__RECONNECT_MAX_S": "5",
        "EDGE_MQTT__STATS_INTERVAL_S": "10",
        "EDGE_CONTROL__ENABLED": "true",
        "EDGE_CAMERAS__file__SOURCE": str(video),
        "EDGE_CAMERAS__stream__SOURCE": stream.url,
        "EDGE_CAMERAS__stream__READ_TIMEOUT_S": "3",
    }
    samples: list[tuple[float, int, int]] = []
    with subscriber(prefix, port=broker.port, persistent=True) as sub:
        daemon = spawn_daemon("run", env=env, stdout=subprocess.DEVNULL)
        try:
            started = time.monotonic()
            restarts = [started + seconds * 0.4, started + seconds * 0.7]
            while time.monotonic() - started < seconds:
                assert daemon.poll() is None, "the daemon died"
                if restarts and time.monotonic() >= restarts[0]:
                    restarts.pop(0)
                    broker.kill()
                    time.sleep(3.0)
                    broker.relaunch()
                elapsed = time.monotonic() - started
                if elapsed >= warmup:
                    rss, threads = proc_status(daemon.pid)
                    samples.append((elapsed, rss, threads))
                time.sleep(2.0)
            # Stop the cameras, let the queue drain, then ask for the final counts.
            control = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            control.connect("127.0.0.1", broker.port)
            control.loop_start()
            for camera in ("file", "stream"):
                control.publish(
                    f"{prefix}/cmd", json.dumps({"cmd": "pause", "camera": camera}), qos=1
                ).wait_for_publish(5)
            time.sleep(5.0)
            before = len(sub.on("stats"))
            control.publish(f"{prefix}/cmd", b'{"cmd": "status"}', qos=1).wait_for_publish(5)
            assert sub.wait_for(lambda: len(sub.on("stats")) > before, timeout=30)
            stats = sub.on("stats")[-1].json()
            close_client(control)
            produced = stats["inference"]["items"] + stats["inference"]["reused"]
            dropped = stats["mqtt"]["dropped"]
            assert sub.wait_for(
                lambda: (
                    len({(p["camera"], p["frame"], p["ts"]) for p in sub.labels()})
                    >= produced - dropped
                ),
                timeout=60,
            )
            received = len(sub.labels())
            unique = len({(p["camera"], p["frame"], p["ts"]) for p in sub.labels()})
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=15)
            stream.stop()
            broker.stop()
    assert daemon.returncode == 0, stderr[-2000:]
    first = statistics.median(rss for _, rss, _ in samples[:5])
    last = statistics.median(rss for _, rss, _ in samples[-5:])
    growth = (last - first) / first * 100
    thread_counts = {t for _, _, t in samples}
    fps = {name: cam["fps"] for name, cam in stats["cameras"].items()}
    print(
        f"\nsoak {seconds:.0f} s: {produced} labels produced, {received} received "
        f"({unique} distinct), {dropped} dropped; RSS {first / 1024:.1f} -> "
        f"{last / 1024:.1f} MiB ({growth:+.2f}%); threads {sorted(thread_counts)}; "
        f"camera fps {fps}; broker restarted twice"
    )
    assert dropped == 0
    assert unique == produced, "labels lost"
    assert growth < 5.0, f"resident memory grew {growth:.2f}%"
    assert len(thread_counts) == 1, f"thread count changed: {sorted(thread_counts)}"
    assert min(fps.values()) > 20
