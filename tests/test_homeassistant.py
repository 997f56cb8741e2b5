"""Home Assistant MQTT discovery, against the real broker, with the template rendered by Jinja."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jinja2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.homeassistant import discovery_messages
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


def test_home_assistant_entities_follow_states_snapshots_status_and_stats(
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
        snapshots={"min_interval_s": 0.2},
    )
    node = f"{discovery}/{{}}/testbox/{{}}/config"
    regions = ("yard_left", "yard_right", "gate_frame")
    expected = {node.format("sensor", r) for r in regions}
    expected |= {node.format("image", r) for r in regions}
    expected |= {node.format("binary_sensor", c) for c in ("yard", "gate")}
    diagnostics = ("_inference_ms", "_dropped", "_fps_yard", "_fps_gate")
    expected |= {node.format("sensor", d) for d in diagnostics}
    # Left behind by an earlier configuration (a region renamed since); another device's; and
    # another program's (ESPHome names its node after the device too).
    stale = node.format("sensor", "yard_old")
    other = f"{discovery}/sensor/otherbox/yard_left/config"
    foreign = node.format("sensor", "temperature")
    publish(stale, b'{"name": "old", "device": {"identifiers": ["edge_daemon_testbox"]}}', True)
    publish(other, b'{"name": "other", "device": {"identifiers": ["edge_daemon_otherbox"]}}', True)
    publish(
        foreign, b'{"name": "temperature", "device": {"identifiers": ["esphome_testbox"]}}', True
    )
    try:
        with subscriber(discovery) as ha, subscriber(prefix) as sub:
            daemon = Daemon(settings)
            with running(daemon):
                assert ha.wait_for(lambda: expected <= {m.topic for m in configs(ha)})
                # The stale config is removed; the other device's is left alone.
                assert ha.wait_for(
                    lambda: any(m.topic == stale and not m.payload for m in ha.messages)
                )
                assert not [m for m in ha.messages if m.topic in (other, foreign) and not m.payload]
                assert sub.wait_for(lambda: len(sub.on("stats")) >= 2)
                assert sub.wait_for(lambda: all(sub.on(*r.split("_"), "snapshot") for r in regions))
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
                assert later.wait_for(lambda: len(configs(later)) == len(expected) + 2)
                assert all(m.retain for m in configs(later))
            found = {m.topic: m.json() for m in configs(later) if m.topic not in (other, foreign)}
            assert set(found) == expected
            assert len({c["unique_id"] for c in found.values()}) == len(expected)
            for topic, config in found.items():
                component, object_id = topic.split("/")[-4], topic.split("/")[-2]
                assert config["device"]["identifiers"] == ["edge_daemon_testbox"]
                assert config["device"]["model"] == "edge-daemon (digits)"
                assert config["availability"][0]["topic"] == f"{prefix}/status"
                if object_id.startswith("_"):
                    check_diagnostic(config, sub.on("stats"))
                elif component == "binary_sensor":
                    check_connectivity(config, sub, object_id)
                elif component == "image":
                    check_image(config, sub)
                else:
                    check_region_sensor(config, sub)
            # Availability: the retained states the configs point at.
            assert sub.on("status")[-1].payload == b"offline"  # after the clean stop
            assert sub.on("gate", "status")[-1].payload == b"offline"
    finally:
        for topic in (*expected, stale, other, foreign):  # leave the shared broker as it was
            publish(topic, b"", retain=True)


def check_region_sensor(config: dict[str, Any], sub: Subscriber) -> None:
    """The sensor's state and attributes, as Home Assistant renders them from each state."""
    camera, roi = config["state_topic"].split("/")[-3:-1]
    assert config["state_topic"] == config["json_attributes_topic"]
    assert config["state_topic"] == sub.topic(camera, roi, "state")
    assert [a["topic"] for a in config["availability"]] == [
        sub.topic("status"),
        sub.topic(camera, "status"),
    ]
    assert config["availability_mode"] == "all"
    published = sub.on(camera, roi, "state")
    assert published, f"no state on {config['state_topic']}"
    for message in published:
        state = message.json()
        assert render(config["value_template"], message.payload) == (state["label"] or "none")
        attributes = json.loads(render(config["json_attributes_template"], message.payload))
        assert attributes == {
            "camera": camera,
            "roi": roi,
            "score": state["score"],
            "since": state["since"],
            "previous": state["previous"],
            "model": "digits",
        }
    # Nothing recognised: the sensor says none.
    assert render(config["value_template"], b'{"label": null, "score": 0.2}') == "none"


def check_image(config: dict[str, Any], sub: Subscriber) -> None:
    camera, roi = config["image_topic"].split("/")[-3:-1]
    assert config["image_topic"] == sub.topic(camera, roi, "snapshot")
    assert config["content_type"] == "image/jpeg"
    snapshots = sub.on(camera, roi, "snapshot")
    assert snapshots
    assert all(m.payload[:3] == b"\xff\xd8\xff" for m in snapshots)


def check_connectivity(config: dict[str, Any], sub: Subscriber, camera: str) -> None:
    assert config["device_class"] == "connectivity"
    assert config["state_topic"] == sub.topic(camera, "status")
    seen = {m.payload.decode() for m in sub.on(camera, "status")}
    assert seen == {config["payload_on"], config["payload_off"]}


def check_diagnostic(config: dict[str, Any], stats: list[Received]) -> None:
    assert config["entity_category"] == "diagnostic"
    assert config["state_topic"] == stats[0].topic
    for message in stats:
        value = render(config["value_template"], message.payload)
        assert float(value) >= 0, (config["name"], value)


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
                one_set = len(daemon._discovery)
                publish(f"{discovery}/status", b"online")  # a live one counts
                assert ha.wait_for(lambda: len(configs(ha)) >= 2 * one_set)
                time.sleep(1.0)
            sent = len(configs(ha))
        # First connect and the live birth: never the retained one.
        assert sent == 2 * one_set
    finally:
        publish(f"{discovery}/status", b"", retain=True)
        for topic, _ in daemon._discovery:
            publish(topic, b"", retain=True)


def test_no_two_entities_share_a_unique_id_whatever_the_names() -> None:
    """Regions named like the daemon's own entities (fps, connectivity, snapshot)."""
    settings = settings_for(
        unique_prefix(),
        cameras={
            "yard": {"source": "x.mp4", "rois": {"fps": "0,0,1,1", "x_snapshot": "0,0,1,1"}},
            "inference": {"source": "x.mp4", "rois": {"ms": "0,0,1,1"}},
            "gate": {"source": "x.mp4", "rois": {"connectivity": "0,0,1,1", "x": "0,0,1,1"}},
        },
        homeassistant={"enabled": True},
    )
    regions = {name: list(camera.rois) for name, camera in settings.cameras.items()}
    ids = [json.loads(p)["unique_id"] for _, p in discovery_messages(settings, regions, "m")]
    assert len(ids) == len(set(ids)) == 5 * 2 + 3 + 2 + 3
