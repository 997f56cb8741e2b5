"""Statistics: the inference stage's counters and the periodic ``stats`` message.

Schema: ``schemas/stats.v1.json``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_daemon.prediction import VERSION, iso_utc

if TYPE_CHECKING:
    from edge_daemon.capture import Camera
    from edge_daemon.publisher import Publisher


@dataclass
class InferenceStats:
    """Counters of the inference stage."""

    batches: int = 0
    items: int = 0
    #: Batches that failed (the interpreter raised, or preprocessing did).
    errors: int = 0
    #: Crops whose output held NaN or infinity: dropped, not published.
    invalid: int = 0
    #: Crops nearly identical to the ones last classified, whose results were reused.
    reused: int = 0
    inference_ms_total: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def predictions(self) -> int:
        """Predictions made: crops classified and crops that reused an earlier result."""
        return self.items + self.reused

    def add_batch(self, size: int, inference_ms: float, items: int | None = None) -> None:
        """Count one round that ran: ``items`` crops (default ``size``) in batches of
        ``size`` (1 when they ran one by one)."""
        self.batches += 1
        self.items += size if items is None else items
        self.inference_ms_total += inference_ms
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def payload(self) -> dict[str, Any]:
        """The ``inference`` part of the ``stats`` message."""
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0,
            "mean_inference_ms": round(self.inference_ms_total / self.batches, 3)
            if self.batches
            else 0.0,
            "errors": self.errors,
            "invalid": self.invalid,
            "reused": self.reused,
        }


def camera_stats(camera: Camera, uptime: float) -> dict[str, Any]:
    """One camera's part of the ``stats`` message."""
    return {
        "online": camera.online,
        "fps": round(camera.frames_read / max(uptime, 1e-3), 3),
        "frames": camera.frames_read,
        "skipped": camera.frames_skipped,
        "reopens": camera.reopens,
    }


def stats_payload(
    *,
    device: str,
    started: float,
    model: str,
    model_hash: str,
    runtime: str,
    cameras: Sequence[Camera],
    inference: InferenceStats,
    publisher: Publisher,
    control: Mapping[str, int] | None,
    state: Mapping[str, int] | None = None,
    reloads: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``stats`` message (``started`` is the daemon's start, on the monotonic clock)."""
    uptime = time.monotonic() - started
    payload: dict[str, Any] = {
        "v": VERSION,
        "device": device,
        "ts": iso_utc(time.time()),
        "uptime_s": round(uptime, 3),
        "model": model,
        "model_hash": model_hash,
        "runtime": runtime,
        "cameras": {c.name: camera_stats(c, uptime) for c in cameras},
        "inference": inference.payload(),
        "mqtt": {
            "connected": publisher.connected,
            "queued": publisher.queued,
            "sent": publisher.sent,
            "dropped": publisher.dropped,
        },
    }
    if state is not None:
        payload["state"] = dict(state)
    if reloads is not None:
        payload["reloads"] = dict(reloads)
    if control is not None:
        payload["control"] = dict(control)
    return payload


def status_line(
    started: float, cameras: Sequence[Camera], inference: InferenceStats, publisher: Publisher
) -> str:
    """A one-line status: frames per second, labels, broker state (systemd's ``STATUS=``)."""
    uptime = max(time.monotonic() - started, 1e-3)
    fps = sum(c.frames_read for c in cameras) / uptime
    online = sum(c.online for c in cameras)
    broker = "connected" if publisher.connected else "disconnected"
    return (
        f"{fps:.1f} frames/s from {online}/{len(cameras)} cameras, "
        f"{inference.predictions} labels, broker {broker}, queue {publisher.queued}, "
        f"dropped {publisher.dropped}"
    )
