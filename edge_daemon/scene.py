"""The state stage: each region's predictions become stable states, events and snapshots.

Per camera region a :class:`~edge_daemon.state.Tracker` confirms states. Each change is
published once: the retained ``<camera>/<roi>/state`` (QoS 1), an ``end`` event for the state
that ended and a ``start`` event for a non-null one that began (on ``events``), and a retained
JPEG on ``<camera>/<roi>/snapshot`` of the frame that confirmed it.

After a restart nothing is announced until the retained states have been read back from the
broker (:meth:`Publisher.recall`). A region whose first state equals its retained one goes on
with it: the state is published again with its old ``since`` and ``previous``, and no event,
so nobody sees a change that did not happen. An event's ``id`` comes from the region and its
start, so the ``end`` sent after a restart pairs with the ``start`` sent before it.

:meth:`StateStage.observe` runs on the inference thread, :meth:`restore` and :meth:`recalled`
on paho's, :meth:`poll` (which encodes snapshots, off the inference thread) on the
supervisor's; one lock keeps them apart.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import cv2

from edge_daemon import snapshot
from edge_daemon.batcher import Item
from edge_daemon.capture import Frame
from edge_daemon.control import RateLimit
from edge_daemon.prediction import VERSION, EncodeError, Prediction, encode, iso_utc
from edge_daemon.publisher import Publisher
from edge_daemon.settings import Settings
from edge_daemon.state import Change, Observation, Thresholds, Tracker, trackers
from edge_daemon.state_settings import RegionStateSettings

log = logging.getLogger(__name__)

#: What a snapshot of a region where nothing is recognised says.
NONE_TEXT = "none"


@dataclass(frozen=True, slots=True)
class Known:
    """A state as published (or read back from the broker after a restart)."""

    label: str | None
    since: float
    #: ``since`` as published: an event's id is made from it, so it must survive a restart
    #: exactly (parsing the text back and formatting it again could move it a millisecond).
    since_text: str
    previous: str | None
    #: The best score of the state so far.
    best: float


@dataclass(slots=True)
class Pending:
    """A snapshot to send when the region's interval allows."""

    frame: Frame
    box: tuple[int, int, int, int]
    label: str | None
    score: float


@dataclass(slots=True)
class Region:
    """One camera region's state machine and what was published for it."""

    camera: str
    roi: str
    tracker: Tracker
    thresholds: Thresholds
    known: Known | None = None
    #: A change confirmed before the retained states were read back, with its frame and box.
    held: tuple[Change, Frame, tuple[int, int, int, int]] | None = None
    snapshot: Pending | None = None
    next_snapshot: float = 0.0
    #: The state's best score while it holds.
    best: float = 0.0


def _parse_state(payload: bytes) -> Known | None:
    """A retained state as this daemon wrote it, or None for anything else (another version,
    another program, a hand-written message): labels are text or null, the score a number
    from 0 to 1, ``since`` an ISO time."""
    try:
        data = json.loads(payload)
        label, previous, score, since = (data[k] for k in ("label", "previous", "score", "since"))
        if not all(v is None or isinstance(v, str) for v in (label, previous)):
            return None
        if not isinstance(score, int | float) or isinstance(score, bool) or not 0 <= score <= 1:
            return None  # NaN and infinity fail the comparison too
        if not isinstance(since, str) or len(since) > 64:
            return None
        when = datetime.fromisoformat(since).timestamp()
    except (ValueError, TypeError, KeyError, OverflowError):
        return None
    return Known(label, when, since, previous, float(score))


