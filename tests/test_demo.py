"""``edge-daemon demo`` (what ``make run`` runs): the sample clip through the daemon to a
subscriber, on the broker at 127.0.0.1:1883; and ``--duration``, which it shares with ``run`` and
``collect``."""

from __future__ import annotations

import re

import pytest

from tests.helpers import run_daemon


def test_demo_classifies_the_sample_and_says_only_its_own_lines() -> None:
    result = run_daemon("demo", "--duration", "3", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = re.search(r"received (\d+) labels, ([\d.]+)% match the ground truth", result.stdout)
    assert summary is not None, result.stdout[-2000:]
    # 10 frames a second for 3 s, less the start; the bundled model reads the clip well.
    assert int(summary.group(1)) >= 15
    assert float(summary.group(2)) >= 90.0
    # OpenCV's own warnings (it says it drops its FFmpeg lock, which the daemon asks for) stay
    # out of a user's first run, as they do for ``run`` (``--debug`` lets them through).
    assert "[ WARN" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("command", [["run"], ["collect", "crops"], ["demo"]])
@pytest.mark.parametrize("duration", ["-5", "0", "nan", "inf", "1e12", "soon"])
def test_a_duration_that_is_not_a_time_is_refused_in_one_line(
    command: list[str], duration: str
) -> None:
    """Before: -5 and nan started the daemon and stopped it at once (the demo then said only
    "no labels received"), 0 and inf ran until stopped."""
    proc = run_daemon(*command, "--duration", duration, timeout=30)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("give seconds above 0 and at most 31536000 (a year), or leave it out")
    assert "Traceback" not in proc.stderr
