"""How many threads the interpreter runs on, learnt from the running pipeline.

One interpreter thread is the runtime's default, and right whenever the other cores are busy
decoding: a second thread only takes a core from the decoders (``make bench`` workload 2, one
720p camera: 400 labels a second on one thread, 355 on two, though each invoke was faster).
When inference is the bottleneck and the other cores idle, more threads pay (workload 1,
MobileNetV2 224: 94 labels a second on one thread, 153 on two). Which one holds can only be
told from the pipeline itself, so unless the threads are set: while inference keeps its thread
busy, the images classified a second are counted for a window on one thread, then on every
core the process may use, and the cores are kept only when they give ``GAIN`` times as many.
The choice is made again every ``RECHECK_S``, since the load changes. Nothing is run only to
measure.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Seconds of rounds each rate is counted over (1-second windows varied by 15% on a busy
#: 2-core machine).
WINDOW_S = 2.0
#: Seconds not counted at the start (the first rounds make interpreters and learn batching)
#: and after a switch (an interpreter is made for the other threads).
WARMUP_S = 1.0
SETTLE_S = 0.2
#: The share of a window spent inferring from which inference counts as the bottleneck.
BUSY = 0.8
#: More threads are kept only when they classify at least this many times as many images.
GAIN = 1.25
#: Seconds after a decision before it is tried again.
RECHECK_S = 300.0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or systemd's
    ``CPUAffinity=`` may narrow), shared out among FFmpeg's decoders and the interpreter."""
    return len(os.sched_getaffinity(0))


class ThreadChoice:
    """Which of ``options`` (interpreter threads; ``None`` is the runtime's default of one)
    runs inference: the first unless more threads measurably classify more."""

    def __init__(self, options: tuple[int | None, ...], name: str = "model") -> None:
        self.options = options
        self.name = name
        #: The threads rounds run on now.
        self.current = options[0]
        #: Decisions made so far.
        self.decisions = 0
        #: Whether ``current`` is being tried (the settled choice is then the other option).
        self._trying = False
        self._baseline = 0.0
        self._next_try = 0.0
        #: The window being counted: when it began, its images, its seconds of inference.
        self._start: float | None = None
        self._images = 0
        self._busy = 0.0
        #: Rounds ending before this are not counted (None: not started).
        self._quiet_until: float | None = None

    @property
    def learning(self) -> bool:
        """Whether there is a choice to make at all (more than one option)."""
        return len(self.options) > 1

    def describe(self) -> str:
        """What ``check`` says: the threads, or the choice to be made."""
        if not self.learning:
            return f"inference on {_threads_text(self.options[0])}"
        return (
            f"inference on 1 thread, or {self.options[1]} while inference is the bottleneck "
            "and they pay (measured while running)"
        )

    def record(self, images: int, seconds: float, now: float) -> bool:
        """A round of ``images`` took ``seconds`` of inference, ending at ``now`` (seconds on
        a monotonic clock). True when it completed a choice (the interpreters on the other
        threads can go)."""
        if not self.learning:
            return False
        if self._quiet_until is None:
            self._quiet_until = now + WARMUP_S
        if now < self._quiet_until:
            return False
        if self._start is None:
            self._start = now - seconds
        self._images += images
        self._busy += seconds
        elapsed = now - self._start
        if elapsed < WINDOW_S:
            return False
        rate, busy = self._images / elapsed, self._busy / elapsed
        self._start, self._images, self._busy = None, 0, 0.0
        if self._trying:
            self._decide(rate, now)
            return True
        if now >= self._next_try and (busy >= BUSY or self.current != self.options[0]):
            # Inference is the bottleneck (or more threads are in use): try the other way.
            self._baseline = rate
            self._trying = True
            self.current = self._other(self.current)
            self._quiet_until = now + SETTLE_S
        return False

    def _other(self, threads: int | None) -> int | None:
        return self.options[1] if threads == self.options[0] else self.options[0]

    def _decide(self, rate: float, now: float) -> None:
        # The rate just counted is of the threads being tried; the baseline, of the others.
        on_few = self.current == self.options[0]
        few, many = (rate, self._baseline) if on_few else (self._baseline, rate)
        chosen = self.options[1] if many >= GAIN * few else self.options[0]
        changed = chosen != self._other(self.current)
        self.current = chosen
        self._trying = False
        self.decisions += 1
        self._next_try = now + RECHECK_S
        self._quiet_until = now + SETTLE_S
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "%s: inference on %s (%.0f images/s on %d threads, %.0f on 1)",
            self.name,
            _threads_text(chosen),
            many,
            self.options[1] or 1,
            few,
        )


def _threads_text(threads: int | None) -> str:
    return f"{threads or 1} thread{'s' if (threads or 1) > 1 else ''}"
