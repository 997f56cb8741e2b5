"""Settings from the environment, a dotenv file and systemd credentials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, SecretStr

from edge_daemon.config import env_name, load_settings
from edge_daemon.errors import ConfigError
from edge_daemon.settings import BUNDLED_MODEL, Roi, Settings

pytestmark = pytest.mark.runtime


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
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


# --- every value a hostile user can give ----------------------------------------------------

HOSTILE = ["", "nan", "inf", "-inf", "1e400", "x" * 70_000, "garbage"]
NOT_FINITE = ["nan", "inf", "-inf", "1e400"]
#: Numeric leaves that may take a non-finite or empty value, and text leaves that may be empty
#: or 70,000 characters long, each with the reason. None: every one is bounded.
EXEMPT: dict[str, str] = {}
CAMERA = "EDGE_CAMERAS__door__"


def _plain(annotation: Any) -> list[Any]:
    """The types an annotation allows, without None, ``Annotated`` or unions."""
    if get_origin(annotation) is Annotated:
        return _plain(get_args(annotation)[0])
    if get_origin(annotation) in {Union, UnionType}:
        return [t for arg in get_args(annotation) for t in _plain(arg) if t is not type(None)]
    return [annotation]


def _leaves(model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    """``(variable, kind)`` for every setting, kind "number", "text" or "choice"; dictionaries
    get one example key (a camera ``door``, its ROI ``porch``)."""
    leaves = []
    for name, info in model.model_fields.items():
        variable = prefix + name.upper()
        (kind,) = _plain(info.annotation)
        if get_origin(kind) is dict:
            variable += "__door" if name == "cameras" else "__porch"
            (kind,) = _plain(get_args(kind)[1])
        if isinstance(kind, type) and issubclass(kind, BaseModel) and kind is not Roi:
            leaves += _leaves(kind, variable + "__")
        elif kind in {int, float}:
            leaves.append((variable, "number"))
        elif kind in {str, Path, SecretStr, Roi} or get_origin(kind) is tuple:
            # a ROI is written as text, a list of labels as text separated by commas
            leaves.append((variable, "text"))
        else:
            assert kind is bool or get_origin(kind) is Literal, f"{variable}: {kind} unknown"
            leaves.append((variable, "choice"))
    return leaves


LEAVES = _leaves(Settings, "EDGE_")


def _with_camera(variable: str, value: str) -> dict[str, str]:
    """``variable=value``, plus the source a camera needs when the variable is another one."""
    env = {variable: value}
    if variable.startswith(CAMERA) and variable != f"{CAMERA}SOURCE":
        env[f"{CAMERA}SOURCE"] = "rtsp://192.0.2.10/stream"
    if variable.startswith(f"{CAMERA}STATE__porch"):  # a region's state needs the region
        env[f"{CAMERA}ROIS__porch"] = "0,0,1,1"
    return env


def _refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str] | None:
    """The problems ``load_settings()`` lists for ``env``, or None when it accepts it. Any
    exception but ConfigError fails the test."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        load_settings()
    except ConfigError as exc:
        return exc.problems
    finally:
        for key in env:
            monkeypatch.delenv(key)
    return None


def test_the_walk_reaches_every_kind_of_setting() -> None:
    found = dict(LEAVES)
    assert found["EDGE_MQTT__HOST"] == "text"
    assert found["EDGE_MQTT__PASSWORD"] == "text"
    assert found["EDGE_MODEL__PATH"] == "text"
    assert found["EDGE_MODEL__SCALE"] == "number"
    assert found[f"{CAMERA}OPEN_TIMEOUT_S"] == "number"
    assert found[f"{CAMERA}ROIS__porch"] == "text"
    assert found["EDGE_MQTT__QOS"] == "choice"
    assert len(found) == len(LEAVES) >= 50  # one line per variable, no duplicates
    assert set(EXEMPT) <= set(found)