class StateStage:
    """Turns predictions into published states, events and snapshots."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        regions: Mapping[str, list[str]],
        *,
        threshold: Callable[[], float],
        model: Callable[[], str],
        model_hash: Callable[[], str],
    ) -> None:
        self.settings = settings
        self._publisher = publisher
        self._model = model
        self._model_hash = model_hash
        own: dict[str, dict[str, RegionStateSettings | None]] = {
            camera: {
                roi: (
                    settings.cameras[camera].state.get(roi) if camera in settings.cameras else None
                )
                for roi in rois
            }
            for camera, rois in regions.items()
        }
        self.regions = {
            key: Region(key[0], key[1], tracker, thresholds)
            for key, (tracker, thresholds) in trackers(settings.state, own, threshold).items()
        }
        self._by_topic = {publisher.topic(c, r, "state"): (c, r) for (c, r) in self.regions}
        self._lock = threading.Lock()
        self._recalled = False
        self._snapshot_errors = RateLimit(rate=1 / 60, burst=1)
        self.changes = 0
        self.events = 0
        self.snapshots = 0
        self.snapshot_failures = 0

    # --- start-up: what the broker kept ----------------------------------------------------

    def recall_filter(self) -> str:
        """The topic filter of every region's retained state."""
        return self._publisher.topic("+", "+", "state")

    def restore(self, topic: str, payload: bytes) -> None:
        """A retained state read back from the broker (on paho's thread)."""
        key = self._by_topic.get(topic)
        if key is None or not payload:
            return
        known = _parse_state(payload)
        if known is None:
            log.warning("%s: the retained state is not one this daemon wrote; ignored", topic)
            return
        with self._lock:
            region = self.regions[key]
            if not self._recalled and region.known is None:
                region.known = known
                region.best = known.best

    def recalled(self) -> None:
        """Every retained state has been read back: announce what was held until now."""
        with self._lock:
            if self._recalled:
                return
            self._recalled = True
            for region in self.regions.values():
                if region.held is not None:
                    change, frame, box = region.held
                    region.held = None
                    self._apply(region, change, frame, box)

    def flush(self) -> None:
        """Send the snapshots still waiting for their interval (at stop: the retained snapshot
        must show the last state, not the one before)."""
        with self._lock:
            due = [(r, r.snapshot) for r in self.regions.values() if r.snapshot is not None]
            for region, _ in due:
                region.snapshot = None
        for region, pending in due:
            if pending is not None:
                self._send_snapshot(region, pending)

    # --- predictions -----------------------------------------------------------------------

    def observe(self, item: Item, prediction: Prediction) -> None:
        """One prediction of a region (on the inference thread)."""
        region = self.regions.get((item.camera, item.roi))
        if region is None:
            return
        top = prediction.top[0]
        observation = Observation(
            label=region.thresholds.candidate(top.label, top.score),
            score=top.score,
            frame=prediction.frame,
            wall=prediction.captured,
        )
        with self._lock:
            known = region.known
            if known is not None and observation.label == known.label:
                region.best = max(region.best, observation.score)
            change = region.tracker.observe(observation)
            if change is None:
                return
            if not self._recalled:
                region.held = (change, item.frame, item.box)
                return
            self._apply(region, change, item.frame, item.box)

    def _apply(
        self, region: Region, change: Change, frame: Frame, box: tuple[int, int, int, int]
    ) -> None:
        """Publish a confirmed state (under the lock)."""
        before = region.known
        if before is not None and before.label == change.label:
            # The first state after a restart is the one the broker kept: the same state, going
            # on. Said again, unchanged, with no event and no snapshot.
            region.best = max(region.best, change.best)
            region.known = Known(
                before.label, before.since, before.since_text, before.previous, region.best
            )
            self._publish_state(region, change, region.known)
            return
        now = change.since
        if before is not None and before.label is not None:
            self._publish_event("end", region, before, end=now)
        previous = before.label if before is not None else None
        region.best = change.best
        region.known = Known(
            change.label, change.since, iso_utc(change.since), previous, change.best
        )
        self.changes += 1
        self._publish_state(region, change, region.known)
        if change.label is not None:
            self._publish_event("start", region, region.known, end=None)
        if self.settings.snapshots.enabled:
            region.snapshot = Pending(frame, box, change.label, change.confirming.score)

    # --- messages --------------------------------------------------------------------------

    def _publish_state(self, region: Region, change: Change, known: Known) -> None:
        payload = {
            "v": VERSION,
            "device": self.settings.device_id,
            "camera": region.camera,
            "roi": region.roi,
            "label": known.label,
            "score": round(change.confirming.score, 6),
            "since": known.since_text,
            "frame": change.confirming.frame,
            "previous": known.previous,
            "model": self._model(),
            "model_hash": self._model_hash(),
        }
        try:
            body = encode(payload)
        except EncodeError:  # a score is always finite here; never publish what cannot parse
            log.exception("%s/%s: state not published", region.camera, region.roi)
            return
        self._publisher.publish_retained(
            self._publisher.topic(region.camera, region.roi, "state"), body
        )

    def _publish_event(self, kind: str, region: Region, state: Known, end: float | None) -> None:
        """A state's ``start`` (``end`` None) or ``end`` message."""
        payload = {
            "v": VERSION,
            "type": kind,
            "id": f"{region.camera}-{region.roi}-{re.sub(r'[^0-9]', '', state.since_text)[:17]}",
            "device": self.settings.device_id,
            "camera": region.camera,
            "roi": region.roi,
            "label": state.label,
            "start": state.since_text,
            "end": iso_utc(end) if end is not None else None,
            "duration_s": round(max(0.0, end - state.since), 3) if end is not None else None,
            "best_score": round(region.best, 6),
            "model": self._model(),
            "model_hash": self._model_hash(),
        }
        try:
            body = encode(payload)
        except EncodeError:  # scores are checked finite; never publish what cannot parse
            log.exception("%s/%s: event not published", region.camera, region.roi)
            return
        self.events += 1
        self._publisher.publish(self._publisher.topic("events"), body, qos=1, keep=True)

    # --- snapshots (on the supervisor's thread) ----------------------------------------------

    def poll(self) -> None:
        """Send the snapshots whose region's interval has passed."""
        now = time.monotonic()
        interval = self.settings.snapshots.min_interval_s
        due: list[tuple[Region, Pending]] = []
        with self._lock:
            for region in self.regions.values():
                if region.snapshot is not None and now >= region.next_snapshot:
                    due.append((region, region.snapshot))
                    region.snapshot = None
                    region.next_snapshot = now + interval
        for region, pending in due:
            self._send_snapshot(region, pending)

    def _send_snapshot(self, region: Region, pending: Pending) -> None:
        text = NONE_TEXT if pending.label is None else f"{pending.label} {pending.score:.0%}"
        try:
            jpeg = snapshot.render(
                pending.frame.image,
                pending.box,
                text,
                recognised=pending.label is not None,
                max_width=self.settings.snapshots.max_width,
                quality=self.settings.snapshots.quality,
            )
        except (cv2.error, ValueError) as exc:  # a frame that cannot be encoded
            self.snapshot_failures += 1
            log.log(
                logging.WARNING if self._snapshot_errors.allow() else logging.DEBUG,
                "%s/%s: snapshot not sent: %s",
                region.camera,
                region.roi,
                exc,
            )
            return
        self.snapshots += 1
        self._publisher.publish(
            self._publisher.topic(region.camera, region.roi, "snapshot"),
            jpeg,
            qos=1,
            retain=True,
            keep=True,
        )

    # --- statistics ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The ``state`` part of the ``stats`` message."""
        return {
            "changes": self.changes,
            "events": self.events,
            "snapshots": self.snapshots,
            "snapshot_failures": self.snapshot_failures,
        }
