"""The control topic: valid commands work; thousands of bad ones never hurt the daemon."""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.control import (
    COMMAND_LIMITS,
    REJECT_REPLIES_PER_S,
    REJECT_REPLY_BURST,
    CommandError,
    RateLimit,
    command_schema,
    parse,
)
from edge_daemon.pipeline import Daemon
from edge_daemon.publisher import close_client
from tests.helpers import (
    BROKER,
    running,
    settings_for,
    subscriber,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.runtime

SCHEMA = json.loads(resources.files("edge_daemon").joinpath("schemas", "cmd.v1.json").read_text())


def test_shipped_schema_is_the_models() -> None:
    shipped = {k: v for k, v in SCHEMA.items() if k not in {"$schema", "title"}}
    assert shipped == command_schema()


def publisher_client() -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(*BROKER)
    client.loop_start()
    return client


def test_control_is_off_by_default() -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix))
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 3)
            client = publisher_client()
            client.publish(
                f"{prefix}/cmd", json.dumps({"cmd": "pause", "camera": "sample"}), qos=1
            ).wait_for_publish(5)
            time.sleep(1.0)
            count = len(sub.labels())
            assert sub.wait_for(lambda: len(sub.labels()) > count + 3)
            close_client(client)
        assert not sub.on("cmd", "result")
        assert daemon.inbox is None


def test_commands_pause_resume_threshold_snapshot_status() -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(
            settings_for(prefix, control={"enabled": True}, mqtt={"stats_interval_s": 0})
        )
        client = publisher_client()

        def send(**command: object) -> None:
            jsonschema.validate(command, SCHEMA)
            client.publish(f"{prefix}/cmd", json.dumps(command), qos=1).wait_for_publish(5)

        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 3)
            send(cmd="pause", camera="sample", id="p1")
            assert sub.wait_for(
                lambda: any(m.json().get("id") == "p1" for m in sub.on("cmd", "result"))
            )
            time.sleep(0.5)
            paused_at = len(sub.labels())
            time.sleep(1.5)
            assert len(sub.labels()) <= paused_at + 1
            send(cmd="resume", camera="sample")
            assert sub.wait_for(lambda: len(sub.labels()) > paused_at + 5)
            send(cmd="threshold", value=1.0)
            time.sleep(1.0)
            mark = len(sub.labels())
            assert sub.wait_for(lambda: len(sub.labels()) > mark + 3)
            assert all(p["label"] is None for p in sub.labels()[mark + 1 :] if p["score"] < 1.0)
            send(cmd="snapshot", camera="sample")
            assert sub.wait_for(lambda: bool(sub.on("sample", "snapshot")))
            assert sub.on("sample", "snapshot")[0].payload[:2] == b"\xff\xd8"  # JPEG
            send(cmd="status")
            assert sub.wait_for(lambda: bool(sub.on("stats")))
            send(cmd="pause", camera="nope", id="bad")
            assert sub.wait_for(
                lambda: any(m.json().get("id") == "bad" for m in sub.on("cmd", "result"))
            )
            bad = next(m.json() for m in sub.on("cmd", "result") if m.json().get("id") == "bad")
            assert bad["ok"] is False
            assert "no camera named" in bad["error"]
        close_client(client)
        assert sub.validate_all() > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
