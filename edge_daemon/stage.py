"""A stage's thread that cannot die silently: what ended it is kept for the supervisor."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

#: prctl's option that names the calling thread (Linux), as ``top -H`` and ``ps -L`` show it.
_PR_SET_NAME = 15


def _libc() -> ctypes.CDLL | None:
    """The C library, as this process has it loaded already (the symbols the interpreter was
    linked with): no search for its file, which runs ``ldconfig -p`` in a child process (2 ms
    here, at import)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl  # noqa: B018 - present, or AttributeError
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the operating system too (the first 15 bytes), so
    ``top -H`` shows which stage spends the CPU. Nothing happens where that is not possible."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class StageThread(threading.Thread):
    """A named daemon thread running one stage's loop.

    An exception that escapes the loop is logged with its traceback and kept in
    :attr:`error`; the supervisor sees the thread dead while the daemon still runs and stops
    it with a non-zero exit, so systemd restarts it.
    """

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._loop = target
        #: Why the loop ended, when an exception ended it: ``"Type: message"``.
        self.error: str | None = None

    def run(self) -> None:
        """Run the loop; keep what ended it."""
        name_os_thread(self.name)
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported, whatever ended the stage
            self.error = f"{type(exc).__name__}: {exc}"
            log.critical(
                "the %s thread died: %s\n%s", self.name, self.error, traceback.format_exc()
            )

    def death(self) -> str | None:
        """Why the thread ended when it should not have (None while it runs)."""
        if self.is_alive() or self.ident is None:
            return None
        return self.error or "its loop returned"
