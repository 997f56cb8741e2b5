"""Finding a broker to talk to, or starting a private mosquitto (demo and tests; no root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
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


class PrivateBroker:
    """A mosquitto started for us on a free loopback port, with its own configuration.

    ``kill()`` and ``relaunch()`` take it down and bring it back on the same port with the same
    configuration (and, with persistence on, the same saved sessions): a broker restart.
    """

    def __init__(self, exe: str, port: int, folder: tempfile.TemporaryDirectory[str]) -> None:
        self.exe = exe
        self.port = port
        self.host = "127.0.0.1"
        self.folder = folder
        self.config = Path(folder.name) / "mosquitto.conf"
        self.log_path = Path(folder.name) / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, startup_timeout: float = 10.0) -> None:
        """Start the process and wait until it listens."""
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [self.exe, "-c", str(self.config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.log_path.read_text(errors="replace").strip().splitlines()
                raise PublishError(f"mosquitto exited at start: {output[-1] if output else '?'}")
            if listening("127.0.0.1", self.port, 0.2):
                return
            time.sleep(0.05)
        self.kill()
        raise PublishError(
            f"mosquitto did not listen on port {self.port} within {startup_timeout:g} s"
        )

    relaunch = launch

    def kill(self) -> None:
        """Stop the process (it saves its state when persistence is on); keep the files."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def stop(self) -> None:
        """Stop the broker and remove its files."""
        self.kill()
        self.folder.cleanup()

    def __enter__(self) -> PrivateBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    port: int | None = None, extra_config: str = "", startup_timeout: float = 10.0
) -> PrivateBroker:
    """Start a private mosquitto listening on ``127.0.0.1:port`` (a free one by default).

    ``extra_config`` is appended to the configuration; ``{dir}`` in it names the broker's own
    folder (for password files, certificates, persistence).
    """
    exe = mosquitto_binary()
    if exe is None:
        raise PublishError(
            "mosquitto is not installed: install it ('sudo apt-get install "
            "mosquitto') or point EDGE_MQTT__HOST at a broker"
        )
    folder = tempfile.TemporaryDirectory(prefix="edge-mosquitto-")
    broker = PrivateBroker(exe, port or free_port(), folder)
    extra = extra_config.replace("{dir}", folder.name)
    base = ""
    if "\nlistener " not in f"\n{extra}":
        base += f"listener {broker.port} 127.0.0.1\n"
    if "persistence " not in extra:
        base += "persistence false\n"
    if "allow_anonymous" not in extra and "password_file" not in extra:
        base += "allow_anonymous true\n"
    if os.geteuid() == 0 and "\nuser " not in f"\n{extra}":
        # Started as root, mosquitto drops to user 'mosquitto', which cannot read files in
        # our private folders; stay the user who started it.
        base += "user root\n"
    broker.config.write_text(base + extra)
    try:
        broker.launch(startup_timeout)
    except PublishError:
        broker.folder.cleanup()
        raise
    return broker
