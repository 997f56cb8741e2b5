"""The daemon: cameras -> batcher -> inference -> publisher, with start and stop.

Threads: one reader per camera, one inference thread (the only one to touch the interpreter),
paho's network thread and the publisher's sender. The main thread supervises: it marks stalled
cameras offline, publishes statistics and waits for a stop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from edge_daemon import control, homeassistant, postprocess
from edge_daemon.batcher import Batcher, Item
from edge_daemon.capture import Camera, Opener, open_source, redact, require_backends
from edge_daemon.engine import Engine
from edge_daemon.errors import DelegateError, EdgeDaemonError
from edge_daemon.manifest import read_labels
from edge_daemon.preprocess import preprocess_into
from edge_daemon.publisher import Publisher
from edge_daemon.settings import (
    SAMPLE_CLIP,
    CameraSettings,
    Roi,
    Settings,
    sample_camera_rois,
)
from edge_daemon.systemd import Notifier

log = logging.getLogger(__name__)

#: Batches that fail one after another before the model is loaded again.
MAX_CONSECUTIVE_FAILURES = 3


def iso_utc(wall: float) -> str:
    """A wall-clock time as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def sample_camera() -> dict[str, CameraSettings]:
    """The bundled sample clip as a camera, with the digit region from its sidecar."""
    rois = {name: Roi.parse(text) for name, text in sample_camera_rois().items()}
    return {"sample": CameraSettings(source=str(SAMPLE_CLIP), loop=True, rois=rois)}


def load_engine(settings: Settings) -> Engine:
    """Load the configured model; on the Edge TPU, fall back to a CPU model when one is set."""
    cfg = settings.model
    labels = read_labels(cfg.labels) if cfg.labels else None
    common: dict[str, object] = {
        "runtime": cfg.runtime,
        "num_threads": cfg.num_threads,
        "colour": cfg.colour,
        "scale": cfg.scale,
        "offset": cfg.offset,
    }
    if labels is not None:
        common["labels"] = labels
    if cfg.delegate == "edgetpu":
        try:
            return Engine.from_path(
                cfg.path,
                use_edgetpu=True,
                edgetpu_device=cfg.device,
                edgetpu_library=cfg.edgetpu_library,
                **common,
            )
        except DelegateError as exc:
            if cfg.fallback_path is None:
                raise
            log.warning("%s; running the fallback model %s on the CPU", exc, cfg.fallback_path)
            return Engine.from_path(cfg.fallback_path, **common)
    return Engine.from_path(cfg.path, **common)


