"""Video sources: what a setting names, opening it with OpenCV, and keeping secrets out of logs.

OpenCV's FFmpeg timeouts are passed when a source is opened (they are honoured only then).

OpenCV holds one process-wide lock around every FFmpeg open (``avformat_open_input`` and
``avformat_find_stream_info``), for FFmpeg versions that were not thread-safe. A source that
hangs until its open timeout then holds up every other camera's open: measured here, a healthy
stream opened 2 times in 30 s beside two hanging ones, 147 times alone. The FFmpeg that
OpenCV's wheels bundle is thread-safe, and OpenCV drops the lock when
``OPENCV_FFMPEG_IS_THREAD_SAFE`` is set; it is read at the first open, so setting it here is
in time. Set it to 0 in the environment to keep OpenCV's lock (e.g. an OpenCV built against an
old system FFmpeg).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import cv2

from edge_daemon.camera_settings import decoded_by_ffmpeg, source_kind
from edge_daemon.errors import CaptureError, ConfigError
from edge_daemon.settings import CameraSettings
from edge_daemon.threads import usable_cores

os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")


class VideoSource(Protocol):
    """What the camera needs of a capture: OpenCV's ``VideoCapture`` has all of it."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def read(self) -> tuple[bool, Any]: ...
    def grab(self) -> bool: ...
    def retrieve(self) -> tuple[bool, Any]: ...
    def get(self, prop: int) -> float: ...
    def set(self, prop: int, value: float) -> bool: ...
    def release(self) -> None: ...


Opener = Callable[[CameraSettings], VideoSource]


class OpenAhead:
    """An opener that has already started: each camera's source opens on a thread of its own
    at once, so a slow open (an RTSP handshake, a USB camera's set-up, FFmpeg probing a file)
    runs while the daemon loads its model. A camera's first open takes what was opened for it
    (or the error it met, raised as the opener would have); later opens call ``opener``.
    :meth:`close` releases what no camera took, now or when its open ends.
    """

    def __init__(self, opener: Opener, cameras: dict[str, CameraSettings]) -> None:
        self._opener = opener
        self._lock = threading.Lock()
        self._closed = False
        #: By camera settings (their identity: two cameras may name the same source).
        self._ahead: dict[int, Future[VideoSource]] = {}
        for name, settings in cameras.items():
            future: Future[VideoSource] = Future()
            self._ahead[id(settings)] = future
            threading.Thread(
                target=self._open, args=(settings, future), name=f"open-{name}", daemon=True
            ).start()

    def _open(self, settings: CameraSettings, future: Future[VideoSource]) -> None:
        try:
            capture = self._opener(settings)
        except BaseException as exc:  # noqa: BLE001 - handed to the camera's thread
            future.set_exception(exc)
            return
        with self._lock:
            keep = not self._closed
            if keep:
                future.set_result(capture)
        if not keep:
            capture.release()

    def __call__(self, settings: CameraSettings) -> VideoSource:
        with self._lock:
            future = self._ahead.pop(id(settings), None)
        if future is None:
            return self._opener(settings)
        return future.result()  # bounded as the open is: by its own timeouts

    def close(self) -> None:
        """Release every capture opened ahead that no camera took."""
        with self._lock:
            self._closed = True
            untaken = list(self._ahead.values())
            self._ahead.clear()
        for future in untaken:
            if future.done() and future.exception() is None:
                future.result().release()


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


