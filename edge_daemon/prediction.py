"""What the daemon publishes per classified crop: a typed :class:`Prediction` and its JSON.

The payload's JSON Schema is ``schemas/prediction.v1.json``; the tests check every encoded
prediction against it. JSON has no NaN or Infinity, so encoding refuses them
(:class:`EncodeError`) instead of writing something no consumer can parse.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge_daemon.postprocess import Class

#: The payload version, ``v`` in every message.
VERSION = 1


class EncodeError(ValueError):
    """A payload holds a value JSON cannot carry (NaN or infinity)."""


@functools.lru_cache(maxsize=256)
def iso_utc(wall: float) -> str:
    """A wall-clock time as ISO 8601 UTC with milliseconds (cached: a frame's regions share
    their capture time)."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


#: Made once: ``json.dumps`` with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON, refusing NaN and infinity."""
    try:
        return _ENCODER.encode(payload).encode()
    except ValueError as exc:
        raise EncodeError(f"not valid JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Prediction:
    """One crop's classification, as published on ``<camera>/<roi>/label``."""

    device: str
    camera: str
    roi: str
    #: The source's own frame number, from 0.
    frame: int
    #: Capture time, seconds since the epoch.
    captured: float
    #: The best class, or None when its score is below the threshold.
    label: str | None
    score: float
    top: tuple[Class, ...]
    model: str
    #: A short hash of the model file's bytes.
    model_hash: str
    latency_ms: float
    inference_ms: float
    batch: int
    #: True when the crop was nearly the one last classified and this repeats its result.
    reused: bool = False

    @classmethod
    def from_top(cls, top: tuple[Class, ...], threshold: float, **fields: Any) -> Prediction:
        """A prediction from its top classes (best first) and the score threshold."""
        best = top[0]
        return cls(
            label=best.label if best.score >= threshold else None,
            score=best.score,
            top=top,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """The payload as a dictionary, in the schema's field order."""
        return {
            "v": VERSION,
            "device": self.device,
            "camera": self.camera,
            "roi": self.roi,
            "frame": self.frame,
            "ts": iso_utc(self.captured),
            "label": self.label,
            "score": round(self.score, 6),
            "top": [{"label": c.label, "score": round(c.score, 6)} for c in self.top],
            "model": self.model,
            "model_hash": self.model_hash,
            "latency_ms": round(self.latency_ms, 3),
            "inference_ms": round(self.inference_ms, 3),
            "batch": self.batch,
        }

    def to_json(self) -> bytes:
        """The payload as compact JSON; :class:`EncodeError` for NaN or infinity."""
        return encode(self.to_dict())
