"""The control topic: JSON commands on ``<prefix>/cmd``, validated, answered, never fatal.

Commands (JSON Schema: ``schemas/cmd.v1.json``)::

    {"cmd": "pause", "camera": "door"}        stop classifying a camera (it keeps reading)
    {"cmd": "resume", "camera": "door"}
    {"cmd": "threshold", "value": 0.7}        change EDGE_INFERENCE__THRESHOLD until restart
    {"cmd": "snapshot", "camera": "door"}     publish its latest frame as JPEG on <camera>/snapshot
    {"cmd": "status"}                         publish stats now

An optional ``"id"`` is echoed in the reply on ``<prefix>/cmd/result``. Anything else is
rejected with a warning and a reply saying why; nothing a message says can stop the daemon.
A flood of bad messages is not echoed back as a flood of replies: rejections are answered at
most ``REJECT_REPLIES_PER_S`` a second (after a burst of ``REJECT_REPLY_BURST``), the rest are
only counted.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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
    value: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Snapshot(_Command):
    """Publish a camera's latest frame as JPEG."""

    cmd: Literal["snapshot"]
    camera: _Camera


class Status(_Command):
    """Publish statistics now."""

    cmd: Literal["status"]


Command = Annotated[Pause | Resume | Threshold | Snapshot | Status, Field(discriminator="cmd")]
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
    """Command messages from paho's thread, waiting for the supervisor; bounded, oldest dropped."""

    def __init__(self, size: int = 64) -> None:
        self._queue: collections.deque[bytes] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.received = 0
        #: Messages dropped unread because more arrived than the daemon handles (a flood).
        self.dropped = 0

    def put(self, payload: bytes) -> None:
        """Called from paho's network thread: only store it."""
        with self._lock:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(payload)
            self.received += 1

    def drain(self) -> list[bytes]:
        """Everything waiting, oldest first."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        return items


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
