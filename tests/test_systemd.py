"""The systemd units: their hardening score, their contract, and the installer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = [ROOT / "systemd" / "edge-daemon.service", ROOT / "systemd" / "edge-daemon@.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_security_score_is_at_most_2(unit: Path, tmp_path: Path) -> None:
    target = unit
    if "@" in unit.name:
        target = tmp_path / "edge-daemon@cam1.service"
        shutil.copy(unit, target)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert found, proc.stdout + proc.stderr
    assert float(found[1]) <= 2.0, proc.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_contract(unit: Path) -> None:
    text = unit.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "LoadCredential=EDGE_MQTT__PASSWORD:",
        "DynamicUser=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "DeviceAllow=char-video4linux rw",
        "DeviceAllow=char-apex rw",
    ):
        assert line in text, f"{unit.name} lacks {line!r}"


def test_install_is_idempotent_and_uninstall_removes_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "PIP_ARGS": "--no-deps"}
    script = ROOT / "systemd" / "install.sh"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(script), "--root", str(root), *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert (root / "opt/edge-daemon/venv/bin/edge-daemon").exists()
    settings = root / "etc/edge-daemon/edge-daemon.env"
    assert settings.read_text() == (ROOT / "config/edge-daemon.env.example").read_text()
    password = root / "etc/edge-daemon/mqtt-password"
    assert password.stat().st_mode & 0o777 == 0o600
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit.name).read_text() == unit.read_text()
    settings.write_text("EDGE_MQTT__HOST=broker.lan\n")  # the user's own settings
    second = run()
    assert second.returncode == 0, second.stderr
    assert settings.read_text() == "EDGE_MQTT__HOST=broker.lan\n", "install overwrote settings"
    removed = run("--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/edge-daemon").exists()
    assert not (root / "etc/systemd/system/edge-daemon.service").exists()
    assert settings.exists(), "uninstall without --purge keeps the settings"
    purged = run("--uninstall", "--purge")
    assert purged.returncode == 0
    assert not (root / "etc/edge-daemon").exists()
