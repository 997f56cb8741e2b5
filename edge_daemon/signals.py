"""Stopping on SIGTERM and SIGINT, reloading the model on SIGHUP, without taking a lock in
the signal handler."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("edge_daemon")


def stop_on_signals(
    stop: threading.Event, reload: threading.Event | None = None
) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop``, SIGHUP sets ``reload`` (when given); returns what
    undoes this.

    The handler itself takes no lock. A Python signal handler runs in the main thread between
    two of its bytecodes, which may be inside ``stop.wait()`` holding the event's lock (or
    inside ``threading`` holding one of its own): setting the event there deadlocked, and 1
    stop in 30 never ended. The signal's number goes down the wakeup file descriptor instead
    (written by the interpreter's C handler), and a thread of ours reads it and sets ``stop``.
    The handler writes the number too (``os.write`` takes no lock), in case something else
    took the wakeup descriptor over since; the thread ignores the second copy.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        with contextlib.suppress(OSError):  # full, or closed by undo(): nothing to add
            os.write(writer.fileno(), bytes([signum]))

    def watch() -> None:
        while data := reader.recv(64):
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT) and not stop.is_set():
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    stop.set()
                elif signum == signal.SIGHUP and reload is not None:
                    log.info("received SIGHUP, reloading the model")
                    reload.set()

    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if reload is not None else [])
    handlers = {signum: signal.signal(signum, handler) for signum in signals}
    watcher = threading.Thread(target=watch, name="signals", daemon=True)
    watcher.start()

    def undo() -> None:
        for signum, old in handlers.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(previous)
        writer.close()  # the watcher reads the end and returns
        watcher.join(1.0)
        reader.close()

    return undo
