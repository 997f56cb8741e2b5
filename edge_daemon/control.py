"""The control topic: JSON commands on ``<prefix>/cmd``, validated, answered, never fatal.

Commands (JSON Schema: ``schemas/cmd.v1.json``)::

    {"cmd": "pause", "camera": "door"}        stop classifying a camera (it keeps reading)
    {"cmd": "resume", "camera": "door"}
    {"cmd": "threshold", "value": 0.7}        change EDGE_INFERENCE__THRESHOLD until restart
    {"cmd": "snapshot", "camera": "door"}     publish its latest frame as JPEG on <camera>/snapshot
    {"cmd": "status"}                         publish stats now

An optional ``"id"`` is echoed in the reply on ``<prefix>/cmd/result``. Anything else is
rejected with a warning and a reply saying why; nothing a message says can stop the daemon.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
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
