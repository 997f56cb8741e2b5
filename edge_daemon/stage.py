"""A stage's thread that cannot die silently: what ended it is kept for the supervisor."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)


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
