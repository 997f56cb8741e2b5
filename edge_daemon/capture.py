"""Cameras: read a source on a thread, keep only the freshest frame, reconnect.

One :class:`Camera` per source. Its reader thread grabs every frame of a live source, so a slow
inference never makes latency or memory grow, and retrieves one only when it will be used: the
last one was taken and the FPS cap allows it. A frame only grabbed costs no colour conversion
or copy (and for a device sending MJPEG, no JPEG decode; FFmpeg sources still decode on grab).
A file read as fast as it decodes is pulled instead: its next frame is read once the last one
was taken. A source that fails to open,
stops delivering, or ends is closed and reopened with jittered exponential backoff, by its own
thread, independently of every other camera. The capture belongs to that thread alone: it opens
it, reads it and releases it, so no other thread can release a capture a read is inside. The
daemon also watches each camera from outside, since a read can still block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from edge_daemon.backoff import Backoff
from edge_daemon.camera_settings import source_kind
from edge_daemon.errors import CaptureError
from edge_daemon.preprocess import Image, as_image
from edge_daemon.settings import CameraSettings
from edge_daemon.sources import Opener, VideoSource, open_source, redact
from edge_daemon.stage import StageThread

log = logging.getLogger(__name__)

#: Failed reads in a row after which a live source counts as gone and is reopened.
MAX_BAD_READS = 25

#: A pause up to this long between two frames of a paced file is a plain sleep.
SHORT_SLEEP_S = 0.05

#: The clock files played in real time keep time by, shared by every camera.
_BEAT_EPOCH = time.monotonic()


def on_the_beat(pace: float) -> float:
    """When a file played at one frame every ``pace`` seconds shows its second frame (the
    first is shown at once): the next tick, from now, of a clock shared by all such files.
    Recordings played side by side stay in step, so their frames arrive together and are
    classified together (one wake-up of the threads for all of them, not one each)."""
    now = time.monotonic()
    if pace <= 0:
        return now
    return _BEAT_EPOCH + -(-(now - _BEAT_EPOCH) // pace) * pace


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as captured: the image, the source's frame number, and when it was read."""

    image: Image
    number: int
    monotonic: float
    wall: float
    #: What the camera's ``prepare`` made of the image on its own thread (the regions shaped
    #: for the model), if anything.
    prepared: object = None


