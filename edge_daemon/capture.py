"""Cameras: open a source, read it on a thread, keep only the freshest frame, reconnect.

One :class:`Camera` per source. Its reader thread reads continuously and overwrites a single
slot, so a slow inference never makes latency or memory grow. A source that fails to open, stops
delivering, or ends is closed and reopened with jittered exponential backoff; other cameras are
not affected. OpenCV's FFmpeg timeouts are passed when the source is opened (they are honoured
only then), and the daemon also watches each camera from outside, since a read can still block.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from edge_daemon.backoff import Backoff
from edge_daemon.errors import CaptureError, ConfigError
from edge_daemon.preprocess import Frame as Image
from edge_daemon.settings import CameraSettings

log = logging.getLogger(__name__)

SourceKind = Literal["device", "file", "stream", "gstreamer"]
_STREAM = re.compile(r"^(rtsps?|https?|rtmp|udp|tcp|srt)://", re.IGNORECASE)
_DEVICE = re.compile(r"^(\d+|/dev/video\d+)$")
#: Failed reads in a row after which a live source counts as gone and is reopened.
MAX_BAD_READS = 25


class VideoSource(Protocol):
    """What the camera needs of a capture: OpenCV's ``VideoCapture`` has all of it."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def read(self) -> tuple[bool, Any]: ...
    def get(self, prop: int) -> float: ...
    def set(self, prop: int, value: float) -> bool: ...
    def release(self) -> None: ...


Opener = Callable[[CameraSettings], VideoSource]


def quiet_opencv(debug: bool) -> None:
    """Keep OpenCV's own warnings (e.g. "backend is generally available but can't be used to
    capture by name" on every reopen) out of the log unless ``--debug`` or OPENCV_LOG_LEVEL
    asks for them: the camera's own log lines say the same, with the camera's name."""
    if debug or "OPENCV_LOG_LEVEL" in os.environ:
        return
    try:  # OpenCV 5
        from cv2.utils import logging as cv_logging  # noqa: PLC0415

        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_ERROR)
    except ImportError:  # OpenCV 4 (its stubs are not the ones type-checked here)
        getattr(cv2, "setLogLevel")(2)  # noqa: B009 - errors only


def source_kind(source: str) -> SourceKind:
    """What kind of source a setting names."""
    if _DEVICE.match(source.strip()):
        return "device"
    if _STREAM.match(source.strip()):
        return "stream"
    if "!" in source:
        return "gstreamer"
    return "file"


#: ``scheme://user:`` then everything up to the last ``@`` of that word: passwords are not
#: always URL-encoded, so one may hold ``@`` or ``/``. Redacting too much is the safe side.
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)\S*@", re.IGNORECASE)
#: ``password=...`` in a query string, and GStreamer's ``user-pw=...`` property.
_SECRET_PARAM = re.compile(
    r"\b(password|passwd|pwd|pass|user-pw|token|secret|key)=([^&\s!]+)", re.IGNORECASE
)


def redact(text: str) -> str:
    """``text`` (a source, or a message that holds one) with passwords replaced by ``***``."""
    return _SECRET_PARAM.sub(r"\1=***", _USERINFO.sub(r"\1***@", text))


_NO_GSTREAMER = (
    "this OpenCV is built without GStreamer (the opencv-python-headless wheel from PyPI is), "
    "so a pipeline cannot be opened: give an rtsp:// or http:// URL or a device instead, or "
    "run the daemon on an OpenCV built with GStreamer"
)


def require_backends(cameras: dict[str, CameraSettings]) -> None:
    """Refuse, naming each variable, sources that this OpenCV build can never open."""
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        return
    problems = [
        f"EDGE_CAMERAS__{name}__SOURCE: {_NO_GSTREAMER}"
        for name, camera in cameras.items()
        if source_kind(camera.source) == "gstreamer"
    ]
    if problems:
        raise ConfigError(problems[0], problems)


