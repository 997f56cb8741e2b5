"""The daemon: wires cameras -> batcher -> inference -> publisher, starts, supervises, stops.

Each stage is its own unit: :mod:`capture` (one reader thread per camera), :mod:`batcher`,
:mod:`inference` (one thread at a time touches the interpreter), :mod:`publisher` (paho's
network thread and a sender), :mod:`control` (commands, on the supervisor's thread) and
:mod:`stats`. The supervisor (the thread that calls :meth:`Daemon.run`) watches them: a stage
whose thread died stops the daemon with a non-zero exit, and the systemd watchdog is fed only
while inference makes progress.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from edge_daemon import control, homeassistant
from edge_daemon.batcher import Batcher, Item, Prepared
from edge_daemon.capture import Camera
from edge_daemon.engine import Engine, load_engine
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.inference import InferenceStage
from edge_daemon.prediction import EncodeError, Prediction, encode
from edge_daemon.preprocess import Image
from edge_daemon.publisher import Publisher
from edge_daemon.reload import Reloader
from edge_daemon.scene import StateStage
from edge_daemon.settings import Settings, sample_camera
from edge_daemon.sources import (
    OpenAhead,
    Opener,
    decoding_shares,
    open_source,
    redact,
    require_backends,
)
from edge_daemon.stats import InferenceStats, stats_payload, status_line
from edge_daemon.systemd import Notifier

log = logging.getLogger(__name__)


class StageError(EdgeDaemonError):
    """A stage's thread ended while the daemon was running (exit 1: systemd restarts us)."""


