"""Home Assistant MQTT discovery (EDGE_HOMEASSISTANT__ENABLED): entities without any YAML.

Under one device named after ``EDGE_DEVICE_ID``, retained configs on
``<discovery_prefix>/<component>/<device_id>/<object_id>/config`` for:

- a ``sensor`` per camera region (object id ``<camera>_<roi>``): its state the region's stable
  label from the retained ``state`` topic (``none`` when nothing is recognised), so it changes
  only when the region does; attributes camera, roi, score, since, previous and model;
- an ``image`` per camera region: the snapshot of its last change;
- a ``binary_sensor`` per camera (device class connectivity) from ``<camera>/status``;
- diagnostic sensors from ``stats`` (when EDGE_MQTT__STATS_INTERVAL_S is not 0): each
  camera's frames per second, the mean inference time, and the messages dropped.

Everything is available while the daemon's ``status`` says ``online``; region entities also
need their camera's. At start, the retained configs under this device's node id are read back
and those of entities no longer configured (a renamed region) are removed with an empty
retained config, when they name our device (another program may use the same node id).
Object ids of the daemon's own entities start with ``_``, which no camera name can, and every
unique id but a region sensor's has a ``.``, which no name can, so none meets a region's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from edge_daemon import __version__
from edge_daemon.control import RateLimit
from edge_daemon.errors import ConfigError
from edge_daemon.publisher import Publisher
from edge_daemon.settings import Settings

log = logging.getLogger(__name__)

#: The sensor's state: the label, or ``none`` when nothing is recognised.
STATE_TEMPLATE = "{{ value_json.label if value_json.label is not none else 'none' }}"
#: Attributes: they change with the state, never per frame.
ATTRIBUTES_TEMPLATE = (
    "{{ {'camera': value_json.camera, 'roi': value_json.roi, 'score': value_json.score,"
    " 'since': value_json.since, 'previous': value_json.previous,"
    " 'model': value_json.model} | tojson }}"
)
ORIGIN = {
    "name": "edge-daemon",
    "sw_version": __version__,
    "support_url": "https://github.com/edge-daemon/edge-daemon",
}
Config = dict[str, Any]


def birth_topic(settings: Settings) -> str:
    """Where Home Assistant says ``online`` when it (re)starts."""
    return f"{settings.homeassistant.discovery_prefix}/status"


def config_topic(settings: Settings, component: str, object_id: str) -> str:
    """The retained discovery topic of one entity."""
    prefix = settings.homeassistant.discovery_prefix
    return f"{prefix}/{component}/{settings.device_id}/{object_id}/config"


def recall_filter(settings: Settings) -> str:
    """Every retained config of this device's entities, for removing stale ones at start."""
    return config_topic(settings, "+", "+")


def is_config(settings: Settings, topic: str) -> bool:
    """True for a discovery config topic of this device."""
    parts = topic.split("/")
    prefix = settings.homeassistant.discovery_prefix.split("/")
    return (
        len(parts) == len(prefix) + 4
        and parts[: len(prefix)] == prefix
        and parts[-3] == settings.device_id
        and parts[-1] == "config"
    )


def _availability(*topics: str) -> list[dict[str, str]]:
    return [
        {"topic": t, "payload_available": "online", "payload_not_available": "offline"}
        for t in topics
    ]


def _region_configs(settings: Settings, camera: str, roi: str) -> list[tuple[str, Config]]:
    prefix = settings.topic_prefix
    state_topic = f"{prefix}/{camera}/{roi}/state"
    available = {
        "availability": _availability(f"{prefix}/status", f"{prefix}/{camera}/status"),
        "availability_mode": "all",
    }
    unique = f"edge_daemon_{settings.device_id}_{camera}_{roi}"
    sensor = {
        "name": f"{camera} {roi}",
        "unique_id": unique,
        "state_topic": state_topic,
        "value_template": STATE_TEMPLATE,
        "json_attributes_topic": state_topic,
        "json_attributes_template": ATTRIBUTES_TEMPLATE,
        "icon": "mdi:cctv",
        "qos": 1,
        **available,
    }
    image = {
        "name": f"{camera} {roi} snapshot",
        "unique_id": f"{unique}.snapshot",
        "image_topic": f"{prefix}/{camera}/{roi}/snapshot",
        "content_type": "image/jpeg",
        **available,
    }
    return [("sensor", sensor), ("image", image)]


def _camera_config(settings: Settings, camera: str) -> Config:
    prefix = settings.topic_prefix
    return {
        "name": f"{camera} camera",
        "unique_id": f"edge_daemon_{settings.device_id}.{camera}.connectivity",
        "state_topic": f"{prefix}/{camera}/status",
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "qos": 1,
        "availability": _availability(f"{prefix}/status"),
    }


