"""Stable states, events and snapshots: the state machine alone, then the daemon on a clip whose
region changes label at known frames, with glitches, against the real broker."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import jinja2
import jsonschema
import numpy as np
import pytest

from edge_daemon.broker import start_mosquitto
from edge_daemon.engine import Engine, load_engine
from edge_daemon.homeassistant import ATTRIBUTES_TEMPLATE, STATE_TEMPLATE
from edge_daemon.pipeline import Daemon
from edge_daemon.preprocess import Image, as_image
from edge_daemon.scene import _parse_state
from edge_daemon.settings import SAMPLE_CLIP, CameraSettings, Roi, sample_camera_rois
from edge_daemon.state import Observation, Thresholds, Tracker
from edge_daemon.state_settings import RegionStateSettings, StateSettings
from tests.helpers import (
    Subscriber,
    running,
    schema,
    settings_for,
    subscriber,
    unique_prefix,
    wait_until,
    write_video,
)

STATE = schema("state.v1.json")
EVENT = schema("event.v1.json")


# --- the state machine alone -----------------------------------------------------------------


def _feed(tracker: Tracker, labels: Sequence[str | None]) -> list[tuple[int, str | None]]:
    """``(index of the confirming prediction, new state)`` for each change."""
    changes = []
    for i, label in enumerate(labels):
        change = tracker.observe(Observation(label, 0.9, i, 1000.0 + i))
        if change is not None:
            changes.append((i, change.label))
    return changes


def test_a_state_needs_confirm_predictions_in_a_row_and_a_glitch_never_changes_it() -> None:
    labels = [*"aaaaabaaabbaa", *"bbbb", None, None, "b", None, None, None]
    assert _feed(Tracker(3), labels) == [(2, "a"), (15, "b"), (22, None)]


def test_the_state_says_when_it_began_and_what_came_before() -> None:
    tracker = Tracker(3)
    for i, label in enumerate(["x", "x", "x", "y", "z", "y", "y", "y"]):
        change = tracker.observe(Observation(label, 0.5 + i / 100, i, 100.0 + i))
    assert change is not None
    # "y" at 3, broken by "z", then three in a row from 5: since is the first of those.
    assert (change.previous, change.label, change.since, change.confirming.frame) == (
        "x",
        "y",
        105.0,
        7,
    )
    assert change.best == pytest.approx(0.57)
    assert change.previous_known


def test_a_sliding_window_confirms_through_a_glitch_that_consecutive_frames_would_not() -> None:
    labels = [*"aaabbab", *"aaaa"]
    assert _feed(Tracker(3), labels) == [(2, "a")]
    assert _feed(Tracker(3, window=5), labels) == [(2, "a"), (6, "b"), (9, "a")]


def test_a_flickering_classifier_changes_state_far_less_often_than_its_labels() -> None:
    """An 80% accurate classifier on a still scene (two wrong labels, 10% each): its label
    flips a third of the frames; the state changes rarely, and never with 5 in a row. A
    3-of-5 window changes more often than 3 in a row: it is for a true label read through
    glitches, not for calm. Figures for the closing note."""
    rng = np.random.default_rng(1)
    frames = 30 * 60 * 10  # ten minutes at 30 fps
    labels: list[str | None] = [
        "open" if rng.random() < 0.8 else str(rng.choice(["closed", "ajar"])) for _ in range(frames)
    ]
    flips = sum(a != b for a, b in itertools.pairwise(labels))
    three = len(_feed(Tracker(3), labels)) - 1
    windowed = len(_feed(Tracker(3, window=5), labels)) - 1
    five = len(_feed(Tracker(5), labels)) - 1
    print(
        f"label flips {flips}; state changes: 3 in a row {three}, 3 of 5 {windowed}, "
        f"5 in a row {five}"
    )
    assert flips > 5000
    assert 0 < three < 150  # about 2 x 18,000 x 0.1^3 = 36 excursions, each two changes
    assert windowed > three
    assert five <= 4


def test_thresholds_come_from_the_region_then_the_label_then_the_global_setting() -> None:
    settings = StateSettings(thresholds={"Open": 0.8}, ignore=("background",))
    live = [0.5]
    plain = Thresholds(settings, None, lambda: live[0])
    assert plain.threshold("open") == plain.threshold("OPEN") == 0.8
    assert plain.threshold("closed") == 0.5
    live[0] = 0.6  # the control topic changed the threshold
    assert plain.threshold("closed") == 0.6
    assert plain.candidate("open", 0.79) is None
    assert plain.candidate("open", 0.8) == "open"
    assert plain.candidate("Background", 0.99) is None  # ignored: reads as nothing
    region = RegionStateSettings(threshold=0.3, thresholds={"open": 0.95}, ignore=("closed",))
    own = Thresholds(settings, region, lambda: 0.5)
    assert own.threshold("open") == 0.95
    assert own.threshold("ajar") == 0.3
    assert own.candidate("closed", 0.99) is None
    assert own.candidate("background", 0.99) == "background"  # the region's list replaces it


# --- the daemon on a clip with known changes ---------------------------------------------------

#: The clip: (digit shown, frames), and single- or two-frame glitches inside segments.
SEGMENTS = [("7", 12), ("2", 12), ("5", 12), ("9", 12), ("7", 12), ("1", 10)]
GLITCHES = {18: "9", 28: "0", 29: "0", 54: "8"}
CONFIRM = 3
#: The digit 9 is never sure enough (its threshold 1.0 is above any score) and 1 is ignored:
#: both read as nothing, so the true states are 7, 2, 5, null, 7, null.
TRUE_STATES = ["7", "2", "5", None, "7", None]
FPS = 15.0


def _exemplars(engine: Engine) -> dict[str, Image]:
    """A frame of the sample clip per digit that the model reads surely and rightly."""
    rois = sample_camera_rois()
    x, y, w, h = Roi.parse(rois["digit"]).box(320, 240)
    truth = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text())["truth"]
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    best: dict[str, tuple[float, Image]] = {}
    for number in range(len(truth)):
        ok, read_frame = capture.read()
        if not ok:
            break
        frame = as_image(read_frame)
        scores = engine.probabilities(engine.infer([frame[y : y + h, x : x + w]]))[0]
        top = int(np.argmax(scores))
        label = engine.labels[top]
        if label == truth[number] and scores[top] > best.get(label, (0.0, frame))[0]:
            best[label] = (float(scores[top]), frame)
    capture.release()
    return {label: frame for label, (_, frame) in best.items()}


def _clip_labels() -> list[str]:
    labels = [digit for digit, count in SEGMENTS for _ in range(count)]
    for frame, digit in GLITCHES.items():
        labels[frame] = digit
    return labels


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = load_engine(settings_for(unique_prefix()))
    frames = _exemplars(engine)
    path = write_video(
        tmp_path_factory.mktemp("states") / "changes.mp4",
        [frames[d] for d in _clip_labels()],
        fps=FPS,
    )
    # The clip is what the test thinks it is: the model reads every frame as designed.
    x, y, w, h = Roi.parse(sample_camera_rois()["digit"]).box(320, 240)
    capture = cv2.VideoCapture(str(path))
    read = []
    while True:
        ok, read_frame = capture.read()
        if not ok:
            break
        frame = as_image(read_frame)
        scores = engine.probabilities(engine.infer([frame[y : y + h, x : x + w]]))[0]
        assert scores.max() >= 0.6
        read.append(engine.labels[int(np.argmax(scores))])
    capture.release()
    assert read == _clip_labels()
    return path


def _settings(prefix: str, clip: Path, **overrides: Any) -> Any:
    camera = CameraSettings(
        source=str(clip),
        loop=False,
        rois={"digit": Roi.parse(sample_camera_rois()["digit"])},
    )
    overrides.setdefault("snapshots", {"min_interval_s": 0})
    return settings_for(
        prefix,
        cameras={"cam": camera},
        state={"confirm_frames": CONFIRM, "thresholds": {"9": 1.0}, "ignore": "1"},
        **overrides,
    )


def _true_changes() -> list[int]:
    starts, frame = [], 0
    for _, count in SEGMENTS:
        starts.append(frame)
        frame += count
    return starts


def _run(settings: Any, sub: Subscriber) -> Daemon:
    daemon = Daemon(settings)
    with running(daemon):
        assert wait_until(lambda: daemon.cameras[0].finished, timeout=60)
        assert wait_until(lambda: daemon.publisher.queued == 0, timeout=10)
    return daemon


def _states(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on("cam", "digit", "state")]


def _events(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on("events")]


def _render(template: str, payload: dict[str, Any]) -> str:
    return jinja2.Environment().from_string(template).render(value_json=payload)


def test_one_state_per_real_change_none_for_a_glitch_with_paired_events_and_snapshots(
    clip: Path,
) -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = _run(_settings(prefix, clip, mqtt={"labels": "off"}), sub)
        assert sub.wait_for(lambda: len(sub.on("cam", "digit", "snapshot")) >= len(TRUE_STATES))
    states = _states(sub)
    for state in states:
        jsonschema.validate(state, STATE)
    assert [s["label"] for s in states] == TRUE_STATES
    assert [s["previous"] for s in states] == [None, *TRUE_STATES[:-1]]
    # Each within CONFIRM + 2 frames of the true change, and never before it.
    lags = [s["frame"] - start for s, start in zip(states, _true_changes(), strict=True)]
    assert all(CONFIRM - 1 <= lag <= CONFIRM + 1 for lag in lags), lags
    print(f"states {len(states)} for {len(SEGMENTS)} segments, lags {lags} frames")
    assert all(m.retain is False for m in sub.on("cam", "digit", "state"))  # live, not replayed
    # Per-frame labels are off: none at all.
    assert sub.on("cam", "digit", "label") == []
    # Events: a start and an end for every non-null state, paired by id, in order.
    events = _events(sub)
    for event in events:
        jsonschema.validate(event, EVENT)
    starts = [e for e in events if e["type"] == "start"]
    ends = {e["id"]: e for e in events if e["type"] == "end"}
    assert [e["label"] for e in starts] == [s for s in TRUE_STATES if s is not None]
    assert set(ends) == {e["id"] for e in starts}
    for start in starts:
        end = ends[start["id"]]
        assert end["start"] == start["start"]
        assert end["label"] == start["label"]
        seconds = (
            datetime.fromisoformat(end["end"]) - datetime.fromisoformat(end["start"])
        ).total_seconds()
        assert end["duration_s"] == pytest.approx(seconds, abs=0.002)
        assert 0 < end["best_score"] <= 1
    # A snapshot per change: a JPEG with the region's box drawn in the label's colour.
    snapshots = sub.on("cam", "digit", "snapshot")
    assert len(snapshots) == len(TRUE_STATES)
    x, y, _w, h = Roi.parse(sample_camera_rois()["digit"]).box(320, 240)
    for message, state in zip(snapshots, states, strict=True):
        image = cv2.imdecode(np.frombuffer(message.payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        assert image.shape == (240, 320, 3)
        edge = image[y + h // 2, x - 2 : x + 3].astype(int)  # the box's left side
        green = edge[:, 1] - np.maximum(edge[:, 0], edge[:, 2])
        if state["label"] is None:
            assert (np.abs(edge[:, 1] - edge[:, 0]) < 40).any()  # grey for nothing
        else:
            assert green.max() > 80, edge
    # Home Assistant's sensor: as many changes as the region had, attributes per state only.
    rendered = [_render(STATE_TEMPLATE, s) for s in states]
    assert rendered == [s or "none" for s in TRUE_STATES]
    assert sum(a != b for a, b in itertools.pairwise(rendered)) == 5
    attributes = json.loads(_render(ATTRIBUTES_TEMPLATE, states[-1]))
    assert attributes["previous"] == "7"
    assert attributes["roi"] == "digit"
    assert daemon.states.stats() == {
        "changes": 6,
        "events": 8,
        "snapshots": 6,
        "snapshot_failures": 0,
    }


@pytest.fixture
def steady(tmp_path: Path, clip: Path) -> Path:
    """A clip that shows 7 throughout (the first 12 frames of ``clip``)."""
    capture = cv2.VideoCapture(str(clip))
    frames = [capture.read()[1] for _ in range(12)]
    capture.release()
    return write_video(tmp_path / "steady.mp4", frames, fps=FPS)


def test_a_restart_republishes_the_state_without_a_false_change(steady: Path, clip: Path) -> None:
    prefix = unique_prefix()
    with subscriber(prefix) as first:
        _run(_settings(prefix, steady), first)
        assert first.wait_for(lambda: len(first.on("cam", "digit", "snapshot")) == 1)
    (before,) = _states(first)
    (started,) = _events(first)
    assert before["label"] == "7"
    assert started["type"] == "start"
    # The same scene after a restart: the state again, unchanged, and no event or snapshot.
    with subscriber(prefix, topics=("+/+/state", "events", "+/+/snapshot")) as second:
        # What was retained comes first; the rest is what the second run published.
        assert second.wait_for(lambda: len(second.messages) >= 2)
        retained = len(second.messages)
        _run(_settings(prefix, steady), second)
        assert second.wait_for(lambda: len(_states(second)) >= 2)
        fresh = second.messages[retained:]
    assert [m.topic.rsplit("/", 1)[-1] for m in fresh] == ["state"]
    again = fresh[0].json()
    assert again["label"] == before["label"]
    assert (again["since"], again["previous"]) == (before["since"], before["previous"])
    assert _render(STATE_TEMPLATE, again) == _render(STATE_TEMPLATE, before)
    # Then the scene changes (the full clip starts with 7, then 2): the event that began
    # before the restart ends under its first id.
    with subscriber(prefix, topics=("events",)) as third:
        daemon = _run(_settings(prefix, clip), third)
        assert third.wait_for(lambda: len(_events(third)) >= 2)
    ended = _events(third)[0]
    assert (ended["type"], ended["id"], ended["label"]) == ("end", started["id"], "7")
    assert ended["start"] == started["start"]
    assert daemon.states.stats()["changes"] == len(TRUE_STATES) - 1


def test_states_and_events_are_never_pushed_out_by_a_flood_of_labels(clip: Path) -> None:
    """A queue of 20 messages, a broker away: labels are dropped, states and events kept."""
    prefix = unique_prefix()
    settings = _settings(
        prefix, clip, mqtt={"port": 1, "queue_size": 20}, snapshots={"enabled": False}
    )
    daemon = Daemon(settings)
    daemon.states.recalled()  # nothing to read back from a broker that is not there
    with running(daemon):
        assert wait_until(lambda: daemon.cameras[0].finished, timeout=60)
        assert wait_until(lambda: daemon.stats.predictions >= 60, timeout=10)
        kept = list(daemon.publisher._priority)
    assert daemon.publisher.dropped > 0
    topics = [m.topic.removeprefix(prefix + "/") for m in kept]
    # Every event, and the region's newest state (retained: only the newest matters).
    assert topics.count("events") == 8
    (state,) = [m for m in kept if m.topic.endswith("/state")]
    assert json.loads(state.payload)["label"] is None


def test_a_region_of_another_name_in_state_settings_is_refused() -> None:
    with pytest.raises(Exception, match="STATE__porch: no region of that name"):
        settings_for(
            unique_prefix(),
            cameras={"cam": {"source": "x.mp4", "state": {"porch": {"threshold": 0.5}}}},
        )
    region = RegionStateSettings.model_validate({"ignore": "a, B"})
    assert region.ignore == ("a", "b")


def test_a_retained_state_this_daemon_did_not_write_is_ignored() -> None:
    since = "2026-11-29T10:00:00.000+00:00"
    good = {"label": "7", "previous": None, "score": 0.9, "since": since}
    assert _parse_state(json.dumps(good).encode()) is not None
    for bad in [
        b'{"label": "7", "previous": null, "score": NaN, "since": "%s"}' % since.encode(),
        b'{"label": "7", "previous": null, "score": Infinity, "since": "%s"}' % since.encode(),
        json.dumps({**good, "score": "nan"}).encode(),
        json.dumps({**good, "score": True}).encode(),
        json.dumps({**good, "score": 1.5}).encode(),
        json.dumps({**good, "label": 7}).encode(),
        json.dumps({**good, "since": "yesterday"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "since"}).encode(),
        b"[1, 2]",
        b"\xff\xfe",
    ]:
        assert _parse_state(bad) is None, bad


def test_a_broker_that_lets_the_daemon_write_but_not_read_still_gets_its_states(
    steady: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write-only ACL: no retained state can be read back. The daemon says so, once, as an
    error, and goes on: its states are published after the recall gives up."""
    acl = tmp_path / "acl"
    acl.write_text("topic write test/#\n")
    with start_mosquitto(extra_config=f"acl_file {acl}\n") as broker:
        prefix = unique_prefix()
        settings = _settings(prefix, steady, mqtt={"port": broker.port})
        daemon = Daemon(settings)
        with caplog.at_level(logging.ERROR), running(daemon):
            assert wait_until(lambda: daemon.states.changes == 1, timeout=15)
            assert wait_until(lambda: daemon.publisher.queued == 0, timeout=5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "read access" in errors[0]


def test_snapshots_are_bounded_per_region_and_the_last_change_is_shown_at_stop(
    clip: Path,
) -> None:
    """One snapshot per 10 minutes at most: the first change's at once, the rest held; the stop
    sends the newest held one, so the retained snapshot matches the retained state."""
    prefix = unique_prefix()
    with subscriber(prefix, topics=("+/+/snapshot",)) as sub:
        daemon = _run(_settings(prefix, clip, snapshots={"min_interval_s": 600}), sub)
        assert sub.wait_for(lambda: len(sub.messages) >= 2)
    first, last = (m.payload for m in sub.messages)
    x, y, _, h = Roi.parse(sample_camera_rois()["digit"]).box(320, 240)

    def box_colour(jpeg: bytes) -> list[int]:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        return [int(v) for v in image[y + h // 2, x - 2 : x + 3].astype(int).max(axis=0)]

    assert box_colour(first)[1] - box_colour(first)[0] > 80  # green: 7 recognised
    assert abs(box_colour(last)[1] - box_colour(last)[0]) < 40  # grey: nothing, the last state
    assert daemon.states.snapshots == 2
