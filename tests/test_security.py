"""TLS and passwords against mosquittos of our own, and secrets that never leak."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_daemon.broker import PrivateBroker, start_mosquitto
from edge_daemon.pipeline import Daemon
from edge_daemon.sources import redact
from tests.helpers import (
    run_daemon,
    running,
    settings_for,
    subscriber,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.runtime

USER, PASSWORD = "camera", "Corr3ct-Horse-Battery"
SECRET = "Sup3r-S3cret-Pa55-4a9f"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        cwd=folder,
    )
    return folder / f"{name}.crt", folder / f"{name}.key"


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], san: str | None) -> tuple[Path, Path]:
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=folder,
    )
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "extendedKeyUsage=clientAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        f"{name}.crt",
        cwd=folder,
    )
    return folder / f"{name}.crt", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    other = make_ca(folder, "other-ca")
    server = make_cert(folder, "server", ca, "DNS:localhost")  # not valid for 127.0.0.1
    client = make_cert(folder, "client", ca, None)
    for path in folder.iterdir():
        path.chmod(0o644)
    return Pki(ca[0], other[0], server[0], server[1], client[0], client[1])


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[PrivateBroker]:
    config = (
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\n"
        "password_file {dir}/passwd\nallow_anonymous false\n"
    )
    broker = start_mosquitto(extra_config=config.replace("password_file {dir}/passwd\n", ""))
    broker.kill()
    passwd = Path(broker.folder.name) / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), USER, PASSWORD], check=True)
    passwd.chmod(0o600)
    broker.config.write_text(
        broker.config.read_text().replace(
            "allow_anonymous false\n", f"password_file {passwd}\nallow_anonymous false\n"
        )
    )
    broker.relaunch()
    yield broker
    broker.stop()


def tls_settings(broker: PrivateBroker, pki: Pki, **mqtt: object) -> dict[str, object]:
    base: dict[str, object] = {
        "host": "localhost",
        "port": broker.port,
        "ca_file": pki.ca,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key,
        "username": USER,
        "password": PASSWORD,
        "reconnect_min_s": 0.5,
        "reconnect_max_s": 1,
    }
    base.update(mqtt)
    return base


def connects(settings_mqtt: dict[str, object], wait: float = 3.0) -> Daemon:
    daemon = Daemon(settings_for(unique_prefix(), mqtt=settings_mqtt))
    with running(daemon):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not daemon.publisher.connected:
            time.sleep(0.1)
    return daemon


def test_right_ca_client_certificate_and_password_connect(
    tls_broker: PrivateBroker, pki: Pki
) -> None:
    daemon = connects(tls_settings(tls_broker, pki))
    assert daemon.publisher.connects >= 1


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"ca_file": "OTHER"}, "certificate is not trusted"),
        ({"host": "127.0.0.1"}, "certificate is not trusted"),
    ],
)
def test_wrong_ca_or_hostname_is_refused_with_a_clear_line(
    tls_broker: PrivateBroker,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, object],
    expect: str,
) -> None:
    caplog.set_level(logging.INFO)
    if change.get("ca_file") == "OTHER":
        change = {"ca_file": pki.other_ca}
    daemon = connects(tls_settings(tls_broker, pki, **change))
    assert daemon.publisher.connects == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(expect in line and "EDGE_MQTT__CA_FILE" in line for line in lines), lines


def test_tls_insecure_skips_only_the_name_check_and_warns(
    tls_broker: PrivateBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = connects(tls_settings(tls_broker, pki, host="127.0.0.1", tls_insecure=True))
    assert daemon.publisher.connects >= 1
    assert any(
        "TLS_INSECURE" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records
    )
    # The CA is still checked.
    daemon = connects(
        tls_settings(tls_broker, pki, host="127.0.0.1", tls_insecure=True, ca_file=pki.other_ca)
    )
    assert daemon.publisher.connects == 0


def test_wrong_password_is_refused_and_logged_without_the_password(
    tls_broker: PrivateBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = connects(tls_settings(tls_broker, pki, password=SECRET))
    assert daemon.publisher.connects == 0
    assert daemon.publisher.last_refusal is not None
    assert any("refused the connection" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


def test_password_from_a_file_or_a_systemd_credential(
    tls_broker: PrivateBroker, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n")
    mqtt = tls_settings(tls_broker, pki, password_file=secret_file)
    del mqtt["password"]
    assert connects(mqtt).publisher.connects >= 1
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "EDGE_MQTT__PASSWORD").write_text(PASSWORD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    mqtt = tls_settings(tls_broker, pki)
    del mqtt["password"]
    assert connects(mqtt).publisher.connects >= 1


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("rtsp://admin:S3cret@10.0.0.1/stream", "rtsp://admin:***@10.0.0.1/stream"),
        ("rtsp://admin:p@ss/w0rd@cam.lan:554/x", "rtsp://admin:***@cam.lan:554/x"),
        ("rtmps://u:pw@h/live", "rtmps://u:***@h/live"),
        ("http://cam/v?user=a&password=hunter2&x=1", "http://cam/v?user=a&password=***&x=1"),
        (
            "rtspsrc location=rtsp://u:pw@h/x user-pw=hunter2 ! appsink",
            "rtspsrc location=rtsp://u:***@h/x user-pw=*** ! appsink",
        ),
        ("http://cam.lan:8080/stream.mjpg", "http://cam.lan:8080/stream.mjpg"),
        ("/dev/video0", "/dev/video0"),
        ("rtsp://ad@min.lan:pw@cam/x", "rtsp://***@cam/x"),  # a user name with @
        ("rtsp://admin:p w:@#x@cam/x", "rtsp://admin:***@cam/x"),  # unencoded characters
        ("rtsp://:onlypw@cam/x", "rtsp://***@cam/x"),
        (
            "https://cam/s?access_token=abc.def&apikey=K1&sig=S2&auth=A3&key=K4&fps=5",
            "https://cam/s?access_token=***&apikey=***&sig=***&auth=***&key=***&fps=5",
        ),
        (
            "http://cam/v?token=t0k&X-Amz-Signature=ab12",
            "http://cam/v?token=***&X-Amz-Signature=***",
        ),
    ],
)
def test_sources_are_redacted(source: str, shown: str) -> None:
    assert redact(source) == shown


def test_secrets_never_appear_in_logs_errors_check_or_messages(
    tls_broker: PrivateBroker, pki: Pki
) -> None:
    prefix = unique_prefix()
    env = {
        "EDGE_MQTT__HOST": "localhost",
        "EDGE_MQTT__PORT": str(tls_broker.port),
        "EDGE_MQTT__CA_FILE": str(pki.ca),
        "EDGE_MQTT__CERT_FILE": str(pki.client_cert),
        "EDGE_MQTT__KEY_FILE": str(pki.client_key),
        "EDGE_MQTT__USERNAME": USER,
        "EDGE_MQTT__PASSWORD": SECRET,
        "EDGE_MQTT__TOPIC_PREFIX": prefix,
        "EDGE_CAMERAS__door__SOURCE": f"rtsp://admin:{SECRET}@127.0.0.1:9/stream",
        "EDGE_CAMERAS__door__OPEN_TIMEOUT_S": "1",
        # Not a stream scheme the daemon knows, so it is taken for a file that does not exist.
        "EDGE_CAMERAS__yard__SOURCE": f"rtmps://admin:{SECRET}@127.0.0.1:9/live",
        "EDGE_CAMERAS__gate__SOURCE": f"http://127.0.0.1:9/video?user=a&password={SECRET}",
        "EDGE_CAMERAS__gate__OPEN_TIMEOUT_S": "1",
    }
    outputs = []
    for args in (["check", "--timeout", "3"], ["--debug", "run", "--duration", "3"]):
        proc = run_daemon(*args, env=env)
        outputs.append(proc.stdout + proc.stderr)
    bad = {**env, "EDGE_MQTT__PORT": SECRET}  # a secret pasted into the wrong variable
    proc = run_daemon("run", env=bad)
    assert proc.returncode == 78
    outputs.append(proc.stdout + proc.stderr)
    everything = "\n".join(outputs)
    assert "problem: broker:" in everything  # the wrong password was reported...
    assert "EDGE_MQTT__PORT" in everything
    assert SECRET not in everything  # ...without the password, the URL's or the pasted one
    assert "admin:***@" in everything
    assert "camera yard: video file rtmps://admin:***@127.0.0.1:9/live does not exist" in everything
    assert "password=***" in everything
    # Published messages: a subscriber on an open broker sees a daemon with the same secrets.
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix, mqtt={"username": USER, "password": SECRET}))
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.messages) >= 10)
            daemon.publish_stats()
            time.sleep(0.5)
        assert all(SECRET.encode() not in m.payload for m in sub.messages)


# --- broker misconfigurations say what is wrong, once -------------------------------------------


def errors(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and needle in r.getMessage()
    ]


def test_plain_mqtt_to_a_tls_port_says_so_once(
    tls_broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: never connected and logged nothing for 38 s."""
    caplog.set_level(logging.INFO)
    mqtt = {"port": tls_broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}
    daemon = Daemon(settings_for(unique_prefix(), mqtt=mqtt))
    with running(daemon):
        assert wait_until(lambda: bool(errors(caplog, "expects TLS")), timeout=10)
        time.sleep(3.0)  # many more attempts fail the same way
    assert daemon.publisher.connects == 0
    said = errors(caplog, "expects TLS")
    assert len(said) == 1, said
    assert "EDGE_MQTT__TLS=true" in said[0]


