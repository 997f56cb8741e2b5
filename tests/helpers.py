"""Test helpers: a subscriber on the real broker, an MJPEG server on loopback, daemons."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.broker import free_port
from edge_daemon.config import load_settings
from edge_daemon.pipeline import Daemon
from edge_daemon.publisher import close_client
from edge_daemon.settings import Settings

BROKER = ("127.0.0.1", 1883)


def schema(name: str) -> dict[str, Any]:
    text = resources.files("edge_daemon").joinpath("schemas", name).read_text()
    return dict(json.loads(text))


PREDICTION = schema("prediction.v1.json")
STATS = schema("stats.v1.json")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def unique_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A real MQTT client collecting what arrives under a prefix."""

    host: str
    port: int
    prefix: str
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: mqtt.Client | None = None
    #: A persistent session: the broker keeps QoS 1 messages for us while we are away.
    persistent: bool = False
    #: Topic filters under the prefix.
    topics: tuple[str, ...] = ("#",)

    def start(self) -> Subscriber:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            clean_session=not self.persistent,
        )
        client.reconnect_delay_set(1, 2)
        ready = threading.Event()

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe([(f"{self.prefix}/{t}", 1) for t in self.topics])

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
            ready.set()

        def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append(
                    Received(m.topic, bytes(m.payload), bool(m.retain), time.monotonic())
                )

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(self.host, self.port)
        client.loop_start()
        assert ready.wait(10), "subscriber could not subscribe"
        self.client = client
        return self

    def stop(self) -> None:
        if self.client is not None:
            close_client(self.client)
            self.client = None

    def topic(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def on(self, *parts: str) -> list[Received]:
        topic = self.topic(*parts)
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def labels(self, camera: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            msgs = [m for m in self.messages if m.topic.endswith("/label")]
        out = [m.json() for m in msgs]
        return [p for p in out if camera is None or p["camera"] == camera]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        return wait_until(predicate, timeout)

    def validate_all(self) -> int:
        """Validate every label and stats message against the published schemas."""
        with self.lock:
            msgs = list(self.messages)
        count = 0
        for m in msgs:
            if m.topic.endswith("/label"):
                jsonschema.validate(m.json(), PREDICTION)
                count += 1
            elif m.topic.endswith("/stats"):
                jsonschema.validate(m.json(), STATS)
                count += 1
        return count


@contextlib.contextmanager
def subscriber(
    prefix: str,
    host: str = BROKER[0],
    port: int = BROKER[1],
    persistent: bool = False,
    topics: tuple[str, ...] = ("#",),
) -> Iterator[Subscriber]:
    sub = Subscriber(host, port, prefix, persistent=persistent, topics=topics).start()
    try:
        yield sub
    finally:
        sub.stop()


def settings_for(prefix: str, **overrides: Any) -> Settings:
    mqtt_cfg = {
        "host": BROKER[0],
        "port": BROKER[1],
        "topic_prefix": prefix,
        "stats_interval_s": 1.0,
        "client_id": f"test-{uuid.uuid4().hex[:8]}",
    }
    mqtt_cfg.update(overrides.pop("mqtt", {}))
    return load_settings(mqtt=mqtt_cfg, device_id="testbox", **overrides)


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    stop = threading.Event()
    supervisor = threading.Thread(target=daemon.run, kwargs={"stop": stop}, daemon=True)
    supervisor.start()
    try:
        yield daemon
    finally:
        stop.set()
        supervisor.join(5)
        daemon.stop()


# --- a live MJPEG stream on loopback -----------------------------------------------------------


class MjpegServer:
    """``multipart/x-mixed-replace`` JPEG frames over HTTP, as IP cameras serve them.

    ``stop()`` closes the listener and every open connection; ``start()`` serves again on the
    same port, so a test can kill a stream mid-run and bring it back.
    """

    def __init__(
        self, frames: list[np.ndarray], fps: float = 20.0, port: int = 0, corrupt_every: int = 0
    ) -> None:
        self.frames = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        if corrupt_every:
            # Parts that claim to be JPEG but do not decode, as a failing encoder sends them.
            for i in range(1, len(self.frames), corrupt_every):
                jpg = self.frames[i]
                self.frames[i] = jpg[:20] + bytes(len(jpg) - 20)
        #: Cleared: connections stay open but nothing is sent (a stream that stalls).
        self.sending = threading.Event()
        self.sending.set()
        self.fps = fps
        self.port = port
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: list[socket.socket] = []
        self._alive = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> MjpegServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._connections.append(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while outer._alive.is_set():
                        if not outer.sending.is_set():
                            time.sleep(0.05)
                            continue
                        jpg = outer.frames[i % len(outer.frames)]
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            + f"Content-Length: {len(jpg)}\r\n\r\n".encode()
                            + jpg
                            + b"\r\n"
                        )
                        i += 1
                        time.sleep(1.0 / outer.fps)
                except OSError:
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._alive.set()
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._alive.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._connections.clear()


#: Debian's Python, which has the GStreamer RTSP server bindings (see tests/rtsp_server.py).
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good"


class RtspServer:
    """An RTSP camera on loopback: ``tests/rtsp_server.py`` in its own process.

    ``stop()`` kills it (as a camera that loses power); ``start()`` serves again on the port;
    ``hang()`` stops and restarts the frames while the connection stays up.
    """

    def __init__(self, folder: Path, frames: list[np.ndarray], fps: int = 15) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            cv2.imwrite(str(folder / f"{i:04d}.jpg"), frame)
        self.folder = folder
        self.fps = fps
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> RtspServer:
        script = Path(__file__).with_name("rtsp_server.py")
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
            capture_output=True,
            check=False,
        )
        assert probe.returncode == 0, f"the RTSP tests need: apt-get install {RTSP_PACKAGES}"
        args = ["--port", str(self.port), "--frames", str(self.folder), "--fps", str(self.fps)]
        # Output to a file: a pipe nobody reads could fill and stall the server.
        log = self.folder / "server.log"
        with log.open("w") as out:
            self._proc = subprocess.Popen(
                [SYSTEM_PYTHON, str(script), *args], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while "ready " not in log.read_text():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"RTSP server did not start: {log.read_text()}")
            time.sleep(0.05)
        return self

    def hang(self) -> None:
        """Stop sending frames, or send them again; connections stay open."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.communicate()
            self._proc = None


def digit_frames(count: int = 20, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Frames of random noise digits-ish blobs (content does not matter for stream tests)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        frame = np.full((size, size, 3), 20, np.uint8)
        cv2.circle(
            frame, tuple(int(v) for v in rng.integers(20, size - 20, 2)), 15, (255, 255, 255), -1
        )
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


# --- the daemon as a process -----------------------------------------------------------------


def daemon_env(**variables: str) -> dict[str, str]:
    """This process's environment without any ``EDGE_`` variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(variables)
    return env


def run_daemon(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m edge_daemon ARGS`` to the end, with ``env`` over :func:`daemon_env`."""
    return subprocess.run(
        [sys.executable, "-m", "edge_daemon", *args],
        capture_output=True,
        text=True,
        env=daemon_env(**(env or {})),
        timeout=timeout,
        check=False,
    )


def spawn_daemon(
    *args: str, env: Mapping[str, str], stdout: int | None = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``python -m edge_daemon ARGS`` in the background (stderr piped), ``env`` as above."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", *args],
        env=daemon_env(**env),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


class FakeCapture:
    """A camera device that cannot exist here, behind OpenCV's VideoCapture interface:
    subclasses give ``grab`` and ``retrieve``; the rest behaves as an open device."""

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def grab(self) -> bool:
        raise NotImplementedError

    def retrieve(self) -> tuple[bool, object]:
        raise NotImplementedError

    def read(self) -> tuple[bool, object]:
        return (self.retrieve()) if self.grab() else (False, None)

    def get(self, prop: int) -> float:
        del prop
        return 0.0

    def set(self, prop: int, value: float) -> bool:
        del prop, value
        return True

    def release(self) -> None:
        pass