class Daemon:
    """Wires the stages together, starts them, supervises them and stops them."""

    def __init__(
        self,
        settings: Settings,
        *,
        opener: Opener = open_source,
        engine: Engine | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        cameras = decoding_shares(settings.cameras or sample_camera())
        if opener is open_source:
            require_backends(cameras)
        # The sources open while the model loads; the cameras take them when they start.
        self._ahead = OpenAhead(opener, cameras)
        try:
            engine = engine or load_engine(settings)
        except BaseException:
            self._ahead.close()
            raise
        self.using_sample = not settings.cameras
        inbox = (
            control.Inbox(settings.control.max_payload_bytes) if settings.control.enabled else None
        )
        self.publisher = Publisher(settings, inbox)
        self.cameras = [
            Camera(
                name,
                cam,
                opener=self._ahead,
                on_status=self._camera_status,
                on_frame=functools.partial(self._frame_ready, name),
            )
            for name, cam in cameras.items()
        ]
        self._camera = {camera.name: camera for camera in self.cameras}
        self.batcher = Batcher(
            self.cameras, settings.inference.max_batch, settings.inference.max_delay_ms / 1000.0
        )
        self.inference = InferenceStage(
            settings.inference,
            settings.device_id,
            self.batcher,
            engine=engine,
            emit=self._publish_prediction,
            reload=lambda: load_engine(settings),
            backlog=self.publisher.backlog,
        )
        self.reloader = Reloader(
            settings,
            load=lambda: load_engine(settings),
            install=self.inference.offer_engine,
            current=lambda: self.inference.latest_engine,
            report=self._reload_report,
        )
        for camera in self.cameras:
            camera.prepare = functools.partial(self._prepare, camera.name)
        regions = {c.name: self.batcher.rois(c.name) for c in self.cameras}
        self.states = StateStage(
            settings,
            self.publisher,
            regions,
            threshold=lambda: self.inference.threshold,
            model=lambda: self.engine.name,
            model_hash=lambda: self.engine.digest,
        )
        self._labels = settings.mqtt.labels == "every"
        self.controller = (
            control.Controller(
                inbox,
                publisher=self.publisher,
                cameras={c.name: c for c in self.cameras},
                set_threshold=self.inference.set_threshold,
                publish_stats=self.publish_stats,
                reload=lambda command_id: self.reloader.request("the reload command", command_id),
            )
            if inbox is not None
            else None
        )
        #: Home Assistant discovery configs (topic, payload); checked here, sent by ``start``.
        self._discovery = (
            homeassistant.discovery_messages(settings, regions, self.engine.name)
            if settings.homeassistant.enabled
            else []
        )
        self._started = time.monotonic()
        self.notifier = notifier or Notifier()
        #: Why the daemon gave up; None while healthy.
        self.fatal: EdgeDaemonError | None = None
        self._unencodable = control.RateLimit(rate=1 / 60, burst=1)
        #: Label topics by camera and region, made once.
        self._label_topics: dict[tuple[str, str], str] = {}

    # --- what the stages own, for the supervisor, statistics and tests ---------------------

    @property
    def engine(self) -> Engine:
        """The loaded model (a reload replaces it)."""
        return self.inference.engine

    @property
    def stats(self) -> InferenceStats:
        """The inference stage's counters."""
        return self.inference.stats

    @property
    def reloads(self) -> int:
        """Times the model was loaded again after failing batches."""
        return self.inference.reloads

    @property
    def inbox(self) -> control.Inbox | None:
        """Control messages waiting (None when the control topic is off)."""
        return self.controller.inbox if self.controller is not None else None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, start the cameras and the inference thread."""
        self._started = time.monotonic()
        for camera in self.cameras:
            self.publisher.publish_retained(self.publisher.topic(camera.name, "status"), b"offline")
        filters = [self.states.recall_filter()]
        if self.settings.homeassistant.enabled:
            homeassistant.announce(self.publisher, self.settings, self._discovery)
            filters.append(homeassistant.recall_filter(self.settings))
        self.publisher.recall(filters, self._recalled_message, self._recalled)
        self.publisher.start()
        for camera in self.cameras:
            log.info(
                "camera %s: %s %s, regions %s",
                camera.name,
                camera.kind,
                redact(camera.settings.source),
                ", ".join(self.batcher.rois(camera.name)),
            )
            camera.start()
        self.inference.start()

    def stop(self, flush_timeout: float = 2.5) -> None:
        """Stop capture, finish the batch in flight, publish ``offline``, flush, disconnect.

        Bounded: about a second for the threads, then ``flush_timeout`` for queued messages, so
        the whole stop fits in systemd's and the issue's 5 seconds. A camera still inside
        OpenCV (a read that has not timed out) is left to finish on its own: its capture is
        released by its own thread, never from here.
        """
        self.notifier.stopping()
        for camera in self.cameras:
            camera.request_stop()
        self.inference.request_stop()
        deadline = time.monotonic() + 1.0
        if self.inference.thread.ident is not None:
            self.inference.thread.join(max(0.1, deadline - time.monotonic()))
        for camera in self.cameras:
            camera.stop(timeout=max(0.0, deadline - time.monotonic()))
        self._ahead.close()  # a camera stopped before its thread took its source
        self.states.flush()  # the last change's snapshot, even within its interval
        self.publisher.stop(flush_timeout)
        self.notifier.close()

    def stuck_threads(self) -> list[str]:
        """Names of stage threads still running after :meth:`stop` (inside native code)."""
        threads = [c.thread for c in self.cameras] + [self.inference.thread]
        return [t.name for t in threads if t is not None and t.is_alive()]

    def run(
        self,
        duration: float | None = None,
        stop: threading.Event | None = None,
        reload: threading.Event | None = None,
    ) -> None:
        """Supervise until ``stop`` is set, ``duration`` seconds pass, every file ended, or a
        stage died (then :attr:`fatal` says why). ``reload`` set (SIGHUP) loads the model
        again."""
        stop = stop or threading.Event()
        reload = reload or threading.Event()
        interval = self.settings.mqtt.stats_interval_s
        next_stats = time.monotonic() + interval if interval else float("inf")
        end = time.monotonic() + duration if duration else float("inf")
        ping_every = self.notifier.watchdog_s / 2 if self.notifier.watchdog_s else float("inf")
        next_ping = time.monotonic()
        pinged_progress = 0.0
        next_status = time.monotonic()
        self.notifier.ready(self.status_line())
        while not stop.is_set() and time.monotonic() < end:
            self.fatal = self.fatal or self._dead_stage()
            if self.fatal is not None:
                return
            for camera in self.cameras:
                camera.check_stalled()
            # Held states wait for the retained ones to be read back (bounded by the recall's
            # timeout) before a run whose files have all ended can finish.
            recalling = self.publisher.recalling and self.publisher.connected
            if (
                all(c.finished for c in self.cameras)
                and not self.batcher.pending()
                and not recalling
            ):
                log.info("every source has ended")
                break
            now = time.monotonic()
            if now >= next_stats:
                self.publish_stats()
                next_stats = now + interval
            progress = self.inference.last_progress
            if now >= next_ping and progress > pinged_progress:
                # Only a loop that went round since the last ping earns a new one.
                self.notifier.watchdog()
                pinged_progress = progress
                next_ping = now + ping_every
            if self.controller is not None:
                self.controller.poll()
            self.publisher.poll_recall()
            self.states.poll()
            if reload.is_set():
                reload.clear()
                self.reloader.request("SIGHUP")
            self.reloader.poll()
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + 5.0
            stop.wait(0.2)

    def _dead_stage(self) -> EdgeDaemonError | None:
        """Why the daemon cannot go on: the model failed for good, or a stage's thread died."""
        if self.inference.fatal is not None:
            return self.inference.fatal
        deaths = [(self.inference.thread.name, self.inference.thread.death())]
        deaths += [(c.name, c.death()) for c in self.cameras]
        deaths += self.publisher.deaths()
        for name, why in deaths:
            if why is not None:
                log.critical("stage %s died (%s): stopping so systemd restarts us", name, why)
                return StageError(f"the {name} thread died ({why})")
        return None

    # --- callbacks -------------------------------------------------------------------------

    def _frame_ready(self, camera: str) -> None:
        """On a camera's thread, once it offered a frame."""
        self.inference.frame_ready(self._camera[camera])

    def _prepare(self, camera: str, image: Image) -> Prepared | None:
        """On a camera's thread: its regions shaped for the model that will run them."""
        return self.batcher.prepare(camera, image, self.inference.latest_engine)

    def _camera_status(self, name: str, online: bool, why: str) -> None:
        del why
        self.publisher.publish_retained(
            self.publisher.topic(name, "status"), b"online" if online else b"offline"
        )

    def _recalled_message(self, topic: str, payload: bytes) -> None:
        """A retained message read back at start (on paho's thread)."""
        if self.settings.homeassistant.enabled and homeassistant.is_config(self.settings, topic):
            homeassistant.remove_stale(
                self.publisher, self.settings, self._discovery, topic, payload
            )
        else:
            self.states.restore(topic, payload)

    def _recalled(self) -> None:
        self.states.recalled()

    def _reload_report(self, command_id: str | None, ok: bool, text: str, engine: Engine) -> None:
        """A reload's outcome on ``cmd/result`` (when the control topic is on): the model that
        runs from now on."""
        if self.controller is None:
            return
        reply: dict[str, object] = {"ok": ok, "cmd": "reload", "model": engine.name}
        reply["model_hash"] = engine.digest
        if not ok:
            reply["error"] = text
        if command_id is not None:
            reply["id"] = command_id
        self.publisher.publish(self.publisher.topic("cmd", "result"), encode(reply), keep=True)

    def _publish_prediction(self, item: Item, prediction: Prediction) -> None:
        """On the inference thread: the region's state, and a label message when per-frame
        labels are on (never NaN or Infinity in it)."""
        self.states.observe(item, prediction)
        if not self._labels:
            return
        try:
            payload = prediction.to_json()
        except EncodeError as exc:
            self.stats.invalid += 1
            log.log(
                logging.WARNING if self._unencodable.allow() else logging.DEBUG,
                "%s/%s: prediction dropped, %s",
                prediction.camera,
                prediction.roi,
                exc,
            )
            return
        key = (prediction.camera, prediction.roi)
        topic = self._label_topics.get(key)
        if topic is None:
            topic = self._label_topics[key] = self.publisher.topic(*key, "label")
        self.publisher.publish(topic, payload)

    # --- status and statistics -------------------------------------------------------------

    def status_line(self) -> str:
        """A one-line status for systemd."""
        return status_line(self._started, self.cameras, self.stats, self.publisher)

    def stats_payload(self) -> dict[str, Any]:
        """The ``stats`` message."""
        return stats_payload(
            device=self.settings.device_id,
            started=self._started,
            model=self.engine.name,
            model_hash=self.engine.digest,
            runtime=self.engine.runtime.name,
            cameras=self.cameras,
            inference=self.stats,
            publisher=self.publisher,
            control=self.controller.stats() if self.controller is not None else None,
            state=self.states.stats(),
            reloads={"done": self.reloader.done, "failed": self.reloader.failed},
        )

    def publish_stats(self) -> None:
        """Publish the ``stats`` message (QoS 0: the next one supersedes it)."""
        self.publisher.publish(self.publisher.topic("stats"), encode(self.stats_payload()), qos=0)