class Camera:
    """A source read on its own thread, its freshest frame, and its health."""

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        *,
        on_frame: Callable[[], None] = lambda: None,
        on_status: Callable[[str, bool, str], None] = lambda name, online, why: None,
        opener: Opener = open_source,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.kind = source_kind(settings.source)
        self._on_frame = on_frame
        self._on_status = on_status
        self._opener = opener
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._lock = threading.Lock()
        #: Signalled when a frame is taken: a pulled file reads its next one.
        self._taken_cond = threading.Condition(self._lock)
        self._status_lock = threading.Lock()
        self._frame: Frame | None = None
        self._seq = 0
        self._taken = 0
        self._online = False
        self._finished = False
        self._last_frame_at = 0.0
        #: Paused cameras keep reading (so a resume is instant) but give no frames to batches.
        self.paused = False
        #: Work done on each kept frame on this camera's thread (the daemon shapes the regions
        #: for the model here, beside inference instead of in its way).
        self.prepare: Callable[[Image], object] | None = None
        #: Seconds between frames of the source, smoothed.
        self._interval = 0.1
        #: True while the source is a file read as fast as it decodes, frame by frame as they
        #: are taken (see ``_read_loop``).
        self.pulled = False
        #: Times a pulled file's next frame was decoded before its last one was taken (its
        #: thread then waits for the take: inference is the slower).
        self.take_waits = 0
        self.frames_read = 0
        self.frames_skipped = 0
        self.reopens = 0
        #: Why the source last failed to open, said once until it changes or frames arrive.
        self._open_failure = ""
        self._stop = threading.Event()
        #: The reader thread, once started.
        self.thread: StageThread | None = None

    # --- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread."""
        if self.thread is not None:
            raise RuntimeError(f"camera {self.name} already started")
        self.thread = StageThread(f"camera-{self.name}", self._run)
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the reader to stop, without waiting for it."""
        self._stop.set()
        with self._lock:
            self._taken_cond.notify_all()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading; the thread ends once its current read returns."""
        self.request_stop()
        if self.thread is not None:
            self.thread.join(timeout)

    def death(self) -> str | None:
        """Why the reader thread ended while it should still run (None while all is well)."""
        if self.thread is None or self._stop.is_set() or self._finished:
            return None
        return self.thread.death()

    @property
    def online(self) -> bool:
        """True while the source delivers frames."""
        return self._online

    @property
    def finished(self) -> bool:
        """True once a file that does not loop has ended."""
        return self._finished

    @property
    def interval(self) -> float:
        """Seconds between the source's frames, smoothed (0.1 before any arrived)."""
        return self._interval

    def has_new(self) -> bool:
        """True when a frame arrived that has not been taken yet (never while paused)."""
        return self._seq != self._taken and not self.paused

    def latest(self) -> Frame | None:
        """The freshest frame, taken or not (for snapshots)."""
        with self._lock:
            return self._frame

    def take(self) -> Frame | None:
        """The freshest frame not taken before, or None."""
        with self._lock:
            if self._seq == self._taken or self._frame is None:
                return None
            self._taken = self._seq
            self._taken_cond.notify_all()
            return self._frame

    def last_frame_age(self) -> float:
        """Seconds since the last frame (infinite before the first)."""
        if not self._last_frame_at:
            return float("inf")
        return time.monotonic() - self._last_frame_at

    def check_stalled(self) -> None:
        """Called from outside the reader: mark the camera offline when frames stopped."""
        timeout = self.settings.read_timeout_s
        # The age is checked again under the lock: a frame may just have brought it online.
        self._set_online(
            False, f"no frame for {timeout:g} s", unless=lambda: self.last_frame_age() <= timeout
        )

    # --- reader thread ---------------------------------------------------------------------

    def _set_online(
        self, online: bool, why: str, unless: Callable[[], bool] = lambda: False
    ) -> None:
        """Change the camera's status and publish it, unless it already is that (or
        ``unless()``); under a lock, since the reader and the supervisor both call this."""
        with self._status_lock:
            if online == self._online or unless():
                return
            self._online = online
            why = redact(why)
            if online:
                log.info("camera %s online (%s)", self.name, why)
            elif self._stop.is_set() or self._finished:
                log.info("camera %s offline: %s", self.name, why)
            else:
                log.warning("camera %s offline: %s", self.name, why)
            self._on_status(self.name, online, why)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                capture = self._opener(self.settings)
            except CaptureError as exc:
                self._set_online(False, str(exc))
                delay = self._backoff.next()
                if str(exc) != self._open_failure:
                    # A camera that never came online says why, once per new reason.
                    self._open_failure = str(exc)
                    log.warning(
                        "camera %s: %s; retrying (next in %.1f s, backing off to %g s)",
                        self.name,
                        redact(str(exc)),
                        delay,
                        self._backoff.maximum,
                    )
                self._wait(delay, f"{exc}")
                continue
            except Exception as exc:
                log.exception("camera %s: unexpected error opening the source", self.name)
                self._set_online(False, f"{type(exc).__name__}: {exc}")
                self._wait(self._backoff.next(), "unexpected error")
                continue
            try:
                why = self._read_loop(capture)
            except Exception as exc:
                log.exception("camera %s: unexpected error reading the source", self.name)
                why = f"{type(exc).__name__}: {exc}"
            finally:
                capture.release()
            if self._finished or self._stop.is_set():
                self._set_online(False, why)
                return
            self.reopens += 1
            self._set_online(False, why)
            self._wait(self._backoff.next(), why)

    def _wait(self, delay: float, why: str) -> None:
        log.debug("camera %s: retrying in %.1f s (%s)", self.name, delay, redact(why))
        self._stop.wait(delay)

    def _read_loop(self, capture: VideoSource) -> str:
        is_file = self.kind == "file"
        file_fps = capture.get(cv2.CAP_PROP_FPS) if is_file else 0.0
        pace = 1.0 / file_fps if is_file and self.settings.realtime and 0 < file_fps < 1000 else 0
        # A file read as fast as it decodes is pulled: the next frame is decoded while the last
        # one waits to be taken, and kept (retrieved: converted and copied) only once it was.
        # One frame ahead at most, so none is decoded to be thrown away, and the decoding
        # overlaps the hand-over instead of waiting for it (workload 2 of ``make bench``: 4-17%
        # more labels a second with 720p H.264 files).
        pull = is_file and not pace
        self.pulled = pull
        min_gap = 1.0 / self.settings.fps if self.settings.fps else 0.0
        counter = 0
        failures = 0
        last_good = time.monotonic()
        last_kept = -1e9
        next_due = 0.0
        while not self._stop.is_set():
            if pull and self.paused:  # one frame a second (or the FPS cap's slower pace)
                self._stop.wait(max(0.0, max(min_gap, 1.0) - (time.monotonic() - last_kept)))
            if pace:
                # The first frame at once, as a camera's first is; the rest on the beat.
                next_due = self._pace(next_due, pace) if counter else on_the_beat(pace)
            ok = capture.grab()
            if pull and not self._wait_until_taken():
                break
            now = time.monotonic()
            image = None
            wanted = ok and self._wanted(now - last_kept, min_gap)
            if wanted:
                # Decided after the grab, at the last moment: only a frame that will be used
                # is retrieved (colour conversion and copy; for MJPEG the JPEG decode too).
                ok, image = capture.retrieve()
            if not ok or (wanted and image is None):
                if is_file and counter > 0 and self.settings.loop:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    if int(capture.get(cv2.CAP_PROP_POS_FRAMES)) != 0:
                        return "end of file (seeking back failed)"
                    counter = 0
                    continue
                if is_file and counter > 0:
                    self._finished = True
                    return "end of file"
                failures += 1
                # A frame that fails to decode is skipped; only a run of failures, or none
                # good for the read timeout, means the source is gone.
                if (
                    not is_file
                    and failures < MAX_BAD_READS
                    and now - last_good < self.settings.read_timeout_s
                ):
                    self._stop.wait(0.01)
                    continue
                return "the source stopped delivering frames"
            failures = 0
            # The source's frame interval, smoothed (for when an untaken frame is stale).
            self._interval += 0.1 * (min(now - last_good, 1.0) - self._interval)
            last_good = now
            counter += 1
            self._backoff.reset()
            self._alive(now)  # a grabbed frame shows the source is there, retrieved or not
            if not wanted:
                self.frames_skipped += 1
                continue
            last_kept = now
            # The frame's number: those grabbed before it since the source opened (for a
            # file, since it seeked to 0 too).
            self.offer(self._kept(image, counter - 1, now))
        return "stopped"

    def _pace(self, due: float, pace: float) -> float:
        """Wait until ``due`` (a paced file's next frame); when the one after is due."""
        delay = due - time.monotonic()
        if delay > SHORT_SLEEP_S:
            self._stop.wait(delay)
        elif delay > 0:
            time.sleep(delay)  # cheaper than an event's wait, and as short a stop
        return max(due + pace, time.monotonic() - pace)

    def _kept(self, image: object, position: int, grabbed: float) -> Frame:
        """A kept frame, with what ``prepare`` makes of it on this thread."""
        kept = as_image(np.ascontiguousarray(image))
        prepared = self.prepare(kept) if self.prepare is not None else None
        return Frame(kept, position, grabbed, time.time(), prepared)

    def _wanted(self, since_kept: float, min_gap: float) -> bool:
        """Whether the frame just grabbed is to be retrieved: the FPS cap allows it and the
        last one was taken (a frame that would only replace an untaken one is never used). A
        paused camera keeps one a second, for snapshots."""
        if self.paused:
            return since_kept >= max(min_gap, 1.0)
        if min_gap and since_kept < min_gap * 0.98:
            return False
        # An untaken frame is replaced once it is older than two frame intervals (inference
        # slower than the source): what is classified next is never much older than that.
        return self._seq == self._taken or since_kept >= 2 * self._interval

    def _wait_until_taken(self) -> bool:
        """Block until the last frame offered was taken (or the camera paused); False on stop.
        Waiting for inference is no stall: the frame clock is kept fresh meanwhile."""
        with self._lock:
            if self._seq != self._taken and not self.paused:
                self.take_waits += 1
            while self._seq != self._taken and not self.paused:
                if self._stop.is_set():
                    return False
                self._last_frame_at = time.monotonic()
                self._taken_cond.wait(0.2)
        return not self._stop.is_set()

    def offer(self, frame: Frame) -> None:
        """Make ``frame`` the freshest (the reader thread hands each kept frame over here)."""
        with self._lock:
            self._frame = frame
            self._seq += 1
        self.frames_read += 1
        self._alive(frame.monotonic)
        self._on_frame()

    def _alive(self, at: float) -> None:
        """A frame arrived at ``at``: the source is online."""
        self._last_frame_at = at
        self._open_failure = ""
        if not self._online:
            self._set_online(True, "frames arriving")
