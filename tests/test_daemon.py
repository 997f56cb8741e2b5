"""The daemon end to end: real video files and streams, the real interpreter, a real broker."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from edge_daemon.backoff import Backoff
from edge_daemon.broker import free_port, start_mosquitto
from edge_daemon.capture import Camera
from edge_daemon.engine import Engine
from edge_daemon.pipeline import Daemon
from edge_daemon.settings import SAMPLE_CLIP, CameraSettings, Roi
from tests.conftest import Zoo
from tests.helpers import (
    FakeCapture,
    MjpegServer,
    digit_frames,
    run_daemon,
    running,
    settings_for,
    subscriber,
    unique_prefix,
    wait_until,
    write_video,
)

pytestmark = pytest.mark.runtime


def test_sample_clip_end_to_end_matches_ground_truth() -> None:
    prefix = unique_prefix()
    truth = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text())["truth"]
    settings = settings_for(prefix)
    with subscriber(prefix) as sub:
        daemon = Daemon(settings)
        assert daemon.using_sample
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 60, timeout=30)
        labels = sub.labels()
        assert sub.validate_all() >= len(labels)
        right = sum(p["label"] == truth[p["frame"] % len(truth)] for p in labels)
        assert right / len(labels) >= 0.95, f"{right} of {len(labels)} right"
        assert {p["roi"] for p in labels} == {"digit"}
        status = sub.on("status")
        assert status[0].payload == b"online"
        assert status[-1].payload == b"offline"  # published before the clean disconnect
        camera_status = [m.payload for m in sub.on("sample", "status")]
        assert camera_status[-1] == b"offline"
        assert b"online" in camera_status


def test_daemon_predictions_equal_the_converters_evaluation(zoo: Zoo, tmp_path: Path) -> None:
    """Lossless frames (a PNG sequence) of held-out digits: each published prediction must be
    what the converter measured for that image, score for score."""
    frames = tmp_path / "frames"
    frames.mkdir()
    images = list(zoo.heldout_images[:60])
    for i, image in enumerate(images):
        cv2.imwrite(str(frames / f"{i:04d}.png"), image)
    model = zoo.model("int8")
    engine = Engine.from_path(model)
    expected_scores = engine.classify(images)
    converter_top1 = zoo.expected("int8")[:60]
    prefix = unique_prefix()
    camera = CameraSettings(source=str(frames / "%04d.png"), loop=False, realtime=False, fps=None)
    settings = settings_for(
        prefix,
        model={"path": model},
        cameras={"heldout": camera},
        inference={"top_k": 10, "threshold": 0.0},
    )
    with subscriber(prefix) as sub:
        daemon = Daemon(settings)
        daemon.start()
        daemon.run(duration=30)  # returns when the sequence ends
        daemon.stop()
        assert sub.wait_for(lambda: len(sub.labels()) > 0)
        labels = sub.labels()
    assert sub.validate_all() >= len(labels)
    for p in labels:
        n = p["frame"]
        assert p["label"] == engine.labels[converter_top1[n]]
        got = {c["label"]: c["score"] for c in p["top"]}
        for index, label in enumerate(engine.labels):
            assert got[label] == pytest.approx(float(expected_scores[n][index]), abs=1e-6)


def test_several_cameras_rois_batching_and_a_stream_that_dies_and_returns(tmp_path: Path) -> None:
    video = write_video(tmp_path / "a.mp4", digit_frames(40, 120), fps=25)
    stream = MjpegServer(digit_frames(10, 96, seed=3), fps=25).start()
    prefix = unique_prefix()
    cameras = {
        "file1": CameraSettings(
            source=str(video),
            realtime=True,
            rois={"left": Roi.parse("0,0,0.5,1"), "right": Roi.parse("0.5,0,0.5,1")},
        ),
        "file2": CameraSettings(source=str(video), realtime=True),
        "live": CameraSettings(source=stream.url, read_timeout_s=2.0, open_timeout_s=2.0),
    }
    settings = settings_for(prefix, cameras=cameras, inference={"max_batch": 8, "max_delay_ms": 60})
    try:
        with subscriber(prefix) as sub:
            daemon = Daemon(settings)
            with running(daemon):
                assert sub.wait_for(lambda: len(sub.labels("live")) >= 10)
                assert sub.wait_for(lambda: len(sub.labels("file1")) >= 10)
                stream.stop()
                assert sub.wait_for(
                    lambda: [m.payload for m in sub.on("live", "status")][-1:] == [b"offline"],
                    timeout=15,
                ), "the dead stream was not reported offline"
                before = len(sub.labels("file2"))
                time.sleep(1.0)
                assert len(sub.labels("file2")) > before + 10, "other cameras stopped"
                live_count = len(sub.labels("live"))
                stream.start()
                assert sub.wait_for(lambda: len(sub.labels("live")) > live_count + 5, timeout=40), (
                    "the restarted stream was not picked up"
                )
                assert [m.payload for m in sub.on("live", "status")][-1] == b"online"
            labels = sub.labels()
            assert sub.validate_all() >= len(labels)
            rois = {(p["camera"], p["roi"]) for p in labels}
            assert {
                ("file1", "left"),
                ("file1", "right"),
                ("file2", "frame"),
                ("live", "frame"),
            } <= rois
            assert max(p["batch"] for p in labels) > 1, "no batch larger than 1"
            assert sub.on("stats"), "no stats published"
    finally:
        stream.stop()


def test_broker_absent_at_start_and_appearing_later(tmp_path: Path) -> None:
    port = free_port()
    prefix = unique_prefix()
    video = write_video(tmp_path / "a.mp4", digit_frames(20, 64), fps=20)
    settings = settings_for(
        prefix,
        mqtt={"port": port, "reconnect_min_s": 1, "reconnect_max_s": 2},
        cameras={"cam": CameraSettings(source=str(video))},
    )
    daemon = Daemon(settings)
    with running(daemon):
        assert wait_until(lambda: daemon.stats.items > 0), (
            "inference must run while the broker is away"
        )
        assert not daemon.publisher.connected
        with start_mosquitto(port) as broker, subscriber(prefix, port=broker.port) as sub:
            assert sub.wait_for(lambda: daemon.publisher.connected, timeout=15)
            assert sub.wait_for(lambda: len(sub.labels()) >= 5)
            assert sub.on("status")[-1].payload == b"online"
            assert sub.validate_all() >= 5


def test_refused_connection_is_an_error_not_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text("")  # no user at all: every login is refused
    config = f"allow_anonymous false\npassword_file {passwords}\n"
    with start_mosquitto(extra_config=config) as broker:
        settings = settings_for(
            unique_prefix(), mqtt={"port": broker.port, "username": "cam", "password": "wrong"}
        )
        daemon = Daemon(settings)
        with running(daemon):
            assert wait_until(lambda: daemon.publisher.refusals >= 2)
            assert not daemon.publisher.connected
            assert daemon.publisher.last_refusal is not None
    refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refused
    assert refused[0].levelname == "ERROR"
    assert "wrong" not in caplog.text  # the password is never logged


def test_edgetpu_that_cannot_load_stops_or_falls_back(
    bundled_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_daemon.engine import load_engine
    from edge_daemon.errors import DelegateError

    model = {"delegate": "edgetpu", "device": "usb:0", "edgetpu_library": "/nonexistent/lib.so"}
    with pytest.raises(DelegateError, match="plugdev"):
        load_engine(settings_for(unique_prefix(), model=model))
    engine = load_engine(
        settings_for(unique_prefix(), model={**model, "fallback_path": bundled_model})
    )
    assert engine.model_path == bundled_model
    assert "running the fallback model" in caplog.text


def test_queue_drops_the_oldest_and_counts_while_the_broker_is_away() -> None:
    from edge_daemon.publisher import Publisher

    settings = settings_for(unique_prefix(), mqtt={"port": free_port(), "queue_size": 10})
    publisher = Publisher(settings)
    for i in range(25):
        publisher.publish(publisher.topic("x"), str(i).encode())
    assert publisher.dropped == 15
    assert [m.payload for m in publisher._queue] == [str(i).encode() for i in range(15, 25)]


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("EDGE_MQTT__PORT", "not-a-port-s3cret", "valid integer"),
        ("EDGE_MQTT__PORT", "70000", "less than or equal to 65535"),
        ("EDGE_MQTT__QOS", "3", "Input should be 0, 1 or 2"),
        ("EDGE_MQTT__PROTOCOL", "4", "'3.1.1' or '5'"),
        ("EDGE_INFERENCE__MAX_BATCH", "0", "greater than or equal to 1"),
        ("EDGE_MODEL__DELEGATE", "gpu", "'cpu' or 'edgetpu'"),
        ("EDGE_MODEL__DEVICE", "usb0", "should match pattern"),
        ("EDGE_CAMERAS__door__FPS", "-5", "greater than 0"),
        ("EDGE_CAMERAS__door__ROIS__porch", "1,2,3", "x,y,width,height"),
        # The PyPI OpenCV wheels have no GStreamer: said at start, not retried for ever.
        ("EDGE_CAMERAS__door__SOURCE", "videotestsrc ! appsink", "without GStreamer"),
        ("EDGE_MQTT__HOSTNAME", "x", "unknown setting"),
        ("EDGE_BOGUS", "1", "unknown setting"),
    ],
)
def test_bad_setting_is_one_clear_line_and_exit_78(variable: str, value: str, needle: str) -> None:
    env = {variable: value}
    if variable.startswith("EDGE_CAMERAS__door") and not variable.endswith("SOURCE"):
        env["EDGE_CAMERAS__door__SOURCE"] = "rtsp://127.0.0.1:1/none"
    proc = run_daemon("run", "--duration", "1", env=env)
    assert proc.returncode == 78, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-daemon:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"edge-daemon: error: {variable.rsplit('__', 1)[0]}")
    assert variable in errors[0] or "ROIS" in variable
    assert needle in errors[0]
    assert "Traceback" not in proc.stderr
    if len(value) > 5:
        assert value not in proc.stderr  # values are never echoed: they may be secrets


def test_camera_without_source_and_missing_model(tmp_path: Path) -> None:
    proc = run_daemon("run", env={"EDGE_CAMERAS__door__FPS": "5"})
    assert proc.returncode == 78
    assert "EDGE_CAMERAS__door__SOURCE: required, but not set" in proc.stderr
    proc = run_daemon("run", env={"EDGE_MODEL__PATH": str(tmp_path / "none.tflite")})
    assert proc.returncode == 78
    assert proc.stderr.strip().splitlines()[-1].startswith("edge-daemon: error: model file")


def test_env_file_and_check_command(tmp_path: Path) -> None:
    env_file = tmp_path / "edge.env"
    env_file.write_text(
        f"EDGE_MQTT__TOPIC_PREFIX={unique_prefix()}\n"
        "EDGE_MQTT__PASSWORD=hunter2-secret\nEDGE_MQTT__USERNAME=cam\n"
    )
    proc = run_daemon("check", "--env-file", str(env_file))
    assert proc.returncode == 0, proc.stderr
    assert "model: ok" in proc.stdout
    assert "camera sample: ok" in proc.stdout
    assert "broker: ok" in proc.stdout
    assert "hunter2-secret" not in proc.stdout + proc.stderr
    bad = run_daemon(
        "check",
        env={
            "EDGE_MQTT__PORT": str(free_port()),
            "EDGE_CAMERAS__gone__SOURCE": str(tmp_path / "no.mp4"),
        },
        timeout=90,
    )
    assert bad.returncode == 78
    assert "problem: camera gone" in bad.stderr
    assert "problem: broker: cannot connect to broker" in bad.stderr
    missing = run_daemon("run", "--env-file", str(tmp_path / "nope.env"))
    assert missing.returncode == 78
    assert "env file" in missing.stderr


def test_env_example_is_up_to_date() -> None:
    from edge_daemon.envdoc import generate

    committed = Path(__file__).resolve().parent.parent / "config" / "edge-daemon.env.example"
    assert committed.read_text() == generate(), (
        "config/edge-daemon.env.example is out of date: run 'make env-example'"
    )
    for name in (
        "EDGE_MQTT__HOST",
        "EDGE_MODEL__PATH",
        "EDGE_INFERENCE__MAX_BATCH",
        "EDGE_CAMERAS__door__SOURCE",
        "EDGE_CAMERAS__door__ROIS__porch",
    ):
        assert f"#{name}=" in committed.read_text()


def test_run_for_a_duration_and_exit_zero() -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        proc = run_daemon("run", "--duration", "3", env={"EDGE_MQTT__TOPIC_PREFIX": prefix})
        assert proc.returncode == 0, proc.stderr
        assert "no camera configured" in proc.stderr
        assert "EDGE_CAMERAS__<name>__SOURCE" in proc.stderr
        assert sub.wait_for(lambda: len(sub.labels()) >= 10)
        assert sub.on("status")[-1].payload == b"offline"
    console = Path(sys.executable).with_name("edge-daemon")
    proc = subprocess.run([str(console), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "edge-daemon" in proc.stdout


def test_mqtt_5_and_the_frame_rate_cap(tmp_path: Path) -> None:
    video = write_video(tmp_path / "fast.mp4", digit_frames(50, 64), fps=25)
    prefix = unique_prefix()
    settings = settings_for(
        prefix, mqtt={"protocol": "5"}, cameras={"capped": CameraSettings(source=str(video), fps=5)}
    )
    with subscriber(prefix) as sub:
        daemon = Daemon(settings)
        with running(daemon):
            time.sleep(3.0)
        labels = sub.labels("capped")
        assert sub.validate_all() >= len(labels)
    # 25 fps in the file, at most 5 taken a second: about 15 in 3 s, never 75.
    assert 8 <= len(labels) <= 20, len(labels)
    assert daemon.cameras[0].frames_skipped > 30


class FakeDevice(FakeCapture):
    """Stands in for a V4L2 camera (none exists here) behind OpenCV's VideoCapture interface.

    It delivers frames until ``unplug()``; then reads fail and opening raises, as for a USB
    camera pulled out, until ``plug()``.
    """

    plugged = True

    def __init__(self, settings: CameraSettings) -> None:
        if not FakeDevice.plugged:
            from edge_daemon.errors import CaptureError

            raise CaptureError(f"cannot open device {settings.source}")
        self.settings = settings
        self.count = 0

    def grab(self) -> bool:
        time.sleep(0.02)
        if not FakeDevice.plugged:
            return False
        self.count += 1
        return True

    def retrieve(self) -> tuple[bool, object]:
        if not FakeDevice.plugged:
            return False, None
        return True, digit_frames(1, 64, seed=self.count)[0]


def test_usb_camera_that_disappears_and_comes_back(tmp_path: Path) -> None:
    video = write_video(tmp_path / "other.mp4", digit_frames(20, 64), fps=20)
    prefix = unique_prefix()
    settings = settings_for(
        prefix,
        cameras={
            "usb": CameraSettings(source="/dev/video0", width=640, height=480, fourcc="MJPG"),
            "other": CameraSettings(source=str(video)),
        },
    )
    from edge_daemon.sources import open_source

    def opener(cam: CameraSettings) -> object:
        return FakeDevice(cam) if cam.source == "/dev/video0" else open_source(cam)

    FakeDevice.plugged = True
    with subscriber(prefix) as sub:
        daemon = Daemon(settings, opener=opener)  # type: ignore[arg-type]
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels("usb")) >= 5)
            FakeDevice.plugged = False
            assert sub.wait_for(
                lambda: [m.payload for m in sub.on("usb", "status")][-1:] == [b"offline"]
            )
            others = len(sub.labels("other"))
            assert sub.wait_for(lambda: len(sub.labels("other")) > others + 5)
            FakeDevice.plugged = True
            count = len(sub.labels("usb"))
            assert sub.wait_for(lambda: len(sub.labels("usb")) > count + 5, timeout=20)
            assert [m.payload for m in sub.on("usb", "status")][-1] == b"online"
    assert daemon.cameras[0].reopens >= 1


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "not-tflite",
        "manifest-mismatch",
        "labels-count",
        "broken-manifest",
        "labels-missing",
    ],
)
def test_bad_model_files_are_one_line_and_exit_78(
    case: str, tmp_path: Path, bundled_model: Path
) -> None:
    model = tmp_path / "model.tflite"
    env = {"EDGE_MODEL__PATH": str(model)}
    data = bundled_model.read_bytes()
    manifest = json.loads(bundled_model.with_suffix(".json").read_text())
    if case == "truncated":
        model.write_bytes(data[: len(data) // 3])
    elif case == "not-tflite":
        model.write_bytes(b"<html>404 not found</html>" * 10)
    elif case in {"manifest-mismatch", "broken-manifest"}:
        model.write_bytes(data)
        if case == "manifest-mismatch":
            manifest["input"]["height"] = 32
            (tmp_path / "model.json").write_text(json.dumps(manifest))
        else:
            (tmp_path / "model.json").write_text('{"schema_version": 1, "name": ')
    elif case in {"labels-count", "labels-missing"}:
        model.write_bytes(data)  # no manifest: labels come from the setting
        labels = tmp_path / "labels.txt"
        if case == "labels-count":
            labels.write_text("cat\ndog\n")
        env["EDGE_MODEL__LABELS"] = str(labels)
    proc = run_daemon("run", "--duration", "1", env=env)
    assert proc.returncode == 78, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-daemon:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = {
        "missing": "does not exist",
        "truncated": "is truncated or corrupt",
        "not-tflite": "not a TFLite model",
        "manifest-mismatch": "does not fit its manifest",
        "labels-count": "2 labels for the 10 outputs",
        "broken-manifest": "is not valid",
        "labels-missing": "labels file",
    }[case]
    assert expected in errors[0], errors[0]


def test_a_camera_that_cannot_open_says_why_once_and_comes_up_when_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "late.mp4"
    camera = Camera("door", CameraSettings(source=str(path)), backoff=Backoff(0.02, 0.05))
    with caplog.at_level(logging.DEBUG, logger="edge_daemon.capture"):
        camera.start()
        try:
            time.sleep(0.6)
            assert not camera.online
            write_video(tmp_path / "partial.mp4", digit_frames(10, 64)).rename(path)
            deadline = time.monotonic() + 10
            while not camera.online and time.monotonic() < deadline:
                time.sleep(0.02)
            assert camera.online
        finally:
            camera.stop()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in messages if level == logging.WARNING]
    assert len(warnings) == 1, warnings  # said once, not on every retry
    assert warnings[0].startswith(f"camera door: video file {path} does not exist; retrying")
    assert sum("retrying in" in m for _, m in messages) >= 5  # the retries, at debug level


@pytest.mark.parametrize("timeout", ["-1", "nan", "inf", "0", "1e9", "soon"])
def test_check_refuses_a_timeout_that_is_not_a_time(timeout: str) -> None:
    """Before: --timeout -1, nan or inf aborted the process (a probe thread left in OpenCV)."""
    proc = run_daemon("check", "--timeout", timeout)
    assert proc.returncode == 2, proc.stderr
    assert "give a time from 0 to 600 seconds" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_keeps_opencvs_own_warnings_out(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    proc = run_daemon(
        "check",
        "--timeout",
        "3",
        env={
            "EDGE_MQTT__TOPIC_PREFIX": unique_prefix(),
            "EDGE_CAMERAS__gone__SOURCE": str(tmp_path / "missing.mp4"),
            "EDGE_CAMERAS__dead__SOURCE": f"http://127.0.0.1:{free_port()}/x.mjpg",
            "EDGE_CAMERAS__junk__SOURCE": str(tmp_path / "junk.mp4"),
        },
        timeout=90,
    )
    assert proc.returncode == 78
    assert "problem: camera gone" in proc.stderr
    assert "problem: camera dead" in proc.stderr
    assert "problem: camera junk" in proc.stderr
    assert "[ WARN" not in proc.stderr, proc.stderr
    assert "[ERROR" not in proc.stderr, proc.stderr


def test_env_example_never_replaces_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """Before: ``env-example --output /dev/full`` replaced the device with a file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target in (fifo, folder, tmp_path / "no" / "such" / "dir" / "x.env"):
        proc = run_daemon("env-example", "--output", str(target))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("edge-daemon: error: --output ")
        assert len(proc.stderr.strip().splitlines()) == 1
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert folder.is_dir()
    written = tmp_path / "example.env"
    assert run_daemon("env-example", "--output", str(written)).returncode == 0
    assert "EDGE_MQTT__HOST" in written.read_text()


def test_check_says_which_input_scaling_a_model_without_manifest_gets(tmp_path: Path) -> None:
    """A model wanting [-1, 1] run with the assumed 1/255 changed the top label on 41% of
    crops without an error: say what was assumed and how to set it."""
    from edge_daemon.settings import BUNDLED_MODEL

    bare = tmp_path / "bare.tflite"
    bare.write_bytes(BUNDLED_MODEL.read_bytes())
    proc = run_daemon("check", "--timeout", "2", env={"EDGE_MODEL__PATH": str(bare)})
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("model:")]
    assert "input = pixel * 0.00392157 + 0 (assumed: no manifest" in line
    assert "EDGE_MODEL__SCALE=1/127.5" in line
    proc = run_daemon(
        "check",
        "--timeout",
        "2",
        env={
            "EDGE_MODEL__PATH": str(bare),
            "EDGE_MODEL__SCALE": "1/127.5",
            "EDGE_MODEL__OFFSET": "-1",
        },
    )
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("model:")]
    assert "input = pixel * 0.00784314 - 1" in line
    assert "assumed" not in line  # set, not guessed
    # With its manifest nothing is assumed.
    proc = run_daemon("check", "--timeout", "2")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("model:")]
    assert "assumed" not in line
