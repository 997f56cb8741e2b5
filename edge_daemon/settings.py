"""Every setting of the daemon, from the environment (``EDGE_`` prefix, ``__`` for nesting),
a dotenv file and a secrets directory, with one clear line per bad variable.

Cameras are keyed by name, so each is a few plain environment lines::

    EDGE_CAMERAS__door__SOURCE=rtsp://192.0.2.10/stream
    EDGE_CAMERAS__door__FPS=10
    EDGE_CAMERAS__door__ROIS__porch=0.5,0.2,0.5,0.8

Names are case-insensitive (the environment is read that way) and used in lower case in topics.
Every value is checked here (finite, in range, bounded): a bad one stops the daemon at start with
exit 78, rather than a camera or MQTT thread later.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from edge_daemon.camera_settings import CameraSettings, Roi
from edge_daemon.errors import ConfigError
from edge_daemon.fields import (
    MAX_TEXT,
    MQTT_MAX_BYTES,
    NAME_PATTERN,
    FilePath,
    Group,
    check_mqtt_string,
    check_names,
    fraction,
)
from edge_daemon.manifest import ResizeMethod
from edge_daemon.state_settings import SnapshotSettings, StateSettings

__all__ = [
    "BUNDLED_MODEL",
    "DELIMITER",
    "ENV_PREFIX",
    "PACKAGE_DIR",
    "SAMPLE_CLIP",
    "CameraSettings",
    "ControlSettings",
    "CredentialsSource",
    "HomeAssistantSettings",
    "InferenceSettings",
    "ModelSettings",
    "MqttSettings",
    "Roi",
    "Settings",
    "credential_files",
    "sample_camera",
    "sample_camera_rois",
]

ENV_PREFIX = "EDGE_"
DELIMITER = "__"
PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR / "models" / "digits.tflite"
SAMPLE_CLIP = PACKAGE_DIR / "samples" / "digits.mp4"


class ModelSettings(Group):
    """The model and how to run it."""

    path: FilePath = BUNDLED_MODEL
    """The ``.tflite`` file; its manifest ``NAME.json`` is read from beside it when present."""
    labels: FilePath | None = None
    """Labels file for a model without a manifest (default: ``labels.txt`` beside the model)."""
    runtime: Literal["auto", "tflite_runtime", "ai_edge_litert", "tensorflow"] = "auto"
    """TFLite runtime; auto tries tflite_runtime, then ai_edge_litert, then tensorflow."""
    num_threads: int | None = Field(default=None, ge=1, le=64)
    """Interpreter threads (default: one, or every core the process may use while inference
    is the bottleneck and they classify at least 25% more images a second, measured on the
    running pipeline and again every 5 minutes)."""
    delegate: Literal["cpu", "edgetpu"] = "cpu"
    """``cpu``, or ``edgetpu`` for a Coral (the model must be compiled for it)."""
    device: str | None = Field(default=None, max_length=16, pattern=r"^(usb|pci)(:[0-9]+)?$")
    """Which Edge TPU: ``usb``, ``usb:0``, ``pci``, ``pci:0``; none for the first found."""
    edgetpu_library: str | None = Field(default=None, max_length=MAX_TEXT)
    """The Edge TPU delegate library (default: ``libedgetpu.so.1`` on Linux)."""
    fallback_path: FilePath | None = None
    """A CPU model to run when the Edge TPU cannot be used; without one the daemon stops."""
    colour: Literal["gray", "rgb", "bgr"] | None = None
    """Model without a manifest: its colour order (default: gray for 1 channel, else rgb)."""
    resize: ResizeMethod | None = None
    """Model without a manifest: how crops are shrunk, as its training images were: ``area``
    (averaging) or ``bilinear`` (OpenCV's and TensorFlow's default) (default: area)."""
    # Bounded so that 255 * scale + offset stays finite even in float32.
    scale: float | None = Field(default=None, ge=-1e6, le=1e6)
    """Model without a manifest: input = pixel * scale + offset, a number or a fraction such
    as 1/127.5 (default: 1/255 for float or quantised uint8 input, else 1)."""
    offset: float | None = Field(default=None, ge=-1e6, le=1e6)
    """Model without a manifest: see scale (default: 0)."""

    _fractions = field_validator("scale", "offset", mode="before")(fraction)

    # A missing model or labels file is reported when loaded, with how to make one.
    paths_must_exist: ClassVar[bool] = False


class ControlSettings(Group):
    """The control topic ``<prefix>/cmd``: off unless enabled."""

    enabled: bool = False
    """Accept JSON commands on <prefix>/cmd (pause, resume, threshold, snapshot, status,
    reload).
    Anyone who can publish there controls the daemon: protect it with broker ACLs."""
    max_payload_bytes: int = Field(default=4096, ge=64, le=1_000_000)
    """Larger command messages are rejected unread."""


class HomeAssistantSettings(Group):
    """Home Assistant MQTT discovery: sensors, images and diagnostics without any YAML."""

    enabled: bool = False
    """Publish retained discovery configs so Home Assistant's MQTT integration creates, under
    one device: a sensor per camera region (its state the region's stable label, 'none' when
    nothing is recognised; attributes camera, roi, score, since, previous, model), an image
    per region (the snapshot of its last change), a connectivity binary sensor per camera, and
    diagnostic sensors from the stats. Configs of regions no longer configured are removed."""
    discovery_prefix: str = Field(default="homeassistant", max_length=200, pattern=r"^[^#+\s]+$")
    """Home Assistant's MQTT discovery prefix; configs are re-sent when it says
    <prefix>/status online (after a restart)."""


class InferenceSettings(Group):
    """Batching and what counts as a prediction."""

    max_batch: int = Field(default=8, ge=1, le=256)
    """At most this many crops in one round (a camera's regions always go together)."""
    max_delay_ms: float = Field(default=0.0, ge=0, le=10_000)
    """Wait this long after the first crop for more (0: never wait; take what is ready)."""
    batching: Literal["auto", "on", "off"] = "auto"
    """Run a round's crops as one batch (on), one by one (off), or whichever this model
    measured faster per image on this board (auto; learnt from the first rounds)."""
    unchanged_below: float = Field(default=0.005, ge=0, le=1)
    """A region whose model-sized crop differs from the one last classified by less than this
    (mean absolute difference, a share of full scale) reuses that prediction instead of
    running the model again; 0 classifies every crop."""
    unchanged_max_age_s: float = Field(default=1.0, ge=0, le=3600)
    """...for at most this long: an unchanged region is still classified this often."""
    top_k: int = Field(default=3, ge=1, le=100)
    """How many classes each prediction lists."""
    threshold: float = Field(default=0.5, ge=0, le=1)
    """Below this score the prediction's ``label`` is null."""


class MqttSettings(Group):
    """The broker and how to talk to it."""

    host: str = Field(default="127.0.0.1", max_length=253)
    """Broker host name or address."""
    port: int = Field(default=1883, ge=1, le=65535)
    """Broker port."""
    client_id: str | None = Field(default=None, max_length=128, pattern=r"^[!-~]+$")
    """Client id (default: ``edge-daemon-<device_id>``)."""
    keepalive: int = Field(default=30, ge=5, le=65535)
    """Seconds between keepalive pings."""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    """MQTT protocol version."""
    qos: Literal[0, 1, 2] = 1
    """QoS of per-frame label messages (states, events and snapshots always use 1)."""
    labels: Literal["every", "off"] = "every"
    """Per-frame labels on <camera>/<roi>/label: every prediction, or off (the retained
    state, events and snapshots are published either way)."""
    topic_prefix: str | None = Field(default=None, max_length=200)
    """Topic prefix (default: ``edge/<device_id>``)."""
    username: str | None = Field(default=None, max_length=MQTT_MAX_BYTES)
    """Broker user name."""
    password: SecretStr | None = None
    """Broker password (never logged); or use password_file, or a systemd credential."""
    password_file: FilePath | None = None
    """A file whose first line is the broker password (when password is not set)."""
    tls: bool = False
    """Connect with TLS (implied by ca_file, cert_file)."""
    ca_file: FilePath | None = None
    """CA certificate(s) to verify the broker with (default: the system's)."""
    cert_file: FilePath | None = None
    """Client certificate, for brokers that require one."""
    key_file: FilePath | None = None
    """The client certificate's private key."""
    tls_insecure: bool = False
    """Do not check that the broker's certificate names EDGE_MQTT__HOST. Unsafe: only for
    testing; logged as a warning."""
    queue_size: int = Field(default=10_000, ge=10, le=10_000_000)
    """Messages kept while the broker is slow or away; beyond this the oldest are dropped."""
    stats_interval_s: float = Field(default=30.0, ge=0, le=86_400)
    """Seconds between ``stats`` messages (0: none)."""
    reconnect_min_s: float = Field(default=1.0, ge=0.1, le=3600)
    """Seconds before the first reconnect attempt; doubles with each failure."""
    reconnect_max_s: float = Field(default=30.0, ge=0.1, le=3600)
    """Longest wait between reconnect attempts, in seconds."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # paho resolves the name in its own thread, which a UnicodeError (a label of 64
        # characters, or an empty one) would end.
        try:
            ascii_name = value.encode("idna")
        except UnicodeError:
            ascii_name = b" "
        if b" " in ascii_name:
            raise ValueError("give a host name (labels of 1 to 63 characters) or an IP address")
        return value

    @field_validator("username", "password")
    @classmethod
    def _mqtt_strings(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        if value is not None:
            check_mqtt_string(value.get_secret_value() if isinstance(value, SecretStr) else value)
        return value

    @model_validator(mode="after")
    def _password_and_tls(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both EDGE_MQTT__CERT_FILE and EDGE_MQTT__KEY_FILE, or neither")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                "EDGE_MQTT__RECONNECT_MIN_S: must be at most EDGE_MQTT__RECONNECT_MAX_S"
            )
        if self.password is None and self.password_file is not None:
            try:  # only the first line is used: read no more than it can be
                with self.password_file.open(encoding="utf-8") as handle:
                    first = check_mqtt_string(handle.readline(MQTT_MAX_BYTES + 1).rstrip("\r\n"))
            except (OSError, UnicodeDecodeError):
                raise ValueError("EDGE_MQTT__PASSWORD_FILE: cannot be read as UTF-8") from None
            except ValueError as exc:
                raise ValueError(f"EDGE_MQTT__PASSWORD_FILE: its first line {exc}") from None
            object.__setattr__(self, "password", SecretStr(first))
        return self

    @property
    def use_tls(self) -> bool:
        """True when the connection is to use TLS."""
        return self.tls or self.ca_file is not None or self.cert_file is not None

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip("/") or any(c in value for c in "+#")):
            raise ValueError("topic prefix must be a plain topic without '+' or '#'")
        return value.strip("/") if value is not None else None


def sample_camera_rois() -> dict[str, str]:
    """The regions of interest of the bundled sample clip, from its sidecar file."""
    import json  # noqa: PLC0415

    meta = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text(encoding="utf-8"))
    return dict(meta["rois"])


def sample_camera() -> dict[str, CameraSettings]:
    """The bundled sample clip as a camera, with the digit region from its sidecar."""
    rois = {name: Roi.parse(text) for name, text in sample_camera_rois().items()}
    return {"sample": CameraSettings(source=str(SAMPLE_CLIP), loop=True, rois=rois)}


def credential_files() -> dict[str, Path]:
    """Setting files in ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=``), by name."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not Path(directory).is_dir():
        return {}
    return {
        f.name: f
        for f in sorted(Path(directory).iterdir())
        if f.is_file() and f.name.upper().startswith(ENV_PREFIX)
    }