#: ``scheme://`` then user information up to the last ``@`` before the host: passwords are
#: not always URL-encoded, so one may hold ``@``, ``:`` or ``/``; the user name may hold ``@``
#: too. All of it goes: redacting too much is the safe side.
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)(\S*)@", re.IGNORECASE)
#: A setting that is one URL: its password may even hold spaces.
_WHOLE_URL = re.compile(r"^(\s*[a-z][a-z0-9+.-]*://)(.*)@", re.IGNORECASE | re.DOTALL)
#: Query and pipeline parameters that carry secrets: ``password=``, ``access_token=``,
#: ``apikey=``, ``sig=``, GStreamer's ``user-pw=`` and the like (any prefix, e.g. ``x_token``).
_SECRET_PARAM = re.compile(
    r"([a-z0-9_.-]*(?:password|passwd|pwd|pass|user-pw|token|secret|key|auth|sig|signature"
    r"|credential)[a-z0-9_.-]*)=([^&\s!]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` (a source, or a message that holds one) with passwords replaced by ``***``."""
    if "!" not in text and _WHOLE_URL.match(text):
        text = _WHOLE_URL.sub(_hide_userinfo, text, count=1)
    return _SECRET_PARAM.sub(r"\1=***", _USERINFO.sub(_hide_userinfo, text))


def _hide_userinfo(match: re.Match[str]) -> str:
    """``scheme://user:***@`` when the user name is plain, else ``scheme://***@``."""
    user, colon, _ = match.group(2).partition(":")
    if colon and user and not any(c in user for c in "@/"):
        return f"{match.group(1)}{user}:***@"
    return f"{match.group(1)}***@"


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


def decoding_threads(cameras: int) -> int:
    """Threads for each of ``cameras`` decoded by FFmpeg: the cores this process may use but
    one, shared among them, at least one each (see :func:`decoding_shares`)."""
    return max(1, (usable_cores() - 1) // max(cameras, 1))


def decoding_shares(cameras: dict[str, CameraSettings]) -> dict[str, CameraSettings]:
    """``cameras`` with each FFmpeg-decoded camera's unset ``decode_threads`` filled in: the
    cores this process may use but one, shared among those cameras, at least one each.

    FFmpeg decodes on as many threads as there are cores by default, for each camera. Frame
    threading has a cost of its own (measured on 2 cores, 1280x720 H.264: 1,597 µs of CPU a
    frame on FFmpeg's threads against 1,406 on one), and with every core already decoding it
    only takes turns with inference. One core is left for inference and the rest of the
    daemon.
    """
    decoded = [name for name, camera in cameras.items() if decoded_by_ffmpeg(camera.source)]
    if not decoded:
        return cameras
    each = decoding_threads(len(decoded))
    return {
        name: camera.model_copy(update={"decode_threads": each})
        if name in decoded and camera.decode_threads is None
        else camera
        for name, camera in cameras.items()
    }


def _open_device(source: str, settings: CameraSettings) -> VideoSource:
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source, cv2.CAP_V4L2)
    if settings.fourcc:
        capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*settings.fourcc))
    if settings.width:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, settings.width)
    if settings.height:
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, settings.height)
    if settings.fps:
        capture.set(cv2.CAP_PROP_FPS, settings.fps)
    return capture


def open_source(settings: CameraSettings) -> VideoSource:
    """Open a source with OpenCV, passing timeouts and hints where the backend takes them."""
    source = settings.source.strip()
    kind = source_kind(source)
    # Unset when opened without the daemon sharing the cores out (``collect``): one camera's.
    threads = [cv2.CAP_PROP_N_THREADS, settings.decode_threads or decoding_threads(1)]
    if kind == "device":
        capture = _open_device(source, settings)
    elif kind == "gstreamer":
        if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise CaptureError(_NO_GSTREAMER)
        capture = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    elif kind == "stream":
        open_ms, read_ms = int(settings.open_timeout_s * 1000), int(settings.read_timeout_s * 1000)
        timeouts = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            open_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            read_ms,
        ]
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts + threads)
    elif "%" in source:
        capture = cv2.VideoCapture(source, cv2.CAP_ANY)
    else:
        if not Path(source).is_file():
            raise CaptureError(f"video file {redact(source)} does not exist")
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, threads)
    if not capture.isOpened():
        capture.release()
        raise CaptureError(f"cannot open {kind} {redact(source)}")
    return capture
