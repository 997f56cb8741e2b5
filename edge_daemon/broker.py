"""Finding a broker to talk to, or starting a private mosquitto (demo and tests; no root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_daemon.errors import PublishError

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """The mosquitto executable, if installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)


@dataclass
class PrivateBroker:
    """A mosquitto started for us on a free loopback port, with its own configuration."""

    port: int
    process: subprocess.Popen[bytes]
    folder: tempfile.TemporaryDirectory[str]
    host: str = "127.0.0.1"

    def stop(self) -> None:
        """Stop the broker and remove its files."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.folder.cleanup()

    def __enter__(self) -> PrivateBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    port: int | None = None, extra_config: str = "", startup_timeout: float = 10.0
) -> PrivateBroker:
    """Start a private mosquitto listening on ``127.0.0.1:port`` (a free one by default)."""
    exe = mosquitto_binary()
    if exe is None:
        raise PublishError(
            "mosquitto is not installed: install it ('sudo apt-get install "
            "mosquitto') or point EDGE_MQTT__HOST at a broker"
        )
    port = port or free_port()
    folder = tempfile.TemporaryDirectory(prefix="edge-mosquitto-")
    config = Path(folder.name) / "mosquitto.conf"
    base = f"listener {port} 127.0.0.1\npersistence false\n"
    if "allow_anonymous" not in extra_config and "password_file" not in extra_config:
        base += "allow_anonymous true\n"
    if os.geteuid() == 0 and "\nuser " not in f"\n{extra_config}":
        # Started as root, mosquitto drops to user 'mosquitto', which cannot read files in
        # our private folders; stay the user who started it.
        base += "user root\n"
    config.write_text(base + extra_config)
    log_path = Path(folder.name) / "mosquitto.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [exe, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    broker = PrivateBroker(port, process, folder)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(errors="replace").strip().splitlines()
            broker.stop()
            raise PublishError(f"mosquitto exited at start: {output[-1] if output else '?'}")
        if listening("127.0.0.1", port, 0.2):
            return broker
        time.sleep(0.05)
    broker.stop()
    raise PublishError(f"mosquitto did not listen on port {port} within {startup_timeout:g} s")
