"""A subscriber in its own process: when each label arrived, and its capture time.

Prints ``ready`` once subscribed and ``first <wall time>`` when the first label arrives; on
SIGTERM (or after ``--seconds``) writes ``--out``: a JSON object of lists (arrival wall time,
capture-to-arrival milliseconds, whether the daemon reused the prediction).

    python -m benchmarks.subscriber --topic 'bench/x/+/+/label' --out received.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    # On paho's thread only the arrival time and the payload are kept (parsing happens after
    # the run): the subscriber shares the cores with what it measures.
    arrivals: list[tuple[float, bytes | bytearray]] = []
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        if not arrivals:
            print(f"first {time.time():.6f}", flush=True)
        arrivals.append((time.time(), message.payload))

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        del client, userdata, mid, codes, props
        print("ready", flush=True)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(args.host, args.port)
    client.subscribe(args.topic, qos=1)
    client.loop_start()
    done.wait(args.seconds)
    client.disconnect()
    client.loop_stop()
    arrived: list[float] = []
    latency: list[float] = []
    reused: list[bool] = []
    for at, raw in arrivals:
        payload = json.loads(raw)
        arrived.append(at)
        latency.append((at - datetime.fromisoformat(payload["ts"]).timestamp()) * 1000.0)
        reused.append(bool(payload.get("reused")))
    out = {"arrived": arrived, "latency_ms": latency, "reused": reused}
    args.out.write_text(json.dumps(out), encoding="utf-8")
    sys.exit(0)


if __name__ == "__main__":
    main()