@dataclass
class InferenceStats:
    """Counters of the inference thread."""

    batches: int = 0
    items: int = 0
    errors: int = 0
    inference_ms_total: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class Daemon:
    """Wires the stages together and owns their threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        opener: Opener = open_source,
        engine: Engine | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine or load_engine(settings)
        self.inbox = control.Inbox() if settings.control.enabled else None
        self.publisher = Publisher(settings, self.inbox)
        #: The score threshold; the control topic may change it at run time.
        self.threshold = settings.inference.threshold
        self.commands_ok = 0
        self.commands_rejected = 0
        #: Rejected messages not answered on ``cmd/result`` because of a flood.
        self.commands_unanswered = 0
        self._reject_log = control.RateLimit(rate=1.0, burst=1)
        self._reject_reply = control.RateLimit(
            control.REJECT_REPLIES_PER_S, control.REJECT_REPLY_BURST
        )
        cameras = settings.cameras or sample_camera()
        if opener is open_source:
            require_backends(cameras)
        self.using_sample = not settings.cameras
        self.cameras = [
            Camera(name, cam, opener=opener, on_status=self._camera_status, on_frame=self._notify)
            for name, cam in cameras.items()
        ]
        self.batcher = Batcher(
            self.cameras, settings.inference.max_batch, settings.inference.max_delay_ms / 1000.0
        )
        #: Home Assistant discovery configs (topic, payload); checked here, sent by ``start``.
        self._discovery = (
            homeassistant.discovery_messages(
                settings,
                {c.name: self.batcher.rois(c.name) for c in self.cameras},
                self.engine.name,
            )
            if settings.homeassistant.enabled
            else []
        )
        largest = max([settings.inference.max_batch, *(len(c.settings.rois) for c in self.cameras)])
        spec = self.engine.input_spec
        self._buffer = np.empty(
            (largest, spec.height, spec.width, spec.channels), dtype=np.dtype(spec.dtype)
        )
        self.stats = InferenceStats()
        self._stop = threading.Event()
        self._inference: threading.Thread | None = None
        self._started = time.monotonic()
        self.notifier = notifier or Notifier()
        #: When the inference loop last went round (the watchdog pings only after progress).
        self.last_progress = time.monotonic()
        #: Why the daemon gave up (the model could not be reloaded); None while healthy.
        self.fatal: EdgeDaemonError | None = None
        self._failures = 0
        self.reloads = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, start the cameras and the inference thread."""
        self._started = time.monotonic()
        for camera in self.cameras:
            self.publisher.publish_retained(self.publisher.topic(camera.name, "status"), b"offline")
        if self.settings.homeassistant.enabled:
            self._announce_to_home_assistant()
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
        self._inference = threading.Thread(
            target=self._inference_loop, name="inference", daemon=True
        )
        self._inference.start()

    def stop(self, flush_timeout: float = 2.5) -> None:
        """Stop capture, finish the batch in flight, publish ``offline``, flush, disconnect.

        Bounded: about a second for the threads, then ``flush_timeout`` for queued messages, so
        the whole stop fits in systemd's and the issue's 5 seconds.
        """
        self.notifier.stopping()
        for camera in self.cameras:
            camera.request_stop()
        self._stop.set()
        deadline = time.monotonic() + 1.0
        if self._inference is not None:
            self._inference.join(max(0.1, deadline - time.monotonic()))
        for camera in self.cameras:
            camera.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.publisher.stop(flush_timeout)
        self.notifier.close()

    def run(self, duration: float | None = None, stop: threading.Event | None = None) -> None:
        """Supervise until ``stop`` is set, ``duration`` seconds pass, or every file ended."""
        stop = stop or threading.Event()
        interval = self.settings.mqtt.stats_interval_s
        next_stats = time.monotonic() + interval if interval else float("inf")
        end = time.monotonic() + duration if duration else float("inf")
        ping_every = self.notifier.watchdog_s / 2 if self.notifier.watchdog_s else float("inf")
        next_ping = time.monotonic()
        pinged_progress = 0.0
        next_status = time.monotonic()
        self.notifier.ready(self.status_line())
        while not stop.is_set() and time.monotonic() < end and self.fatal is None:
            for camera in self.cameras:
                camera.check_stalled()
            if all(c.finished for c in self.cameras) and not self.batcher.pending():
                log.info("every source has ended")
                break
            now = time.monotonic()
            if now >= next_stats:
                self.publish_stats()
                next_stats = now + interval
            if now >= next_ping and self.last_progress > pinged_progress:
                # Only a loop that went round since the last ping earns a new one.
                self.notifier.watchdog()
                pinged_progress = self.last_progress
                next_ping = now + ping_every
            if self.inbox is not None:
                for payload in self.inbox.drain():
                    self.handle_command(payload)
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + 5.0
            stop.wait(0.2)

    def _announce_to_home_assistant(self) -> None:
        """Retained discovery configs, sent again whenever Home Assistant comes online."""
        configs = self._discovery
        for topic, payload in configs:
            self.publisher.publish_retained(topic, payload)

        # Anyone may publish there: a stream of "online" must not become a stream of configs.
        resend = control.RateLimit(rate=0.2, burst=2)

        def on_birth(payload: bytes) -> None:
            if payload.strip() == b"online" and resend.allow():
                log.info("Home Assistant is online: sending %d discovery configs", len(configs))
                for topic, config in configs:
                    self.publisher.publish(topic, config, qos=1, retain=True)

        self.publisher.watch(homeassistant.birth_topic(self.settings), on_birth)
        log.info(
            "Home Assistant discovery: %d sensors under %s",
            len(configs),
            self.settings.homeassistant.discovery_prefix,
        )

    # --- callbacks -------------------------------------------------------------------------

    def _notify(self) -> None:
        self.batcher.notify()

    def _camera_status(self, name: str, online: bool, why: str) -> None:
        del why
        self.publisher.publish_retained(
            self.publisher.topic(name, "status"), b"online" if online else b"offline"
        )

    # --- inference thread ------------------------------------------------------------------

    def _inference_loop(self) -> None:
        while True:
            self.last_progress = time.monotonic()
            items = self.batcher.next_batch(self._stop)
            if not items:
                if self._stop.is_set():
                    return
                continue
            self._run_batch(items)

    def _run_batch(self, items: list[Item]) -> None:
        spec = self.engine.input_spec
        n = len(items)
        batch = self._buffer[:n]
        for slot, item in zip(batch, items, strict=True):
            preprocess_into(item.crop, spec, slot)
        started = time.perf_counter()
        try:
            scores = self.engine.scores(batch)
        except Exception:
            self.stats.errors += 1
            self._failures += 1
            log.exception("inference failed on a batch of %d; dropped it", n)
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                self._reload_engine()
            return
        self._failures = 0
        inference_ms = (time.perf_counter() - started) * 1000.0
        self.stats.batches += 1
        self.stats.items += n
        self.stats.inference_ms_total += inference_ms
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        self._publish_predictions(items, scores, inference_ms)

    def _reload_engine(self) -> None:
        log.warning("%d batches in a row failed: reloading the model", self._failures)
        try:
            self.engine = load_engine(self.settings)
        except EdgeDaemonError as exc:
            log.error("cannot reload the model: %s; stopping so systemd restarts us", exc)  # noqa: TRY400
            self.fatal = exc
            self._stop.set()
            return
        self.reloads += 1
        self._failures = 0

    def handle_command(self, payload: bytes) -> None:
        """Carry out one control message, or reject it; reply on ``cmd/result``."""
        command: control.Command | None = None
        try:
            command = control.parse(payload, self.settings.control.max_payload_bytes)
            self._execute(command)
        except control.CommandError as exc:
            self.commands_rejected += 1
            # A flood of bad messages must flood neither the log nor the broker.
            log.log(
                logging.WARNING if self._reject_log.allow() else logging.DEBUG,
                "rejected a control message: %s (%d rejected so far)",
                exc,
                self.commands_rejected,
            )
            if not self._reject_reply.allow():
                self.commands_unanswered += 1
                return
            reply: dict[str, object] = {"ok": False, "error": str(exc)}
        else:
            self.commands_ok += 1
            log.info("control: %s done", command.cmd)
            reply = {"ok": True, "cmd": command.cmd}
        if command is not None and command.id is not None:
            reply["id"] = command.id
        self.publisher.publish(
            self.publisher.topic("cmd", "result"), json.dumps(reply).encode(), qos=1
        )

    def _camera(self, name: str) -> Camera:
        for camera in self.cameras:
            if camera.name == name:
                return camera
        raise control.CommandError(f"camera: no camera named {name!r}")

    def _execute(self, command: control.Command) -> None:
        if isinstance(command, control.Pause | control.Resume):
            self._camera(command.camera).paused = isinstance(command, control.Pause)
        elif isinstance(command, control.Threshold):
            self.threshold = command.value
        elif isinstance(command, control.Snapshot):
            frame = self._camera(command.camera).latest()
            if frame is None:
                raise control.CommandError(f"camera: {command.camera} has no frame yet")
            ok, jpeg = cv2.imencode(".jpg", frame.image)
            if not ok:
                raise control.CommandError("snapshot: the frame could not be encoded")
            self.publisher.publish(
                self.publisher.topic(command.camera, "snapshot"), jpeg.tobytes(), qos=0
            )
        else:
            self.publish_stats()

    def status_line(self) -> str:
        """A one-line status: frames per second, labels, broker state (for systemd)."""
        uptime = max(time.monotonic() - self._started, 1e-3)
        fps = sum(c.frames_read for c in self.cameras) / uptime
        online = sum(c.online for c in self.cameras)
        broker = "connected" if self.publisher.connected else "disconnected"
        return (
            f"{fps:.1f} frames/s from {online}/{len(self.cameras)} cameras, "
            f"{self.stats.items} labels, broker {broker}, queue {self.publisher.queued}, "
            f"dropped {self.publisher.dropped}"
        )

    def _publish_predictions(
        self, items: list[Item], scores: postprocess.Scores, inference_ms: float
    ) -> None:
        cfg = self.settings.inference
        labels = self.engine.labels
        for item, row in zip(items, scores, strict=True):
            top = postprocess.top_k(row, labels, cfg.top_k)
            best = top[0]
            payload = {
                "v": 1,
                "device": self.settings.device_id,
                "camera": item.camera,
                "roi": item.roi,
                "frame": item.frame.number,
                "ts": iso_utc(item.frame.wall),
                "label": best.label if best.score >= self.threshold else None,
                "score": round(best.score, 6),
                "top": [{"label": c.label, "score": round(c.score, 6)} for c in top],
                "model": self.engine.name,
                "latency_ms": round((time.monotonic() - item.frame.monotonic) * 1000.0, 3),
                "inference_ms": round(inference_ms, 3),
                "batch": len(items),
            }
            self.publisher.publish(
                self.publisher.topic(item.camera, item.roi, "label"),
                json.dumps(payload, separators=(",", ":")).encode(),
            )

    # --- statistics ------------------------------------------------------------------------

    def stats_payload(self) -> dict[str, object]:
        """The ``stats`` message."""
        uptime = time.monotonic() - self._started
        s = self.stats
        payload: dict[str, object] = {
            "v": 1,
            "device": self.settings.device_id,
            "ts": iso_utc(time.time()),
            "uptime_s": round(uptime, 3),
            "model": self.engine.name,
            "runtime": self.engine.runtime.name,
            "cameras": {
                c.name: {
                    "online": c.online,
                    "fps": round(c.frames_read / max(uptime, 1e-3), 3),
                    "frames": c.frames_read,
                    "skipped": c.frames_skipped,
                    "reopens": c.reopens,
                }
                for c in self.cameras
            },
            "inference": {
                "batches": s.batches,
                "items": s.items,
                "mean_batch": round(s.items / s.batches, 3) if s.batches else 0.0,
                "mean_inference_ms": round(s.inference_ms_total / s.batches, 3)
                if s.batches
                else 0.0,
                "errors": s.errors,
            },
            "mqtt": {
                "connected": self.publisher.connected,
                "queued": self.publisher.queued,
                "sent": self.publisher.sent,
                "dropped": self.publisher.dropped,
            },
        }
        if self.inbox is not None:
            payload["control"] = {
                "ok": self.commands_ok,
                "rejected": self.commands_rejected,
                "unanswered": self.commands_unanswered,
                "dropped": self.inbox.dropped,
            }
        return payload

    def publish_stats(self) -> None:
        """Publish the ``stats`` message (QoS 0: the next one supersedes it)."""
        self.publisher.publish(
            self.publisher.topic("stats"), json.dumps(self.stats_payload()).encode(), qos=0
        )


def model_summary(engine: Engine) -> str:
    """One line about the loaded model, for logs and ``check``."""
    spec = engine.input_spec
    return (
        f"{engine.name} ({Path(engine.model_path).name}, {engine.runtime.name}): "
        f"{spec.height}x{spec.width}x{spec.channels} {spec.colour} {spec.dtype}, "
        f"{len(engine.labels)} classes, batch {'dynamic' if spec.dynamic_batch else '1'}"
    )
