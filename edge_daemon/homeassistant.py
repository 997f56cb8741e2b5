"""Home Assistant MQTT discovery: a sensor per camera region (EDGE_HOMEASSISTANT__ENABLED).

Each region's config goes, retained, to
``<discovery_prefix>/sensor/<device_id>/<camera>_<roi>/config``. The sensor's state is the
prediction's ``label`` (``none`` below the threshold) and its attributes the camera, region,
model and device (not the per-frame fields), both read from the label topic the daemon already
publishes. It is available
while the daemon's ``status`` and the camera's ``status`` both say ``online``. All the
region sensors of one daemon belong to one Home Assistant device named after ``EDGE_DEVICE_ID``.
"""

from __future__ import annotations

import json
import logging

from edge_daemon import __version__
from edge_daemon.control import RateLimit
from edge_daemon.errors import ConfigError
from edge_daemon.publisher import Publisher
from edge_daemon.settings import Settings

log = logging.getLogger(__name__)

#: The sensor's state: the label, or ``none`` when the score is below the threshold.
STATE_TEMPLATE = "{{ value_json.label if value_json.label is not none else 'none' }}"
#: Attributes that change only with the configuration. Per-frame fields (score, frame, ts,
#: latency) would make Home Assistant's recorder write a row for every frame of every region.
ATTRIBUTES_TEMPLATE = (
    "{{ {'camera': value_json.camera, 'roi': value_json.roi, 'model': value_json.model,"
    " 'device': value_json.device} | tojson }}"
)
ORIGIN = {
    "name": "edge-daemon",
    "sw_version": __version__,
    "support_url": "https://github.com/edge-daemon/edge-daemon",
}


def birth_topic(settings: Settings) -> str:
    """Where Home Assistant says ``online`` when it (re)starts."""
    return f"{settings.homeassistant.discovery_prefix}/status"


def config_topic(settings: Settings, camera: str, roi: str) -> str:
    """The retained discovery topic of one camera region's sensor."""
    prefix = settings.homeassistant.discovery_prefix
    return f"{prefix}/sensor/{settings.device_id}/{camera}_{roi}/config"


def discovery_messages(
    settings: Settings, regions: dict[str, list[str]], model: str
) -> list[tuple[str, bytes]]:
    """The discovery configs, ``(topic, payload)``, for ``regions`` (camera: ROI names)."""
    status = f"{settings.topic_prefix}/status"
    device = {
        "identifiers": [f"edge_daemon_{settings.device_id}"],
        "name": f"edge-daemon {settings.device_id}",
        "manufacturer": "edge-daemon",
        "model": f"edge-daemon ({model})",
        "sw_version": __version__,
    }
    messages = []
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
            label_topic = f"{settings.topic_prefix}/{camera}/{roi}/label"
            config = {
                "name": f"{camera} {roi}",
                "unique_id": f"edge_daemon_{settings.device_id}_{camera}_{roi}",
                "state_topic": label_topic,
                "value_template": STATE_TEMPLATE,
                "json_attributes_topic": label_topic,
                "json_attributes_template": ATTRIBUTES_TEMPLATE,
                "icon": "mdi:cctv",
                "availability": [
                    {
                        "topic": topic,
                        "payload_available": "online",
                        "payload_not_available": "offline",
                    }
                    for topic in (status, f"{settings.topic_prefix}/{camera}/status")
                ],
                "availability_mode": "all",
                "qos": settings.mqtt.qos,
                "device": device,
                "origin": ORIGIN,
            }
            messages.append(
                (config_topic(settings, camera, roi), json.dumps(config, sort_keys=True).encode())
            )
    return messages


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
                publisher.publish(topic, config, qos=1, retain=True)

    publisher.watch(birth_topic(settings), on_birth)
    log.info(
        "Home Assistant discovery: %d sensors under %s",
        len(configs),
        settings.homeassistant.discovery_prefix,
    )
