"""The control topic: JSON commands on ``<prefix>/cmd``, validated, answered, never fatal.

Commands (JSON Schema: ``schemas/cmd.v1.json``)::

    {"cmd": "pause", "camera": "door"}        stop classifying a camera (it keeps reading)
    {"cmd": "resume", "camera": "door"}
    {"cmd": "threshold", "value": 0.7}        change EDGE_INFERENCE__THRESHOLD until restart
    {"cmd": "snapshot", "camera": "door"}     publish its latest frame as JPEG on <camera>/snapshot
    {"cmd": "status"}                         publish stats now
    {"cmd": "reload"}                         load the model file again and swap it in; a second
                                              reply (same id) says whether it was taken

An optional ``"id"`` is echoed in the reply on ``<prefix>/cmd/result``. Anything else is
rejected with a warning and a reply saying why; nothing a message says can stop the daemon.

Floods are bounded at every step: a message larger than ``EDGE_CONTROL__MAX_PAYLOAD_BYTES`` is
dropped on arrival without being kept; the inbox holds at most 64 messages; each command kind
is carried out at most at its own rate (:data:`COMMAND_LIMITS`), the rest rejected; rejections
are answered at most ``REJECT_REPLIES_PER_S`` a second (after a burst of
``REJECT_REPLY_BURST``) and logged at most once a second, the rest only counted.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Literal

import cv2
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edge_daemon.prediction import encode

if TYPE_CHECKING:
    from edge_daemon.capture import Camera
    from edge_daemon.publisher import Publisher

log = logging.getLogger(__name__)

_Id = Annotated[str, Field(max_length=64)]
_Camera = Annotated[str, Field(min_length=1, max_length=64)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: _Id | None = None


class Pause(_Command):
    """Stop classifying a camera."""

    cmd: Literal["pause"]
    camera: _Camera


class Resume(_Command):
    """Classify a paused camera again."""

    cmd: Literal["resume"]
    camera: _Camera


class Threshold(_Command):
    """Change the score threshold below which labels are null."""

    cmd: Literal["threshold"]
    # Strict: "0.7" or true is a mistake to point out, not a value to coerce.
    value: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]


class Snapshot(_Command):
    """Publish a camera's latest frame as JPEG."""

    cmd: Literal["snapshot"]
    camera: _Camera


class Status(_Command):
    """Publish statistics now."""

    cmd: Literal["status"]


class Reload(_Command):
    """Load the model file again and swap it in, without stopping the cameras."""

    cmd: Literal["reload"]


Command = Annotated[
    Pause | Resume | Threshold | Snapshot | Status | Reload, Field(discriminator="cmd")
]
_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandError(ValueError):
    """A command message that is not valid; the message says why, without echoing it."""


