"""Home Assistant MQTT discovery, against the real broker, with the template rendered by Jinja."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import jinja2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.pipeline import Daemon
from edge_daemon.publisher import close_client
from edge_daemon.settings import SAMPLE_CLIP, CameraSettings, Roi
from tests.helpers import (
    BROKER,
    Received,
    Subscriber,
    digit_frames,
    run_daemon,
    running,
    settings_for,
    subscriber,
    unique_prefix,
    write_video,
)


def configs(sub: Subscriber) -> list[Received]:
    with sub.lock:
        return [m for m in sub.messages if m.topic.endswith("/config") and m.payload]


def publish(topic: str, payload: bytes, retain: bool = False, times: int = 1) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(*BROKER)
    client.loop_start()
    sent = [client.publish(topic, payload, qos=1, retain=retain) for _ in range(times)]
    for info in sent:
        info.wait_for_publish(5)
    close_client(client)


def render(template: str, payload: bytes) -> str:
    """What Home Assistant's MQTT sensor makes of a payload: ``value_json`` is the parsed JSON."""
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


def test_home_assistant_discovers_a_sensor_per_region_and_follows_its_labels(
    tmp_path: Path,
) -> None:
    prefix = unique_prefix()
    discovery = f"ha-test-{uuid.uuid4().hex[:8]}"
    video = write_video(tmp_path / "yard.mp4", digit_frames(40, 96), fps=20)
    cameras = {
        "yard": CameraSettings(
            source=str(video),
            rois={"left": Roi.parse("0,0,0.5,1"), "right": Roi.parse("0.5,0,0.5,1")},
        ),
        "gate": CameraSettings(source=str(video)),
    }
    settings = settings_for(
        prefix,
        cameras=cameras,
        homeassistant={"enabled": True, "discovery_prefix": discovery},
    )
    names = ("yard_left", "yard_right", "gate_frame")
    expected = {f"{discovery}/sensor/testbox/{name}/config" for name in names}
    try:
        with subscriber(discovery) as ha, subscriber(prefix) as sub:
            daemon = Daemon(settings)
            with running(daemon):
                assert ha.wait_for(lambda: {m.topic for m in configs(ha)} == expected)
                assert sub.wait_for(lambda: len(sub.labels()) >= 30)
                # Home Assistant restarts and says so: every config comes again.
                before = len(configs(ha))
                publish(f"{discovery}/status", b"online")
                assert ha.wait_for(lambda: len(configs(ha)) >= before + len(expected))
                assert {m.topic for m in configs(ha)[before:]} == expected
                # A flood of births is not mirrored as a flood of configs.
                before, flood_started = len(configs(ha)), time.monotonic()
                publish(f"{discovery}/status", b"online", times=20)
                time.sleep(1.0)
                # One config set left of the burst, then one per 5 s.
                allowed = 1 + int((time.monotonic() - flood_started) / 5) + 1
                assert len(configs(ha)) - before <= allowed * len(expected)
            # The configs stay on the broker for a Home Assistant that subscribes later.
            with subscriber(discovery) as later:
                assert later.wait_for(lambda: len(configs(later)) == len(expected))
                assert all(m.retain for m in configs(later))
            found = {m.topic: m.json() for m in configs(later)}
            assert len({c["unique_id"] for c in found.values()}) == len(expected)
            for topic, config in found.items():
                camera, roi = topic.split("/")[-2].split("_")
                label_topic = f"{prefix}/{camera}/{roi}/label"
                assert config["state_topic"] == config["json_attributes_topic"] == label_topic
                assert [a["topic"] for a in config["availability"]] == [
                    f"{prefix}/status",
                    f"{prefix}/{camera}/status",
                ]
                assert config["availability_mode"] == "all"
                assert config["device"]["identifiers"] == ["edge_daemon_testbox"]
                assert config["device"]["model"] == "edge-daemon (digits)"
                # The sensor's state, as Home Assistant renders it from what was published.
                published = sub.on(camera, roi, "label")
                assert published, f"no labels on {label_topic}"
                attributes = set()
                for message in published:
                    label = message.json()["label"]
                    assert render(config["value_template"], message.payload) == (label or "none")
                    attributes.add(render(config["json_attributes_template"], message.payload))
                # Attributes that do not change per frame (Home Assistant records each change).
                assert len(attributes) == 1
                assert json.loads(attributes.pop()) == {
                    "camera": camera,
                    "roi": roi,
                    "model": "digits",
                    "device": "testbox",
                }
            # Below the threshold the label is null, and the sensor says none.
            template = next(iter(found.values()))["value_template"]
            assert render(template, b'{"label": null, "score": 0.2}') == "none"
            # Availability: the retained states the configs point at.
            assert sub.on("status")[-1].payload == b"offline"  # after the clean stop
            assert sub.on("gate", "status")[-1].payload == b"offline"
    finally:
        for topic in expected:  # leave the shared broker as it was
            publish(topic, b"", retain=True)


def test_no_discovery_unless_enabled(tmp_path: Path) -> None:
    discovery = f"ha-test-{uuid.uuid4().hex[:8]}"
    prefix = unique_prefix()
    with subscriber(discovery) as ha, subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix, homeassistant={"discovery_prefix": discovery}))
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 3)
            publish(f"{discovery}/status", b"online")
            assert not ha.wait_for(lambda: bool(configs(ha)), timeout=1.0)


@pytest.mark.parametrize("bad", ["ha/#", "ha/+", "my ha"])
def test_a_discovery_prefix_with_wildcards_is_refused(bad: str) -> None:
    proc = run_daemon("run", env={"EDGE_HOMEASSISTANT__DISCOVERY_PREFIX": bad})
    assert proc.returncode == 78
    assert "EDGE_HOMEASSISTANT__DISCOVERY_PREFIX" in proc.stderr


def test_regions_whose_sensors_would_collide_are_refused() -> None:
    clip = str(SAMPLE_CLIP)
    proc = run_daemon(
        "run",
        env={
            "EDGE_HOMEASSISTANT__ENABLED": "true",
            "EDGE_CAMERAS__yard__SOURCE": clip,
            "EDGE_CAMERAS__yard__ROIS__left_x": "0,0,1,1",
            "EDGE_CAMERAS__yard_left__SOURCE": clip,
            "EDGE_CAMERAS__yard_left__ROIS__x": "0,0,1,1",
        },
    )
    assert proc.returncode == 78, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-daemon:")]
    assert len(errors) == 1
    assert "sensor 'yard_left_x' would replace the one of camera" in errors[0]


def test_a_retained_birth_is_old_news(tmp_path: Path) -> None:
    """A birth message left retained on the broker does not make the daemon re-send configs."""
    discovery = f"ha-test-{uuid.uuid4().hex[:8]}"
    prefix = unique_prefix()
    publish(f"{discovery}/status", b"online", retain=True)
    try:
        with subscriber(discovery) as ha, subscriber(prefix) as sub:
            daemon = Daemon(
                settings_for(prefix, homeassistant={"enabled": True, "discovery_prefix": discovery})
            )
            with running(daemon):
                assert sub.wait_for(lambda: len(sub.labels()) >= 10)
                publish(f"{discovery}/status", b"online")  # a live one counts
                assert ha.wait_for(lambda: len(configs(ha)) >= 2)
                time.sleep(1.0)
            sent = len(configs(ha))
        # First connect (sent with the retained states) and the live birth: never the retained.
        assert 2 <= sent <= 3
    finally:
        publish(f"{discovery}/status", b"", retain=True)
        publish(f"{discovery}/sensor/testbox/sample_digit/config", b"", retain=True)