def _diagnostics(settings: Settings, cameras: list[str]) -> list[tuple[str, Config]]:
    """Sensors read from the ``stats`` message (``(object id, config)``)."""
    stats = f"{settings.topic_prefix}/stats"
    unique = f"edge_daemon_{settings.device_id}"
    common = {
        "state_topic": stats,
        "entity_category": "diagnostic",
        "state_class": "measurement",
        "availability": _availability(f"{settings.topic_prefix}/status"),
    }
    out: list[tuple[str, Config]] = [
        (
            "_inference_ms",
            {
                "name": "inference time",
                "unique_id": f"{unique}.inference_ms",
                "value_template": "{{ value_json.inference.mean_inference_ms }}",
                "unit_of_measurement": "ms",
                "device_class": "duration",
                "icon": "mdi:timer-outline",
                **common,
            },
        ),
        (
            "_dropped",
            {
                "name": "messages dropped",
                "unique_id": f"{unique}.dropped",
                "value_template": "{{ value_json.mqtt.dropped }}",
                "icon": "mdi:message-alert-outline",
                **common,
                "state_class": "total_increasing",
            },
        ),
    ]
    for camera in cameras:
        out.append(
            (
                f"_fps_{camera}",
                {
                    "name": f"{camera} frames per second",
                    "unique_id": f"{unique}.{camera}.fps",
                    # A camera's entry is absent only if the message is not ours: say unknown.
                    "value_template": (
                        f"{{{{ value_json.cameras['{camera}'].fps "
                        f"if '{camera}' in value_json.cameras else none }}}}"
                    ),
                    "unit_of_measurement": "fps",
                    "icon": "mdi:filmstrip",
                    **common,
                },
            )
        )
    return out


def discovery_messages(
    settings: Settings, regions: dict[str, list[str]], model: str
) -> list[tuple[str, bytes]]:
    """The discovery configs, ``(topic, payload)``, for ``regions`` (camera: ROI names)."""
    device = {
        "identifiers": [device_identifier(settings)],
        "name": f"edge-daemon {settings.device_id}",
        "manufacturer": "edge-daemon",
        "model": f"edge-daemon ({model})",
        "sw_version": __version__,
    }
    entities: list[tuple[str, str, Config]] = []
    seen: dict[str, str] = {}
    for camera, rois in regions.items():
        for roi in rois:
            object_id = f"{camera}_{roi}"
            if object_id in seen:
                raise ConfigError(
                    f"EDGE_CAMERAS__{camera}__ROIS__{roi}: its Home Assistant sensor "
                    f"'{object_id}' would replace the one of {seen[object_id]}: rename the "
                    "camera or the region"
                )
            seen[object_id] = f"camera {camera}, region {roi}"
            entities += [(c, object_id, cfg) for c, cfg in _region_configs(settings, camera, roi)]
        entities.append(("binary_sensor", camera, _camera_config(settings, camera)))
    if settings.mqtt.stats_interval_s:
        entities += [("sensor", o, cfg) for o, cfg in _diagnostics(settings, list(regions))]
    return [
        (
            config_topic(settings, component, object_id),
            json.dumps({**config, "device": device, "origin": ORIGIN}, sort_keys=True).encode(),
        )
        for component, object_id, config in entities
    ]


def announce(publisher: Publisher, settings: Settings, configs: list[tuple[str, bytes]]) -> None:
    """Queue the retained discovery configs, and send them again whenever Home Assistant says
    it is online (after a restart); call before the publisher starts."""
    for topic, payload in configs:
        publisher.publish_retained(topic, payload)

    # Anyone may publish there: a stream of "online" must not become a stream of configs.
    resend = RateLimit(rate=0.2, burst=2)

    def on_birth(payload: bytes) -> None:
        if payload.strip() == b"online" and resend.allow():
            log.info("Home Assistant is online: sending %d discovery configs", len(configs))
            for topic, config in configs:
                publisher.publish(topic, config, qos=1, retain=True, keep=True)

    publisher.watch(birth_topic(settings), on_birth)
    log.info(
        "Home Assistant discovery: %d entities under %s",
        len(configs),
        settings.homeassistant.discovery_prefix,
    )


def device_identifier(settings: Settings) -> str:
    """How Home Assistant knows this daemon's device."""
    return f"edge_daemon_{settings.device_id}"


def _ours(payload: bytes, identifier: str) -> bool:
    """True for a config of an entity of our device (another program, ESPHome for one, may
    use the same node id)."""
    try:
        device = json.loads(payload).get("device", {})
        identifiers = device.get("identifiers", device.get("ids", []))
    except (ValueError, AttributeError):
        return False
    if isinstance(identifiers, str):
        identifiers = [identifiers]
    return isinstance(identifiers, list) and identifier in identifiers


def remove_stale(
    publisher: Publisher,
    settings: Settings,
    configs: list[tuple[str, bytes]],
    topic: str,
    payload: bytes,
) -> None:
    """A retained config read back at start: remove it (an empty retained config) when it is
    one of our device's entities and not one of ``configs``, so an entity no longer configured
    disappears from Home Assistant. Configs of other devices are never touched."""
    if not payload or topic in {t for t, _ in configs}:
        return
    if not _ours(payload, device_identifier(settings)):
        return
    log.info("Home Assistant: removing %s, no longer configured", topic)
    publisher.publish(topic, b"", qos=1, retain=True, keep=True)
