"""systemd's notify protocol in plain Python: READY, STATUS, WATCHDOG, STOPPING.

Messages are datagrams to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). Without
the variable (not run by systemd) every call does nothing. The watchdog interval comes from
``$WATCHDOG_USEC``; the daemon pings at half of it, and only when its inference loop has made
progress since the last ping, so a stuck daemon is killed and restarted.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd when it is listening."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when it could not be sent."""
        if not self.address:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto("\n".join(fields).encode("utf-8"), self.address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """The service is up: model loaded, capture started."""
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Tell the watchdog the service is alive and making progress."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """The service is shutting down."""
        return self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
