"""The inference stage: batches of crops through the engine into predictions.

One thread at a time runs batches (the interpreter is not thread-safe): the ``inference``
thread, or a camera's thread that just offered a frame of a live source. When nothing is
running and a batch is short next to the camera's frame interval, that thread classifies what
is waiting itself, while its caches are warm, instead of waking the inference thread: a thread
wake-up fewer per frame, and the label out sooner. It gives the role back after half a frame
interval, so its own source is never left unread; the inference thread runs the rest, and runs
everything when batches are slow, when the batcher waits for fuller batches, and for files read
as fast as they decode (there the camera's thread decodes the next frame meanwhile).

Everything a batch does (preprocessing into the interpreter's input, invoking, reading the
output) is inside one ``try``: a batch that fails is dropped and counted, several in a row
reload the model, and a model that cannot be reloaded stops the daemon (the supervisor sees
:attr:`InferenceStage.fatal`). Anything else that goes wrong while a camera's thread runs
batches ends the inference thread, as if it had happened there.
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
from edge_daemon.capture import Camera
from edge_daemon.control import RateLimit
from edge_daemon.engine import Engine
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.prediction import Prediction
from edge_daemon.preprocess import Image
from edge_daemon.settings import InferenceSettings
from edge_daemon.stage import StageThread
from edge_daemon.stats import InferenceStats

log = logging.getLogger(__name__)


class CameraThreadError(RuntimeError):
    """A round run on a camera's thread failed outside the model: it ends the inference
    thread, which the supervisor sees."""


class ReloadError(EdgeDaemonError):
    """The model failed at run time and could not be loaded again (exit 1: systemd restarts)."""


#: Batches that fail one after another before the model is loaded again.
MAX_CONSECUTIVE_FAILURES = 3

#: A camera's thread runs batches itself only while one takes less than this share of the
#: camera's frame interval (smoothed), and for at most this share of it in a row.
INLINE_SHARE = 0.25
INLINE_BUDGET = 0.5

#: Seconds the inference thread waits for crops (or for the role) before it looks around.
IDLE_WAIT_S = 0.2

#: Labels waiting for the broker beyond which no batch runs (more would only wait, or push
#: older ones out), and how long the inference thread waits before it looks again.
MAX_BACKLOG = 200
BACKLOG_WAIT_S = 0.002


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
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.device = device
        self.batcher = batcher
        self.engine = engine
        self._emit = emit
        self._reload = reload
        #: Labels made but not yet taken by the broker (see :data:`MAX_BACKLOG`).
        self._backlog = backlog
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
        #: Guards ``_running``: whether a thread (this stage's or a camera's) runs batches.
        self._role = threading.Condition()
        self._running = False
        #: Seconds a batch takes, smoothed (a camera's thread runs only short ones).
        self._batch_s = 0.0
        #: What went wrong on a camera's thread while it ran batches (ends this stage).
        self._crash: str | None = None
        self.thread = StageThread("inference", self._loop)

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the loop to finish the batch in flight and end."""
        self._stop.set()
        self.batcher.notify()  # a wait for more crops ends now
        with self._role:
            self._role.notify_all()

    @property
    def latest_engine(self) -> Engine:
        """The model that runs from the next batch on (one a reload handed over, if any)."""
        return self._next_engine or self.engine

    def offer_engine(self, engine: Engine) -> None:
        """A new model, loaded and checked: it replaces the running one between two batches."""
        with self._role:  # not between another swap's read and clear: it would be lost
            self._next_engine = engine
        self.batcher.notify()

    def set_threshold(self, value: float) -> None:
        """Change the score threshold (from the control topic)."""
        self.threshold = value

    def frame_ready(self, camera: Camera) -> None:
        """Called on ``camera``'s thread once it offered a frame: classify what is waiting
        here when that pays (see the module's docstring), else wake the inference thread."""
        if not self._inline(camera):
            self.batcher.notify()
            return
        if not self._claim(wait=False):
            return  # whoever runs batches takes this frame before giving the role back
        deadline = time.monotonic() + INLINE_BUDGET * camera.interval
        try:
            while not self._stop.is_set():
                items = self.batcher.take_ready()
                if not items:
                    if self._release():
                        return
                    continue
                self._swap_engine()
                self.run_batch(items)
                self.last_progress = time.monotonic()
                if self.last_progress >= deadline or self._backlog() > MAX_BACKLOG:
                    break
        except BaseException as exc:  # handed to the inference thread, not lost
            self._crash = f"{type(exc).__name__}: {exc}, on camera {camera.name}'s thread"
            log.critical("running a batch on camera %s's thread failed", camera.name, exc_info=True)
            self._stop.set()
        # Out of time (or stopping): the inference thread runs the rest.
        self._release(force=True)
        self.batcher.notify()

    def _inline(self, camera: Camera) -> bool:
        """Whether ``camera``'s thread may run batches: a live (or paced) source, no waiting
        for fuller batches, batches short next to its frame interval, and the broker keeping
        up."""
        return (
            not camera.pulled
            and not self.batcher.max_delay_s
            and self._batch_s < INLINE_SHARE * camera.interval
            and self._backlog() <= MAX_BACKLOG
            and not self._stop.is_set()
        )

    def _claim(self, *, wait: bool) -> bool:
        """Take the role of running batches; with ``wait``, for up to ``IDLE_WAIT_S``."""
        with self._role:
            if self._running and wait:
                self._role.wait(IDLE_WAIT_S)
            if self._running or self._stop.is_set():
                return False
            self._running = True
            return True

    def _release(self, *, force: bool = False) -> bool:
        """Give the role back, unless crops are waiting (the holder runs them first): a camera
        that found the role taken relies on that. True once given back."""
        with self._role:
            if not force and self.batcher.pending() and not self._stop.is_set():
                return False
            self._running = False
            self._role.notify_all()
            return True

    def _swap_engine(self) -> None:
        """Put in the model a reload handed over (by whoever holds the role)."""
        if self._next_engine is None:  # the usual case, without the lock
            return
        with self._role:
            engine, self._next_engine = self._next_engine, None
        if engine is not None:
            self.engine = engine  # the old one's interpreters go with the last reference
            self._failures = 0
            self._last.clear()  # the old model's results are not the new one's

    def _loop(self) -> None:
        self._serve()
        if self._crash is not None:  # the supervisor sees this thread die of it
            raise CameraThreadError(self._crash)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.batcher.wait(self._stop, IDLE_WAIT_S)
            # A role held for long (a camera's thread inside a batch that hangs) is no
            # progress: the watchdog is fed only once this thread gets the role.
            if not self._claim(wait=True):
                continue
            released = False
            try:
                self.last_progress = time.monotonic()
                while not self._stop.is_set():
                    self._swap_engine()
                    if self._backlog() > MAX_BACKLOG:
                        # More labels than the broker takes: the next frames are classified
                        # once it caught up (for a file, read then too), none made to be lost.
                        # Waiting for the broker is no hang of ours: the watchdog is fed (a
                        # connection that died is paho's keepalive to find).
                        self._stop.wait(BACKLOG_WAIT_S)
                        self.last_progress = time.monotonic()
                        continue
                    items = self.batcher.next_batch(self._stop, idle_timeout=0.0)
                    if items:
                        self.run_batch(items)
                    elif self._release():
                        released = True
                        break
            finally:
                if not released:  # stopping, or an error on its way to the supervisor
                    self._release(force=True)

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
        self._batch_s += 0.2 * (inference_ms / 1000.0 - self._batch_s)
        # The size of the batch the crops ran in: 1 when they ran one by one.
        ran = engine.last_batch
        if fresh:
            self.stats.add_batch(ran, inference_ms, len(fresh))
        self.stats.reused += len(items) - len(fresh)
        tops: dict[int, tuple[postprocess.Class, ...]] = {}
        if fresh:
            ok, rows = self._finite(engine, fresh, scores)
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
    def _finite(
        engine: Engine, fresh: list[int], scores: postprocess.Scores
    ) -> tuple[list[int], postprocess.Scores]:
        """The crops whose scores are all finite numbers, and those scores."""
        if engine.output_bounded:  # integers: never NaN or infinity
            return fresh, scores
        finite = postprocess.finite_rows(scores)
        return [i for i, good in zip(fresh, finite, strict=True) if good], scores[finite]

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
