"""``edge-daemon check``: validate settings, load the model, open each source, try the broker."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.config import load_settings
from edge_daemon.connection import diagnose, tls_context
from edge_daemon.engine import load_engine, model_summary
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.publisher import close_client
from edge_daemon.settings import CameraSettings, Settings, sample_camera
from edge_daemon.sources import decoding_shares, open_source, redact


def _check_source(settings: CameraSettings, timeout: float) -> str:
    """Open a source and read one frame within ``timeout``; the frame size, or raise."""
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            capture = open_source(settings)
            try:
                ok, image = capture.read()
                result["frame"] = image.shape if ok and image is not None else None
            finally:
                capture.release()
        except EdgeDaemonError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EdgeDaemonError(f"no frame within {timeout:g} s")
    if "error" in result:
        raise EdgeDaemonError(result["error"])
    if result.get("frame") is None:
        raise EdgeDaemonError("opened, but no frame could be read")
    shape = result["frame"]
    return f"{shape[1]}x{shape[0]}"


def check_broker(settings: Settings, timeout: float) -> str:
    """Connect to the broker once; a description of the outcome, or raise."""
    cfg = settings.mqtt
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{settings.client_id}-check",
        protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311,
    )
    if cfg.username:
        client.username_pw_set(
            cfg.username, cfg.password.get_secret_value() if cfg.password else None
        )
    context = tls_context(settings) if cfg.use_tls else None
    if context is not None:
        client.tls_set_context(context)
    outcome: dict[str, str] = {}
    done = threading.Event()

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        del client, userdata, flags, properties
        outcome["refused" if reason.is_failure else "ok"] = str(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
    except OSError as exc:
        raise EdgeDaemonError(
            f"cannot connect to broker {cfg.host}:{cfg.port}: "
            f"{diagnose(cfg.host, cfg.port, context, timeout)}"
        ) from exc
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise EdgeDaemonError(
                f"broker {cfg.host}:{cfg.port} did not answer within {timeout:g} s"
            )
    finally:
        close_client(client)
    if "refused" in outcome:
        raise EdgeDaemonError(
            f"broker {cfg.host}:{cfg.port} refused the connection: "
            f"{outcome['refused']} (check EDGE_MQTT__USERNAME and "
            "EDGE_MQTT__PASSWORD)"
        )
    return f"{cfg.host}:{cfg.port} accepted {settings.client_id}"


def run_checks(env_file: Path | None, timeout: float) -> int:
    """Print a short report; 0 when everything works, 78 with every problem listed."""
    started = time.monotonic()
    settings = load_settings(env_file)
    problems: list[str] = []
    report = [
        f"settings: ok (device {settings.device_id}, topics {settings.topic_prefix}/..., "
        f"user {settings.mqtt.username or '-'}, password "
        f"{'***' if settings.mqtt.password else '-'})"
    ]
    try:
        engine = load_engine(settings)
        report.append(f"model: ok, {model_summary(engine)}; {engine.threads.describe()}")
    except EdgeDaemonError as exc:
        problems.append(f"model: {exc}")
    cameras = decoding_shares(settings.cameras or sample_camera())
    for name, camera in cameras.items():
        try:
            size = _check_source(camera, timeout)
            threads = camera.decode_threads
            decoded = (
                f", decoded on {threads} thread{'s' if threads > 1 else ''}" if threads else ""
            )
            report.append(
                f"camera {name}: ok, {redact(camera.source)} gives {size} frames{decoded}"
            )
        except EdgeDaemonError as exc:
            problems.append(
                f"camera {name} ({redact(camera.source)}): {exc}; check "
                f"EDGE_CAMERAS__{name}__SOURCE"
            )
    try:
        report.append(f"broker: ok, {check_broker(settings, timeout)}")
    except EdgeDaemonError as exc:
        problems.append(f"broker: {exc}")
    for line in report:
        print(line)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    elapsed = time.monotonic() - started
    if problems:
        print(f"{len(problems)} problem(s) found in {elapsed:.1f} s", file=sys.stderr)
        return 78
    print(f"all checks passed in {elapsed:.1f} s")
    return 0
