"""Memory cost of the outgoing queue's bound (EDGE_MQTT__QUEUE_SIZE) while the broker is away.

Fills a publisher's queue with typical prediction payloads (top 3 of 10 classes), as during an
outage, and measures the Python allocations with tracemalloc: bytes per queued label and for
the whole bound. Prints the figures of this one run.

    .venv/bin/python benchmarks/queue_memory.py
"""

from __future__ import annotations

import json
import tracemalloc

from edge_daemon.broker import free_port
from edge_daemon.config import load_settings
from edge_daemon.publisher import Publisher


def payload(n: int) -> bytes:
    """A prediction as the daemon publishes it."""
    return json.dumps(
        {
            "v": 1,
            "device": "pi-garage",
            "camera": "door",
            "roi": "porch",
            "frame": n,
            "ts": "2026-11-28T13:08:53.190+00:00",
            "label": "3",
            "score": 0.996094,
            "top": [
                {"label": "3", "score": 0.996094},
                {"label": "9", "score": 0.003906},
                {"label": "0", "score": 0.0},
            ],
            "model": "digits",
            "latency_ms": 0.912,
            "inference_ms": 0.214,
            "batch": 4,
        },
        separators=(",", ":"),
    ).encode()


def main() -> None:
    for size in (1_000, 10_000, 100_000):
        settings = load_settings(mqtt={"port": free_port(), "queue_size": size})
        publisher = Publisher(settings)  # never started: the broker is "away"
        sample = payload(0)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        # Twice the bound: the queue fills, then drops the oldest; payloads are made here,
        # as the daemon makes them, so what the queue holds is counted.
        for i in range(size * 2):
            publisher.publish(publisher.topic("door", "porch", "label"), payload(i))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        print(
            f"queue_size {size:>7}: {publisher.queued} queued, {publisher.dropped} dropped; "
            f"{grown / 1024 / 1024:.2f} MiB held, {grown / publisher.queued:.0f} bytes per "
            f"label (payload {len(sample)} bytes)"
        )


if __name__ == "__main__":
    main()
