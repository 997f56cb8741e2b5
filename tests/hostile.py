"""Sources that misbehave on purpose, on loopback: the cameras a careless or hostile world gives.

``SilentServer`` accepts TCP connections and never answers; ``StallingServer`` sends an HTTP
200 with MJPEG headers and then nothing. Both keep their connections open until ``stop()``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Self


class _HangingServer:
    """Accepts connections on a loopback port and holds them open; subclasses say what, if
    anything, is sent first."""

    greeting = b""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._connections: list[socket.socket] = []
        self._alive = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> Self:
        self._alive.set()
        self._thread.start()
        return self

    def _serve(self) -> None:
        while self._alive.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._connections.append(conn)
            if self.greeting:
                with contextlib.suppress(OSError):
                    conn.sendall(self.greeting)

    def stop(self) -> None:
        self._alive.clear()
        self._thread.join(2)
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.close()


class SilentServer(_HangingServer):
    """Accepts and never answers."""


class StallingServer(_HangingServer):
    """Answers with MJPEG headers and the start of a part, then stalls."""

    greeting = (
        b"HTTP/1.0 200 OK\r\n"
        b"Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
        b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 50000\r\n\r\n\xff\xd8\xff"
    )


@contextlib.contextmanager
def busy_cpus(count: int = 2) -> Iterator[None]:
    """``count`` processes spinning on the CPU, for as long as the block runs."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in burners:
            proc.kill()
            proc.wait(5)
