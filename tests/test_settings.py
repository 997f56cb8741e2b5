"""Settings from the environment, a dotenv file and systemd credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_daemon.errors import ConfigError
from edge_daemon.settings import Roi, env_name, load_settings

pytestmark = pytest.mark.runtime


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("EDGE_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


def test_cameras_keyed_by_name_with_rois(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_CAMERAS__door__SOURCE", "rtsp://cam/stream")
    monkeypatch.setenv("EDGE_CAMERAS__door__FPS", "10")
    monkeypatch.setenv("EDGE_CAMERAS__door__ROIS__porch", "0.5,0.2,0.5,0.8")
    monkeypatch.setenv("EDGE_CAMERAS__yard__SOURCE", "/dev/video0")
    monkeypatch.setenv("EDGE_CAMERAS__yard__ROIS__gate", "10, 20, 100, 50")
    settings = load_settings()
    assert set(settings.cameras) == {"door", "yard"}
    door = settings.cameras["door"]
    assert door.fps == 10
    assert door.rois["porch"].box(640, 480) == (320, 96, 320, 384)
    assert settings.cameras["yard"].rois["gate"].box(640, 480) == (10, 20, 100, 50)
    # A pixel region that runs past the frame is clipped to it.
    assert Roi.parse("600,400,100,100").box(640, 480) == (600, 400, 40, 80)


def test_environment_wins_over_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "edge.env"
    env_file.write_text("EDGE_MQTT__HOST=broker.lan\nEDGE_MQTT__PORT=8883\nEDGE_DEVICE_ID=shed\n")
    monkeypatch.setenv("EDGE_MQTT__PORT", "1884")
    settings = load_settings(env_file)
    assert settings.mqtt.host == "broker.lan"
    assert settings.mqtt.port == 1884
    assert settings.topic_prefix == "edge/shed"
    assert settings.client_id == "edge-daemon-shed"


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "EDGE_MQTT__PASSWORD").write_text("s3cr3t-from-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = load_settings()
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(settings)
    (tmp_path / "EDGE_MQTT__PASWORD").write_text("typo")
    with pytest.raises(ConfigError, match="EDGE_MQTT__PASWORD: unknown setting"):
        load_settings()


def test_every_problem_is_listed_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_MQTT__PORT", "0")
    monkeypatch.setenv("EDGE_INFERENCE__THRESHOLD", "2")
    monkeypatch.setenv("EDGE_CAMERAS__Door__ROIS__a", "0,0,1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    problems = info.value.problems
    assert len(problems) == 4  # the ROI, the camera's missing source, the port, the threshold
    assert any(p.startswith("EDGE_MQTT__PORT: ") for p in problems)
    assert any(p.startswith("EDGE_INFERENCE__THRESHOLD: ") for p in problems)
    assert any(p.startswith("EDGE_CAMERAS__door__SOURCE: required") for p in problems)
    assert any(p.startswith("EDGE_CAMERAS__door__ROIS__a: ") for p in problems)


def test_env_names() -> None:
    assert env_name(("mqtt", "port")) == "EDGE_MQTT__PORT"
    assert env_name(("cameras", "door", "rois", "porch")) == "EDGE_CAMERAS__door__ROIS__porch"
    assert env_name(("device_id",)) == "EDGE_DEVICE_ID"
