"""Throughput and latency of the whole daemon on the sample clip, batched against unbatched.

Runs the daemon in-process against a real broker (127.0.0.1:1883, or a private mosquitto) with
N copies of the sample clip read as fast as they decode (not at the clip's 10 fps), once with
max_batch=1 and once with max_batch=8, and prints labels per second, mean batch size,
capture-to-publish latency, and the ratio batched / unbatched from this one run.

    .venv/bin/python benchmarks/throughput.py --cameras 4 --seconds 10
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from edge_daemon.broker import listening, start_mosquitto
from edge_daemon.config import load_settings
from edge_daemon.pipeline import Daemon
from edge_daemon.settings import SAMPLE_CLIP, sample_camera_rois


def measure(cameras: int, max_batch: int, seconds: float, host: str, port: int) -> dict[str, float]:
    """Run one configuration; labels/s, mean batch, latency figures."""
    rois = sample_camera_rois()
    cams = {
        f"cam{i}": {"source": str(SAMPLE_CLIP), "realtime": False, "rois": rois}
        for i in range(cameras)
    }
    settings = load_settings(
        mqtt={
            "host": host,
            "port": port,
            "topic_prefix": f"bench/{time.time_ns()}",
            "qos": 0,
            "stats_interval_s": 0,
        },
        cameras=cams,
        inference={"max_batch": max_batch, "max_delay_ms": 5},
    )
    daemon = Daemon(settings)
    latencies: list[float] = []
    original = daemon._publish_predictions

    def record(items, scores, inference_ms):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        latencies.extend((now - i.frame.monotonic) * 1000 for i in items)
        original(items, scores, inference_ms)

    daemon._publish_predictions = record  # type: ignore[method-assign]
    daemon.start()
    time.sleep(1.0)  # warm-up: sources open, interpreter resized
    start_items, latencies_start = daemon.stats.items, len(latencies)
    start_batches = daemon.stats.batches
    t0 = time.monotonic()
    threading.Event().wait(seconds)
    elapsed = time.monotonic() - t0
    items = daemon.stats.items - start_items
    batches = daemon.stats.batches - start_batches
    window = sorted(latencies[latencies_start:])
    daemon.stop()
    return {
        "labels_per_s": items / elapsed,
        "mean_batch": items / max(batches, 1),
        "p50_ms": window[len(window) // 2] if window else float("nan"),
        "p95_ms": window[int(len(window) * 0.95)] if window else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    broker = None
    if listening("127.0.0.1", 1883):
        host, port = "127.0.0.1", 1883
    else:
        broker = start_mosquitto()
        host, port = broker.host, broker.port
    try:
        one = measure(args.cameras, 1, args.seconds, host, port)
        eight = measure(args.cameras, 8, args.seconds, host, port)
    finally:
        if broker is not None:
            broker.stop()
    for name, r in (("max_batch=1", one), ("max_batch=8", eight)):
        print(
            f"{name}: {r['labels_per_s']:.0f} labels/s, mean batch {r['mean_batch']:.2f}, "
            f"latency p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms"
        )
    print(f"ratio batched/unbatched throughput: {eight['labels_per_s'] / one['labels_per_s']:.2f}")


if __name__ == "__main__":
    main()