def parse(payload: bytes, max_bytes: int) -> Command:
    """Validate one command message."""
    if len(payload) > max_bytes:
        raise CommandError(f"message of {len(payload)} bytes is larger than {max_bytes}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CommandError("not JSON") from None
    if not isinstance(data, dict):
        raise CommandError("not a JSON object")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise CommandError(f"{where}: {first['msg']}") from None


def command_schema() -> dict[str, object]:
    """The commands' JSON Schema."""
    return _ADAPTER.json_schema()


class Inbox:
    """Command messages from paho's thread, waiting for the supervisor; bounded, oldest dropped.

    A message over ``max_bytes`` is counted and not kept: a burst of large messages must not
    turn into memory held until the supervisor gets round to reading them.
    """

    def __init__(self, max_bytes: int, size: int = 64) -> None:
        self._queue: collections.deque[bytes] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.received = 0
        #: Messages dropped unread because more arrived than the daemon handles (a flood).
        self.dropped = 0
        #: Messages dropped on arrival for being larger than ``max_bytes``.
        self.oversize = 0
        self._oversize_seen = 0

    def put(self, payload: bytes) -> None:
        """Called from paho's network thread: only check the size and store it."""
        with self._lock:
            self.received += 1
            if len(payload) > self.max_bytes:
                self.oversize += 1
                return
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(payload)

    def pending(self) -> int:
        """Messages waiting."""
        with self._lock:
            return len(self._queue)

    def drain(self) -> list[bytes]:
        """Everything waiting, oldest first."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        return items

    def oversize_since_last_call(self) -> int:
        """Oversize messages dropped since this was last asked."""
        with self._lock:
            new = self.oversize - self._oversize_seen
            self._oversize_seen = self.oversize
        return new


#: Rejections answered on ``cmd/result`` per second, after a first burst; the rest are counted.
REJECT_REPLIES_PER_S = 5.0
REJECT_REPLY_BURST = 20


class RateLimit:
    """A token bucket: ``allow()`` is true at most ``rate`` times a second, after ``burst``."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def allow(self) -> bool:
        """Take a token if there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


#: How often each command kind is carried out at most: (per second, burst). A snapshot encodes
#: a JPEG and status builds the statistics: a flood of either must not eat the CPU.
COMMAND_LIMITS: Mapping[str, tuple[float, int]] = {
    "pause": (5.0, 10),
    "resume": (5.0, 10),
    "threshold": (5.0, 10),
    "snapshot": (1.0, 3),
    "status": (1.0, 3),
    # Loading a model takes a second of CPU or more.
    "reload": (0.1, 1),
}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once; None where there is no glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process has loaded
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> bool:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``).

    A burst of megabyte messages is read by paho into large buffers; once freed, glibc keeps
    them in its arenas, and the resident size stays high for good. False where there is no
    glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class Controller:
    """Carries out control messages from the inbox, on the supervisor's thread."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        publisher: Publisher,
        cameras: Mapping[str, Camera],
        set_threshold: Callable[[float], None],
        publish_stats: Callable[[], None],
        reload: Callable[[str | None], object] = lambda command_id: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self._publisher = publisher
        self._cameras = cameras
        self._set_threshold = set_threshold
        self._publish_stats = publish_stats
        self._reload = reload
        self._limits = {
            kind: RateLimit(rate, burst, clock) for kind, (rate, burst) in COMMAND_LIMITS.items()
        }
        self._reject_log = RateLimit(1.0, 1, clock)
        self._done_log = RateLimit(1.0, 5, clock)
        self._reject_reply = RateLimit(REJECT_REPLIES_PER_S, REJECT_REPLY_BURST, clock)
        self._trim = RateLimit(0.2, 1, clock)
        #: Oversize messages came since memory was last handed back: hand it back once the
        #: trim's rate allows (a burst's last messages too, not only its first).
        self._trim_due = False
        self.ok = 0
        self.rejected = 0
        #: Valid commands rejected because their kind came faster than its limit.
        self.limited = 0
        #: Rejected messages not answered on ``cmd/result`` because of a flood.
        self.unanswered = 0

    def poll(self) -> None:
        """Handle everything waiting in the inbox."""
        for payload in self.inbox.drain():
            self.handle(payload)
        if self.inbox.oversize_since_last_call():
            log.log(
                logging.WARNING if self._reject_log.allow() else logging.DEBUG,
                "dropped control messages over EDGE_CONTROL__MAX_PAYLOAD_BYTES=%d (%d so far)",
                self.inbox.max_bytes,
                self.inbox.oversize,
            )
            self._trim_due = True
        if self._trim_due and self._trim.allow():
            self._trim_due = False
            release_memory()

    def handle(self, payload: bytes) -> None:
        """Carry out one control message, or reject it; reply on ``cmd/result``."""
        command: Command | None = None
        try:
            command = parse(payload, self.inbox.max_bytes)
            if not self._limits[command.cmd].allow():
                self.limited += 1
                raise CommandError(
                    f"{command.cmd}: more than {COMMAND_LIMITS[command.cmd][0]:g} a second; "
                    "try again later"
                )
            self._execute(command)
        except CommandError as exc:
            self.rejected += 1
            # A flood of bad messages must flood neither the log nor the broker.
            log.log(
                logging.WARNING if self._reject_log.allow() else logging.DEBUG,
                "rejected a control message: %s (%d rejected so far)",
                exc,
                self.rejected,
            )
            if not self._reject_reply.allow():
                self.unanswered += 1
                return
            reply: dict[str, object] = {"ok": False, "error": str(exc)}
        else:
            self.ok += 1
            log.log(
                logging.INFO if self._done_log.allow() else logging.DEBUG,
                "control: %s done",
                command.cmd,
            )
            reply = {"ok": True, "cmd": command.cmd}
        if command is not None and command.id is not None:
            reply["id"] = command.id
        self._publisher.publish(
            self._publisher.topic("cmd", "result"), encode(reply), qos=1, keep=True
        )

    def _camera(self, name: str) -> Camera:
        camera = self._cameras.get(name)
        if camera is None:
            raise CommandError(f"camera: no camera named {name!r}")
        return camera

    def _execute(self, command: Command) -> None:
        if isinstance(command, Pause | Resume):
            self._camera(command.camera).paused = isinstance(command, Pause)
        elif isinstance(command, Threshold):
            self._set_threshold(command.value)
        elif isinstance(command, Snapshot):
            frame = self._camera(command.camera).latest()
            if frame is None:
                raise CommandError(f"camera: {command.camera} has no frame yet")
            ok, jpeg = cv2.imencode(".jpg", frame.image)
            if not ok:
                raise CommandError("snapshot: the frame could not be encoded")
            self._publisher.publish(
                self._publisher.topic(command.camera, "snapshot"), jpeg.tobytes(), qos=0, keep=True
            )
        elif isinstance(command, Reload):
            self._reload(command.id)
        else:
            self._publish_stats()

    def stats(self) -> dict[str, int]:
        """The ``control`` part of the ``stats`` message."""
        return {
            "ok": self.ok,
            "rejected": self.rejected,
            "limited": self.limited,
            "unanswered": self.unanswered,
            "dropped": self.inbox.dropped,
            "oversize": self.inbox.oversize,
        }