class CredentialsSource(EnvSettingsSource):
    """Settings from files named like their variable (``EDGE_MQTT__PASSWORD``) in systemd's
    credentials directory: the file's content is the value, trailing newline removed."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(
            settings_cls,
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter=DELIMITER,
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        values: dict[str, str | None] = {}
        for name, path in credential_files().items():
            try:
                values[name.lower()] = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"{name}: cannot read the credential file {path} ({type(exc).__name__})"
                ) from exc
        return values


def _default_device_id() -> str:
    name = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().lower()).strip("-")
    return name[:64] or "edge"


class Settings(BaseSettings):
    """All settings of ``edge-daemon``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=DELIMITER,
        env_file_encoding="utf-8",
        hide_input_in_errors=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    device_id: str = Field(default_factory=_default_device_id, pattern=NAME_PATTERN)
    """Names this device in topics and payloads (default: the host name)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    model: ModelSettings = Field(default_factory=ModelSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
    cameras: dict[str, CameraSettings] = Field(default_factory=dict)

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, value: dict[str, CameraSettings]) -> dict[str, CameraSettings]:
        return check_names(value, "camera")

    @property
    def topic_prefix(self) -> str:
        """Where this device's topics live."""
        return self.mqtt.topic_prefix or f"edge/{self.device_id}"

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self.mqtt.client_id or f"edge-daemon-{self.device_id}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values, then the environment, then the dotenv file, then credentials."""
        del file_secret_settings
        return init_settings, env_settings, dotenv_settings, CredentialsSource(settings_cls)