def test_a_refused_login_is_logged_once_per_reason(
    tls_broker: PrivateBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: one error line per retry (14 in 25 s)."""
    caplog.set_level(logging.INFO)
    mqtt = tls_settings(tls_broker, pki, password=SECRET, reconnect_min_s=0.2, reconnect_max_s=0.4)
    daemon = Daemon(settings_for(unique_prefix(), mqtt=mqtt))
    with running(daemon):
        assert wait_until(lambda: daemon.publisher.refusals >= 4, timeout=20)
    assert len(errors(caplog, "refused the connection")) == 1
    # The refusal explains the closed connection: no guess beside it.
    assert not errors(caplog, "cannot connect to broker")
    assert SECRET not in caplog.text


def test_broker_restarts_are_not_taken_for_another_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with start_mosquitto() as broker:
        mqtt = {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}
        daemon = Daemon(settings_for(unique_prefix(), mqtt=mqtt))
        with running(daemon):
            for _ in range(3):
                assert wait_until(lambda: daemon.publisher.connected, timeout=15)
                time.sleep(1.0)
                broker.kill()
                time.sleep(1.0)  # down for a second, as a restart is
                broker.relaunch()
            assert wait_until(lambda: daemon.publisher.connects >= 4, timeout=15)
    assert not errors(caplog, "another client")
    assert errors(caplog, "lost the broker connection")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_two_daemons_with_one_client_id_are_told_apart(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: they took each other's session 19 times in 40 s with only "Unspecified error"."""
    caplog.set_level(logging.INFO)
    client_id = f"twin-{uuid.uuid4().hex[:8]}"
    mqtt = {
        "client_id": client_id,
        "protocol": protocol,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 0.5,
    }
    first = Daemon(settings_for(unique_prefix(), mqtt=mqtt))
    second = Daemon(settings_for(unique_prefix(), mqtt=mqtt))
    with running(first), running(second):
        assert wait_until(lambda: bool(errors(caplog, "another client")), timeout=20)
    said = errors(caplog, "another client")
    assert client_id in said[0]
    assert "EDGE_DEVICE_ID" in said[0]
    assert len(said) <= 2  # once per daemon
