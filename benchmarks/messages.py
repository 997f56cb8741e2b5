"""Messages per second a 4-camera, 4-region daemon publishes, per-frame labels on and off.

Runs ``edge-daemon run`` as a process on the bundled sample clip (10 fps, its digit changing
every half second) as four cameras with four regions each, against the broker at
127.0.0.1:1883, and counts what a subscriber in this process receives, by kind of topic::

    .venv/bin/python benchmarks/messages.py --seconds 30
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.settings import SAMPLE_CLIP

REGIONS = {
    "digit": "112,72,96,96",
    "topleft": "0,0,96,96",
    "topright": "224,0,96,96",
    "bottomleft": "0,144,96,96",
}


def count(labels: str, seconds: float, cameras: int) -> tuple[dict[str, int], float]:
    """Messages received by kind while the daemon runs ``seconds`` (after a 3 s warm-up)."""
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    counts: collections.Counter[str] = collections.Counter()
    counting = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        if counting.is_set() and not message.retain:
            counts[message.topic.removeprefix(prefix + "/").split("/")[-1]] += 1

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    sub.on_message = on_message
    sub.connect("127.0.0.1", 1883)
    sub.subscribe(f"{prefix}/#", qos=1)
    sub.loop_start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(
        EDGE_MQTT__TOPIC_PREFIX=prefix,
        EDGE_MQTT__LABELS=labels,
        EDGE_MQTT__STATS_INTERVAL_S="10",
        EDGE_LOG_LEVEL="warning",
    )
    for i in range(cameras):
        env[f"EDGE_CAMERAS__cam{i}__SOURCE"] = str(SAMPLE_CLIP)
        for name, box in REGIONS.items():
            env[f"EDGE_CAMERAS__cam{i}__ROIS__{name}"] = box
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--duration", str(seconds + 4)], env=env
    )
    time.sleep(3.0)
    counting.set()
    started = time.monotonic()
    time.sleep(seconds)
    counting.clear()
    elapsed = time.monotonic() - started
    proc.wait(30)
    sub.loop_stop()
    sub.disconnect()
    return dict(counts), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--cameras", type=int, default=4)
    args = parser.parse_args()
    print(f"{args.cameras} cameras x {len(REGIONS)} regions, sample clip at 10 fps")
    print("| labels | label/s | state/s | events/s | snapshot/s | other/s | total/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for labels in ("every", "off"):
        counts, elapsed = count(labels, args.seconds, args.cameras)
        kinds = ("label", "state", "events", "snapshot")
        rates = [counts.get(k, 0) / elapsed for k in kinds]
        other = sum(v for k, v in counts.items() if k not in kinds) / elapsed
        total = sum(counts.values()) / elapsed
        cells = " | ".join(f"{r:.1f}" for r in [*rates, other, total])
        print(f"| {labels} | {cells} |")


if __name__ == "__main__":
    main()
