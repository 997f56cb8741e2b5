"""Whether running several crops as one batch pays, learnt from the batches themselves.

On many CPU runtimes a batch of n costs n times one image (ai-edge-litert measured 0.85-1.01x
per image at batch 2-8), and resizing the interpreter's input costs memory; elsewhere (some
tflite-runtime builds, small models dominated by per-call overhead) batching is faster. So in
``auto`` mode each batch size is tried both ways on real work: crops run one by one until a few
timings are in, then as one batch for a few, and the faster way (by at least ``MARGIN``) is kept
for that size. The choice is made again from fresh timings every ``RECHECK`` batches of that
size, since the board's load changes. Nothing is run only to measure.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]

#: Timings of each kind (per image) that decide; the first of each kind is a warm-up, not kept.
SAMPLES = 7
#: Batching is chosen when its time per image is below this share of one by one's.
MARGIN = 0.9
#: Batches of a size after which that size is decided again from fresh timings.
RECHECK = 5000


@dataclass
class _Size:
    """What is known of one batch size."""

    batched: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    warmed: bool = False
    decided: bool | None = None
    since_decided: int = 0


class BatchChoice:
    """Per batch size: one batched invoke, or one invoke per crop."""

    def __init__(self, mode: Mode = "auto", name: str = "model") -> None:
        self.mode = mode
        self.name = name
        self._single: deque[float] = deque(maxlen=SAMPLES)
        self._single_warmed = False
        self._sizes: dict[int, _Size] = {}

    def batch(self, n: int) -> bool:
        """Whether to run ``n`` crops as one batch."""
        if n < 2:
            return False
        size = self._sizes.setdefault(n, _Size())
        if self.mode != "auto":
            return self.mode == "on"
        if size.decided is not None:
            size.since_decided += 1
            if size.since_decided < RECHECK:
                return size.decided
            # Time to look again: fresh timings of both kinds.
            size.decided, size.since_decided = None, 0
            size.batched.clear()
            size.warmed = False
            self._single.clear()
        # Learning: one by one until its timings are in, then batched until those are.
        return len(self._single) >= SAMPLES and len(size.batched) < SAMPLES

    def record(self, n: int, batched: bool, seconds: float) -> None:
        """The time ``n`` crops took, run as one batch or one by one."""
        if self.mode != "auto" or n < 1:
            return
        per_image = seconds / n
        if not batched:
            if self._single_warmed:
                self._single.append(per_image)
            self._single_warmed = True
            return
        size = self._sizes.setdefault(n, _Size())
        if not size.warmed:
            size.warmed = True  # the first includes making the interpreter for this size
            return
        size.batched.append(per_image)
        if size.decided is None and len(size.batched) >= SAMPLES and len(self._single) >= SAMPLES:
            one = statistics.median(self._single)
            many = statistics.median(size.batched)
            size.decided = many < MARGIN * one
            size.since_decided = 0
            log.info(
                "%s: batches of %d %s (%.3f ms per image batched, %.3f one by one)",
                self.name,
                n,
                "run as one batch" if size.decided else "run one by one",
                many * 1000,
                one * 1000,
            )

    def choices(self) -> dict[str, str]:
        """Each batch size seen and how it runs: ``batched``, ``single`` or ``learning``."""
        out = {}
        for n, size in sorted(self._sizes.items()):
            if self.mode != "auto":
                out[str(n)] = "batched" if self.mode == "on" else "single"
            elif size.decided is None:
                out[str(n)] = "learning"
            else:
                out[str(n)] = "batched" if size.decided else "single"
        return out
