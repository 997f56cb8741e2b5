"""The inference stage: batches of crops through the engine into predictions.

One thread, the only one to touch the interpreter. Everything a batch does (preprocessing
into the interpreter's input, invoking, reading the output) is inside one ``try``: a batch
that fails is dropped and counted, several in a row reload the model, and a model that cannot
be reloaded stops the daemon (the supervisor sees :attr:`InferenceStage.fatal`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_daemon import postprocess
from edge_daemon.batcher import Batcher, Item
from edge_daemon.control import RateLimit
from edge_daemon.engine import Engine
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.prediction import Prediction
from edge_daemon.settings import InferenceSettings
from edge_daemon.stage import StageThread
from edge_daemon.stats import InferenceStats

log = logging.getLogger(__name__)


class ReloadError(EdgeDaemonError):
    """The model failed at run time and could not be loaded again (exit 1: systemd restarts)."""


#: Batches that fail one after another before the model is loaded again.
MAX_CONSECUTIVE_FAILURES = 3


class InferenceStage:
    """Takes batches from the batcher, runs them, hands each crop and its prediction to
    ``emit``."""

    def __init__(
        self,
        settings: InferenceSettings,
        device: str,
        batcher: Batcher,
        *,
        engine: Engine,
        emit: Callable[[Item, Prediction], None],
        reload: Callable[[], Engine],
    ) -> None:
        self.settings = settings
        self.device = device
        self.batcher = batcher
        self.engine = engine
        self._emit = emit
        self._reload = reload
        #: The score threshold; the control topic may change it at run time.
        self.threshold = settings.threshold
        self.stats = InferenceStats()
        self.reloads = 0
        #: Why the stage gave up (the model could not be reloaded); None while healthy.
        self.fatal: EdgeDaemonError | None = None
        #: When the loop last went round (the watchdog is fed only after progress).
        self.last_progress = time.monotonic()
        self._failures = 0
        #: A new model handed over by a reload, swapped in before the next batch.
        self._next_engine: Engine | None = None
        self._invalid_log = RateLimit(rate=1 / 60, burst=1)
        self._stop = threading.Event()
        self.thread = StageThread("inference", self._loop)

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the loop to finish the batch in flight and end."""
        self._stop.set()
        self.batcher.notify()  # a wait for more crops ends now

    @property
    def latest_engine(self) -> Engine:
        """The model that runs from the next batch on (one a reload handed over, if any)."""
        return self._next_engine or self.engine

    def offer_engine(self, engine: Engine) -> None:
        """A new model, loaded and checked: it replaces the running one between two batches."""
        self._next_engine = engine
        self.batcher.notify()

    def set_threshold(self, value: float) -> None:
        """Change the score threshold (from the control topic)."""
        self.threshold = value

    def _loop(self) -> None:
        while True:
            self.last_progress = time.monotonic()
            engine, self._next_engine = self._next_engine, None
            if engine is not None:
                self.engine = engine  # the old one's interpreters go with the last reference
                self._failures = 0
            items = self.batcher.next_batch(self._stop)
            if not items:
                if self._stop.is_set():
                    return
                continue
            self.run_batch(items)
            if self.fatal is not None:
                return

    def run_batch(self, items: list[Item]) -> None:
        """Classify one batch and emit its predictions; a failure drops the batch."""
        started = time.perf_counter()
        try:
            raw = self.engine.infer([item.crop for item in items])
            scores = self.engine.probabilities(raw)
        except Exception:
            self.stats.errors += 1
            self._failures += 1
            log.exception("inference failed on a batch of %d; dropped it", len(items))
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                self._reload_engine()
            return
        self._failures = 0
        inference_ms = (time.perf_counter() - started) * 1000.0
        self.stats.add_batch(len(items), inference_ms)
        finite = postprocess.finite_rows(scores)
        for item, row, ok in zip(items, scores, finite, strict=True):
            if ok:
                self._emit(item, self._prediction(item, row, inference_ms, len(items)))
            else:
                self._drop_invalid(item)

    def _prediction(
        self, item: Item, row: postprocess.Scores, inference_ms: float, batch: int
    ) -> Prediction:
        return Prediction.from_top(
            postprocess.top_k(row, self.engine.labels, self.settings.top_k),
            self.threshold,
            device=self.device,
            camera=item.camera,
            roi=item.roi,
            frame=item.frame.number,
            captured=item.frame.wall,
            model=self.engine.name,
            model_hash=self.engine.digest,
            latency_ms=(time.monotonic() - item.frame.monotonic) * 1000.0,
            inference_ms=inference_ms,
            batch=batch,
        )

    def _drop_invalid(self, item: Item) -> None:
        self.stats.invalid += 1
        log.log(
            logging.WARNING if self._invalid_log.allow() else logging.DEBUG,
            "%s/%s: the model gave NaN or infinity (%d such outputs dropped so far); "
            "check the model and its input scaling",
            item.camera,
            item.roi,
            self.stats.invalid,
        )

    def _reload_engine(self) -> None:
        log.warning("%d batches in a row failed: loading the model again", self._failures)
        try:
            # The very bytes that ran: the file may since hold a model a reload refused.
            self.engine = self.engine.reopen()
        except EdgeDaemonError as first:
            try:
                self.engine = self._reload()
            except EdgeDaemonError as exc:
                log.error(  # noqa: TRY400
                    "cannot load the model again (%s; from its file: %s); stopping so systemd "
                    "restarts us",
                    first,
                    exc,
                )
                # Exit 1, not the model error's 78: the model loaded at start, so this is a
                # fault (a Coral that reset) that a restart may well cure.
                self.fatal = ReloadError(f"the model failed and could not be loaded again: {exc}")
                self._stop.set()
                return
        self.reloads += 1
        self._failures = 0
