"""``edge-daemon demo`` (what ``make run`` runs): the sample clip through the daemon to a
subscriber, on the broker at 127.0.0.1:1883."""

from __future__ import annotations

import re

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