def open_source(settings: CameraSettings) -> VideoSource:
    """Open a source with OpenCV, passing timeouts and hints where the backend takes them."""
    source = settings.source.strip()
    kind = source_kind(source)
    open_ms, read_ms = int(settings.open_timeout_s * 1000), int(settings.read_timeout_s * 1000)
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms]
    if kind == "device":
        target: int | str = int(source) if source.isdigit() else source
        capture = cv2.VideoCapture(target, cv2.CAP_V4L2)
        if settings.fourcc:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*settings.fourcc))
        if settings.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, settings.width)
        if settings.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, settings.height)
        if settings.fps:
            capture.set(cv2.CAP_PROP_FPS, settings.fps)
    elif kind == "gstreamer":
        if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise CaptureError(_NO_GSTREAMER)
        capture = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    elif kind == "stream":
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
    else:
        path = Path(source)
        if "%" not in source and not path.is_file():
            raise CaptureError(f"video file {redact(source)} does not exist")
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG if "%" not in source else cv2.CAP_ANY)
    if not capture.isOpened():
        capture.release()
        raise CaptureError(f"cannot open {kind} {redact(source)}")
    return capture


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as captured: the image, the source's frame number, and when it was read."""

    image: Image
    number: int
    monotonic: float
    wall: float


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
        self._frame: Frame | None = None
        self._seq = 0
        self._taken = 0
        self._online = False
        self._finished = False
        self._last_frame_at = 0.0
        #: Paused cameras keep reading (so a resume is instant) but give no frames to batches.
        self.paused = False
        self.frames_read = 0
        self.frames_skipped = 0
        self.reopens = 0
        #: Why the source last failed to open, said once until it changes or frames arrive.
        self._open_failure = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread."""
        if self._thread is not None:
            raise RuntimeError(f"camera {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the reader to stop, without waiting for it."""
        self._stop.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading; the thread ends once its current read returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def online(self) -> bool:
        """True while the source delivers frames."""
        return self._online

    @property
    def finished(self) -> bool:
        """True once a file that does not loop has ended."""
        return self._finished

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
            return self._frame

    def last_frame_age(self) -> float:
        """Seconds since the last frame (infinite before the first)."""
        if not self._last_frame_at:
            return float("inf")
        return time.monotonic() - self._last_frame_at

    def check_stalled(self) -> None:
        """Called from outside the reader: mark the camera offline when frames stopped."""
        if self._online and self.last_frame_age() > self.settings.read_timeout_s:
            self._set_online(False, f"no frame for {self.settings.read_timeout_s:g} s")

    # --- reader thread ---------------------------------------------------------------------

    def _set_online(self, online: bool, why: str) -> None:
        if online == self._online:
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
        min_gap = 1.0 / self.settings.fps if self.settings.fps else 0.0
        counter = 0
        failures = 0
        last_good = time.monotonic()
        last_kept = -1e9
        next_due = time.monotonic()
        while not self._stop.is_set():
            position = int(capture.get(cv2.CAP_PROP_POS_FRAMES)) if is_file else counter
            ok, image = capture.read()
            now = time.monotonic()
            if not ok or image is None:
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
            last_good = now
            counter += 1
            self._backoff.reset()
            self._last_frame_at = now
            if pace:
                next_due += pace
                delay = next_due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_due = time.monotonic()
            if min_gap and now - last_kept < min_gap * 0.98:
                self.frames_skipped += 1
                continue
            last_kept = now
            self._publish(
                Frame(np.ascontiguousarray(image), position, time.monotonic(), time.time())
            )
        return "stopped"

    def _publish(self, frame: Frame) -> None:
        with self._lock:
            self._frame = frame
            self._seq += 1
        self.frames_read += 1
        self._last_frame_at = frame.monotonic
        self._open_failure = ""
        self._set_online(True, "frames arriving")
        self._on_frame()
