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
from dataclasses import dataclass

import cv2

from edge_daemon import postprocess
from edge_daemon.batcher import Batcher, Item
from edge_daemon.control import RateLimit
from edge_daemon.engine import Engine
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.prediction import Prediction
from edge_daemon.preprocess import Image
from edge_daemon.settings import InferenceSettings
from edge_daemon.stage import StageThread
from edge_daemon.stats import InferenceStats

log = logging.getLogger(__name__)


class ReloadError(EdgeDaemonError):
    """The model failed at run time and could not be loaded again (exit 1: systemd restarts)."""


#: Batches that fail one after another before the model is loaded again.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True, slots=True)
class _Last:
    """A region's crop as last classified (model-sized, 8-bit), its best classes, when, and
    the size of the batch it ran in."""

    shaped: Image
    top: tuple[postprocess.Class, ...]
    at: float
    batch: int


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
        #: Per region, the crop last classified and its result (to skip unchanged crops).
        self._last: dict[tuple[str, str], _Last] = {}
        #: The live difference below which a crop counts as unchanged (0: never).
        self.unchanged_below = settings.unchanged_below
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
                self._last.clear()  # the old model's results are not the new one's
            items = self.batcher.next_batch(self._stop)
            if not items:
                if self._stop.is_set():
                    return
                continue
            self.run_batch(items)
            if self.fatal is not None:
                return

    def run_batch(self, items: list[Item]) -> None:
        """Classify one batch and emit its predictions; a failure drops the batch. A region
        that did not change since it was last classified reuses that result."""
        started = time.perf_counter()
        engine = self.engine
        try:
            shaped = self._shaped(engine, items)
            now = time.monotonic()
            fresh = [
                i for i, image in enumerate(shaped) if not self._unchanged(items[i], image, now)
            ]
            if fresh:
                raw = engine.infer_shaped([shaped[i] for i in fresh])
                scores = engine.probabilities(raw)
        except Exception:
            self.stats.errors += 1
            self._failures += 1
            log.exception("inference failed on a batch of %d; dropped it", len(items))
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                self._reload_engine()
            return
        self._failures = 0
        inference_ms = (time.perf_counter() - started) * 1000.0
        # The size of the batch the crops ran in: 1 when they ran one by one.
        ran = engine.last_batch
        if fresh:
            self.stats.add_batch(ran, inference_ms, len(fresh))
        self.stats.reused += len(items) - len(fresh)
        tops: dict[int, tuple[postprocess.Class, ...]] = {}
        if fresh:
            finite = postprocess.finite_rows(scores)
            ok = [i for i, good in zip(fresh, finite, strict=True) if good]
            rows = scores[finite]
            found = postprocess.top_k_rows(rows, engine.labels, self.settings.top_k)
            tops = dict(zip(ok, found, strict=True))
            if self.unchanged_below:
                for i in ok:
                    # A copy: a crop already at the model's size is a view of the whole frame.
                    self._last[(items[i].camera, items[i].roi)] = _Last(
                        shaped[i].copy(), tops[i], now, ran
                    )
        fresh_set = set(fresh)
        for i, item in enumerate(items):
            if i in tops:
                self._emit(item, self._prediction(item, tops[i], inference_ms, ran))
            elif i not in fresh_set:
                last = self._last[(item.camera, item.roi)]
                self._emit(item, self._prediction(item, last.top, 0.0, last.batch, reused=True))
            else:
                self._last.pop((item.camera, item.roi), None)
                self._drop_invalid(item)

    @staticmethod
    def _shaped(engine: Engine, items: list[Item]) -> list[Image]:
        """Each crop as the model takes it: shaped by its camera's thread for this model, or
        here, the small ones all together."""
        spec = engine.input_spec
        todo = [i for i, item in enumerate(items) if item.shaped is None or item.spec is not spec]
        made = dict(zip(todo, engine.shape_many([items[i].crop for i in todo]), strict=True))
        out: list[Image] = []
        for i, item in enumerate(items):
            ready = made.get(i, item.shaped)
            assert ready is not None  # every item not shaped before is in ``made``
            out.append(ready)
        return out

    def _unchanged(self, item: Item, image: Image, now: float) -> bool:
        """Whether the region's crop is nearly the one last classified, recently enough."""
        if not self.unchanged_below:
            return False
        last = self._last.get((item.camera, item.roi))
        if last is None or now - last.at > self.settings.unchanged_max_age_s:
            return False
        if last.shaped.shape != image.shape:
            return False
        difference = cv2.norm(last.shaped, image, cv2.NORM_L1) / (image.size * 255.0)
        return bool(difference < self.unchanged_below)

    def _prediction(
        self,
        item: Item,
        top: tuple[postprocess.Class, ...],
        inference_ms: float,
        batch: int,
        *,
        reused: bool = False,
    ) -> Prediction:
        return Prediction.from_top(
            top,
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
            reused=reused,
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
        self._last.clear()  # the model loaded again may be another one