@pytest.mark.parametrize(("variable", "kind"), LEAVES, ids=[v for v, _ in LEAVES])
def test_every_setting_refuses_hostile_values_by_name(
    variable: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = []
    for value in HOSTILE:
        problems = _refused(monkeypatch, _with_camera(variable, value))
        if problems is None:
            continue
        refused.append(value)
        for problem in problems:
            assert problem.startswith(f"{variable}: "), (value[:20], problem)
            if len(value) > 5:
                assert value not in problem  # never echoed: it may be a secret
            assert len(problem) < 300
    if variable in EXEMPT:
        return
    must = {"number": [*NOT_FINITE, ""], "text": ["", "x" * 70_000], "choice": [""]}[kind]
    assert [v[:10] for v in must if v not in refused] == []
    if kind == "number":
        assert refused == HOSTILE


@pytest.mark.parametrize("position", range(4))
def test_each_roi_number_must_be_finite_and_bounded(
    position: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    roi = f"{CAMERA}ROIS__porch"
    for bad in [*NOT_FINITE, "100001"]:
        numbers = ["1", "1", "1", "1"]
        numbers[position] = bad
        problems = _refused(monkeypatch, _with_camera(roi, ",".join(numbers)))
        assert problems is not None, (position, bad)
        assert len(problems) == 1
        assert problems[0].startswith(f"{roi}: {('x', 'y', 'width', 'height')[position]}: ")


# --- the faults of the issue, one by one ------------------------------------------------------


def _problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    problems = _refused(monkeypatch, env)
    assert problems is not None, f"{sorted(env)} accepted"
    return problems


def test_a_roi_of_infinity_is_refused_rather_than_overflowing_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    roi = f"{CAMERA}ROIS__porch"
    for text in ["0,0,inf,10", "0,0,1e400,10", "nan,0,1,1"]:
        problems = _problems(monkeypatch, **_with_camera(roi, text))
        assert problems[0].startswith(f"{roi}: "), problems
        assert "finite" in problems[0]
    problems = _problems(monkeypatch, **_with_camera(roi, "0,0,200000,10"))
    assert problems == [f"{roi}: width: Input should be less than or equal to 100000"]


def test_non_finite_and_huge_numbers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in [
        (f"{CAMERA}OPEN_TIMEOUT_S", "inf"),
        (f"{CAMERA}OPEN_TIMEOUT_S", "601"),
        (f"{CAMERA}READ_TIMEOUT_S", "1e400"),
        (f"{CAMERA}WIDTH", "1" + "0" * 400),
        ("EDGE_MQTT__STATS_INTERVAL_S", "86401"),
        ("EDGE_MQTT__RECONNECT_MAX_S", "3601"),
        ("EDGE_MODEL__SCALE", "nan"),
        ("EDGE_MODEL__OFFSET", "1e300"),
        ("EDGE_INFERENCE__THRESHOLD", "nan"),
    ]:
        problems = _problems(monkeypatch, **_with_camera(variable, value))
        assert [p.split(":")[0] for p in problems] == [variable], problems
    # The shortest reconnect wait may not exceed the longest, even its default.
    problems = _problems(monkeypatch, EDGE_MQTT__RECONNECT_MIN_S="60")
    assert problems == ["EDGE_MQTT__RECONNECT_MIN_S: must be at most EDGE_MQTT__RECONNECT_MAX_S"]


def test_empty_host_and_model_path_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _problems(monkeypatch, EDGE_MQTT__HOST="") == [
        "EDGE_MQTT__HOST: is empty: give a value, or leave the variable out"
    ]
    assert _problems(monkeypatch, EDGE_MODEL__PATH="") == [
        "EDGE_MODEL__PATH: is empty: give a value, or leave the variable out"
    ]
    assert _problems(monkeypatch, EDGE_MODEL__PATH=str(tmp_path)) == [
        "EDGE_MODEL__PATH: is a directory: give the path of a file"
    ]
    # A host name resolves in paho's thread, where a bad label would end it.
    for host in ["a" * 64 + ".lan", "a..b", "broker lan"]:
        assert _problems(monkeypatch, EDGE_MQTT__HOST=host)[0].startswith("EDGE_MQTT__HOST: ")
    assert load_settings().model.path == BUNDLED_MODEL  # the default needs no setting


def test_a_value_for_a_whole_group_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _problems(monkeypatch, EDGE_MQTT="garbage") == [
        "EDGE_MQTT: a group of settings, not a value of its own: set them one by one as "
        "EDGE_MQTT__<SETTING>=value (see config/edge-daemon.env.example)"
    ]
    for variable in ["EDGE_MODEL", "EDGE_CAMERAS", "EDGE_CAMERAS__door", f"{CAMERA}ROIS"]:
        problems = _problems(monkeypatch, **_with_camera(variable, "garbage"))
        assert [p.split(":")[0] for p in problems] == [variable], problems
    env_file = tmp_path / "edge.env"
    env_file.write_text("EDGE_HOMEASSISTANT=on\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file)
    assert info.value.problems[0].startswith("EDGE_HOMEASSISTANT: a group of settings")


def test_an_env_file_that_is_not_text_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^env file .* is a directory: give the path"):
        load_settings(tmp_path)
    latin1 = tmp_path / "latin1.env"
    latin1.write_bytes(b"EDGE_MQTT__USERNAME=J\xfcrgen\n")
    with pytest.raises(ConfigError, match=r"^env file .* is not UTF-8 text: give the path"):
        load_settings(latin1)
    with pytest.raises(ConfigError, match=r"^env file .* does not exist"):
        load_settings(tmp_path / "none.env")


def test_long_text_that_would_kill_paho_later_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in [
        ("EDGE_MQTT__TOPIC_PREFIX", "t" * 65_530),
        ("EDGE_MQTT__TOPIC_PREFIX", "edge/\nx"),
        ("EDGE_MQTT__CLIENT_ID", "c" * 70_000),
        ("EDGE_MQTT__CLIENT_ID", "edge daemon"),
        ("EDGE_MQTT__USERNAME", "\u00e9" * 40_000),  # 40,000 characters, 80,000 bytes
        ("EDGE_MQTT__PASSWORD", "\u00e9" * 40_000),
        ("EDGE_HOMEASSISTANT__DISCOVERY_PREFIX", "h" * 201),
        ("EDGE_MODEL__LABELS", "l" * 4097),
        ("EDGE_MODEL__EDGETPU_LIBRARY", "l" * 4097),
        (f"{CAMERA}SOURCE", "s" * 4097),
    ]:
        problems = _problems(monkeypatch, **_with_camera(variable, value))
        assert [p.split(":")[0] for p in problems] == [variable], problems
        assert value not in problems[0]
    settings_ok = {"EDGE_MQTT__CLIENT_ID": "c" * 128, "EDGE_MQTT__PASSWORD": "p" * 65_535}
    assert _refused(monkeypatch, settings_ok) is None


def test_a_password_file_must_hold_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    for content, needle in [
        (b"\n", "its first line is empty"),
        (b"\xff\xfe\n", "cannot be read as UTF-8"),
        (b"p" * 70_000, "its first line is longer than the 65535 bytes MQTT allows"),
    ]:
        secret.write_bytes(content)
        problems = _problems(monkeypatch, EDGE_MQTT__PASSWORD_FILE=str(secret))
        assert problems[0].startswith(f"EDGE_MQTT__PASSWORD_FILE: {needle}"), problems
    assert _problems(monkeypatch, EDGE_MQTT__PASSWORD_FILE=str(tmp_path)) == [
        "EDGE_MQTT__PASSWORD_FILE: is a directory: give the path of a file"
    ]


def test_values_of_the_wrong_type_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value, needle in [
        ("EDGE_MQTT__PORT", "abc", "valid integer"),
        ("EDGE_INFERENCE__MAX_DELAY_MS", "abc", "valid number"),
        ("EDGE_MQTT__TLS", "yes please", "valid boolean"),
        ("EDGE_CONTROL__ENABLED", "maybe", "valid boolean"),
    ]:
        problems = _problems(monkeypatch, **{variable: value})
        assert len(problems) == 1
        assert problems[0].startswith(f"{variable}: ")
        assert needle in problems[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("EDGE_MQTT", "garbage"), ("EDGE_MQTT__HOST", ""), (f"{CAMERA}ROIS__porch", "0,0,inf,10")],
)
def test_the_command_line_exits_78_with_one_line(variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGE_")}
    env.update(_with_camera(variable, value))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_daemon", "run", "--duration", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-daemon:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"edge-daemon: error: {variable}: ")
    assert "Traceback" not in proc.stderr


def test_a_scale_may_be_written_as_a_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_MODEL__SCALE", "1/127.5")
    monkeypatch.setenv("EDGE_MODEL__OFFSET", "-1")
    settings = load_settings()
    assert settings.model.scale == pytest.approx(1 / 127.5)
    assert settings.model.offset == -1.0
    for bad in ["1/0", "a/b", "1e308/1e-308", "1/2/3"]:
        problems = _refused(monkeypatch, {"EDGE_MODEL__SCALE": bad})
        assert problems is not None, bad
        assert problems[0].startswith("EDGE_MODEL__SCALE: give a number or a fraction"), problems
