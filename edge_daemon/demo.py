"""``edge-daemon demo`` (``make run``): the sample clip through the daemon to a subscriber.

Uses the local broker at 127.0.0.1:1883 when one listens, else starts a private mosquitto on a
free port. A subscriber prints each label as it arrives, with the share that matches the clip's
ground truth (held-out digits the model never saw in training).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.broker import PrivateBroker, listening, start_mosquitto
from edge_daemon.config import load_settings
from edge_daemon.engine import model_summary
from edge_daemon.pipeline import Daemon
from edge_daemon.publisher import close_client
from edge_daemon.settings import SAMPLE_CLIP
from edge_daemon.signals import stop_on_signals
from edge_daemon.sources import quiet_opencv

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What the subscriber saw."""

    truth: list[str]
    received: int = 0
    correct: int = 0
    latencies: list[float] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, payload: dict[str, Any]) -> str:
        """Count one prediction and return the line to print."""
        expected = self.truth[payload["frame"] % len(self.truth)]
        ok = payload["label"] == expected
        with self.lock:
            now = time.monotonic()
            self.first = self.first or now
            self.last = now
            self.received += 1
            self.correct += ok
            self.latencies.append(float(payload["latency_ms"]))
            share = self.correct / self.received * 100
        top = payload["top"][0]
        return (
            f"{payload['camera']}/{payload['roi']} frame {payload['frame']:4d}: "
            f"{payload['label'] or '-':>2} ({top['score']:.2f})  truth {expected}  "
            f"{'ok ' if ok else 'MISS'}  {share:5.1f}% right of {self.received}, "
            f"batch {payload['batch']}, {payload['latency_ms']:.1f} ms"
        )


def run_demo(duration: float | None, *, debug: bool = False) -> int:
    """Run the demo; returns the exit code."""
    quiet_opencv(debug)  # as ``run`` does: OpenCV's warnings only with --debug
    broker: PrivateBroker | None = None
    if listening("127.0.0.1", 1883):
        host, port = "127.0.0.1", 1883
        log.info("using the broker at 127.0.0.1:1883")
    else:
        broker = start_mosquitto()
        host, port = broker.host, broker.port
        log.info("no broker at 127.0.0.1:1883: started a private mosquitto on port %d", port)
    try:
        return _demo(host, port, duration)
    finally:
        if broker is not None:
            broker.stop()


def _demo(host: str, port: int, duration: float | None) -> int:
    settings = load_settings(mqtt={"host": host, "port": port, "stats_interval_s": 5}, cameras={})
    meta = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text(encoding="utf-8"))
    tally = Tally(truth=list(meta["truth"]))
    prefix = settings.topic_prefix
    subscriber = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edge-demo-subscriber-{time.time_ns()}",
    )

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        del userdata, flags, properties
        if not reason.is_failure:
            client.subscribe(f"{prefix}/+/+/label", qos=1)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        print(tally.add(json.loads(message.payload)), flush=True)

    subscriber.on_connect = on_connect
    subscriber.on_message = on_message
    subscriber.connect(host, port)
    subscriber.loop_start()
    daemon = Daemon(settings)
    log.info("model %s", model_summary(daemon.engine))
    log.info(
        "playing the bundled sample clip (%d frames of held-out digits at %g fps); "
        "subscribed to %s/+/+/label on %s:%d; Ctrl-C stops",
        meta["frames"],
        meta["fps"],
        prefix,
        host,
        port,
    )
    stop = threading.Event()
    stop_watching_signals = stop_on_signals(stop)
    try:
        daemon.start()
        daemon.run(duration=duration, stop=stop)
    finally:
        daemon.stop()
        stop_watching_signals()
        time.sleep(0.5)
        close_client(subscriber)
    with tally.lock:
        received, correct = tally.received, tally.correct
        latencies = sorted(tally.latencies)
        span = tally.last - tally.first
    if not received:
        print("no labels received")
        return 1
    p50 = latencies[len(latencies) // 2]
    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
    print(
        f"received {received} labels, {correct / received * 100:.1f}% match the ground truth; "
        f"{received / span if span > 0 else 0:.1f} labels/s; capture-to-publish latency "
        f"median {p50:.1f} ms, 95th percentile {p95:.1f} ms"
    )
    return 0