near_commands = st.fixed_dictionaries(
    {
        "cmd": st.sampled_from(
            ["pause", "resume", "threshold", "snapshot", "status", "reboot", "", "PAUSE"]
        )
    },
    optional={
        "camera": json_values | st.text(max_size=100),
        "value": json_values,
        "id": json_values,
        "extra": json_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_commands.map(lambda v: json.dumps(v).encode()),
    st.integers(5_000, 200_000).map(lambda n: b'{"cmd": "status", "id": "' + b"x" * n + b'"}'),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


def test_thousands_of_random_and_malformed_commands_never_hurt_the_daemon() -> None:
    prefix = unique_prefix()
    # Not the flood itself (``cmd``): only what the daemon publishes.
    topics = ("status", "stats", "cmd/result", "+/status", "+/+/label")
    with subscriber(prefix, topics=topics) as sub:
        daemon = Daemon(settings_for(prefix, control={"enabled": True}))
        client = publisher_client()
        sent = []

        @settings(
            max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(payloads)
        def send(payload: bytes) -> None:
            client.publish(f"{prefix}/cmd", payload, qos=0)
            sent.append(payload)

        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 3)
            flood_started = time.monotonic()
            send()
            flood_s = time.monotonic() - flood_started
            control = daemon.controller
            assert control is not None
            # Once the flood is handled, a status command goes through again (its kind's
            # rate limit refills within a second or two).
            assert sub.wait_for(lambda: control.inbox.pending() == 0)

            def answered() -> bool:
                client.publish(
                    f"{prefix}/cmd", b'{"cmd": "status", "id": "last"}', qos=1
                ).wait_for_publish(10)
                return sub.wait_for(
                    lambda: any(
                        m.json().get("id") == "last" and m.json()["ok"]
                        for m in sub.on("cmd", "result")
                    ),
                    timeout=2,
                )

            assert sub.wait_for(answered, timeout=30)
            count = len(sub.labels())
            assert sub.wait_for(lambda: len(sub.labels()) > count + 5), "labels stopped"
            assert daemon.fatal is None
            assert all(c.online for c in daemon.cameras)
            assert sub.wait_for(
                lambda: any(
                    m.json().get("control", {}).get("rejected") == control.rejected
                    for m in sub.on("stats")
                )
            )
        close_client(client)
    assert len(sent) >= 1000
    assert daemon.inbox is not None
    inbox = daemon.inbox
    # How many the 64-message inbox drops in the flood depends on the machine's load.
    assert control.rejected >= 100
    assert control.rejected + inbox.dropped >= 500
    assert control.ok + control.rejected + inbox.dropped + inbox.oversize == inbox.received
    # Bad messages are not echoed back one for one: replies to rejections are rate-limited.
    refusals = [m for m in sub.on("cmd", "result") if m.json()["ok"] is False]
    allowed = REJECT_REPLY_BURST + REJECT_REPLIES_PER_S * (time.monotonic() - flood_started + 1)
    assert len(refusals) <= allowed
    assert len(refusals) + control.unanswered == control.rejected
    assert sub.validate_all() > 0
    print(
        f"sent {len(sent)} random commands in {flood_s:.1f} s: {control.ok} carried out, "
        f"{control.rejected} rejected ({len(refusals)} answered, {control.limited} over their "
        f"kind's rate), {inbox.dropped} dropped in the flood, {inbox.oversize} oversize"
    )


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limit = RateLimit(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limit.allow() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 0.49
    assert not limit.allow()
    now[0] = 0.5
    assert limit.allow()
    assert not limit.allow()
    now[0] = 100.0  # a long quiet spell refills only up to the burst
    assert sum(limit.allow() for _ in range(10)) == 3


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_valid_commands_is_limited_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """Before: 2,241 status and snapshot commands gave 2,258 stats messages, 2,241 JPEGs and
    4,485 log lines in 20 s."""
    caplog.set_level(logging.INFO)
    prefix = unique_prefix()
    with subscriber(prefix, topics=("stats", "sample/snapshot", "cmd/result")) as sub:
        daemon = Daemon(
            settings_for(prefix, control={"enabled": True}, mqtt={"stats_interval_s": 0})
        )
        client = publisher_client()
        with running(daemon):
            assert wait_until(lambda: daemon.stats.items >= 3)
            started = time.monotonic()
            for i in range(2000):
                command = {"cmd": "status"} if i % 2 else {"cmd": "snapshot", "camera": "sample"}
                client.publish(f"{prefix}/cmd", json.dumps(command), qos=0)
            control = daemon.controller
            assert control is not None
            assert wait_until(lambda: control.inbox.received >= 1900, timeout=30)
            assert wait_until(lambda: control.inbox.pending() == 0, timeout=10)
            took = time.monotonic() - started
            time.sleep(1.0)
        close_client(client)
    stats, snapshots = len(sub.on("stats")), len(sub.on("sample", "snapshot"))
    for kind, count in (("status", stats), ("snapshot", snapshots)):
        rate, burst = COMMAND_LIMITS[kind]
        assert count <= burst + rate * (took + 2), f"{count} {kind} carried out in {took:.1f} s"
    inbox = control.inbox
    assert control.ok + control.rejected + inbox.dropped + inbox.oversize == inbox.received
    assert control.limited + inbox.dropped > 1500  # the flood was held back, not carried out
    done_lines = [r for r in caplog.records if "control:" in r.getMessage() and r.levelno >= 20]
    rejected_lines = [r for r in caplog.records if "rejected a control" in r.getMessage()]
    assert len(done_lines) + len(rejected_lines) <= 20 + 2 * (took + 2)
    print(
        f"2000 valid commands in {took:.1f} s: {stats} stats messages, {snapshots} snapshots, "
        f"{control.limited} over their rate, {inbox.dropped} dropped from the inbox, "
        f"{len(done_lines) + len(rejected_lines)} log lines"
    )


def test_oversize_commands_are_dropped_unkept_and_memory_comes_back() -> None:
    """Before: 40 messages of 10 MB took resident memory from 139 to 321 MiB, and it kept 232."""
    prefix = unique_prefix()
    daemon = Daemon(settings_for(prefix, control={"enabled": True}))
    client = publisher_client()
    big = b"{" + b" " * (10 * 1024 * 1024) + b"}"
    with running(daemon):
        assert wait_until(lambda: daemon.stats.items >= 3)
        before = rss_mib()
        for _ in range(40):
            client.publish(f"{prefix}/cmd", big, qos=1).wait_for_publish(30)
        control = daemon.controller
        assert control is not None
        assert wait_until(lambda: control.inbox.oversize == 40, timeout=60)
        assert control.inbox.pending() == 0  # none of them was kept
        # The supervisor hands the freed memory back at the burst's start and again once the
        # trim's rate allows (at most every 5 s): the last messages' buffers too.
        wait_until(lambda: rss_mib() - before < 40, timeout=10)
        after = rss_mib()
        assert wait_until(lambda: daemon.stats.items > 10)  # still classifying
    close_client(client)
    print(f"resident memory {before:.0f} MiB before 40 x 10 MB commands, {after:.0f} MiB after")
    assert after - before < 40, f"{before:.0f} -> {after:.0f} MiB"


@pytest.mark.parametrize("value", ['"0.7"', "true", "null", "[0.5]", "1.5", "-0.1", "NaN"])
def test_a_threshold_that_is_not_a_number_from_0_to_1_is_refused(value: str) -> None:
    with pytest.raises(CommandError, match="value"):
        parse(f'{{"cmd": "threshold", "value": {value}}}'.encode(), 4096)
    assert parse(b'{"cmd": "threshold", "value": 1}', 4096).value == 1.0  # type: ignore[union-attr]
