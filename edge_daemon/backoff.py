"""Jittered exponential backoff, shared by camera reopening and broker reconnecting."""

from __future__ import annotations

import random


class Backoff:
    """Jittered exponential backoff: the nominal delay doubles up to ``maximum``; each delay is
    a random point between half the nominal delay and all of it ("equal jitter"), so clients
    that failed together do not retry together, even once they reach the maximum."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self._next = minimum
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = self._next * self._rng.uniform(0.5, 1.0)
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from the minimum (after a success)."""
        self._next = self.minimum
