"""Stable states: per camera region, predictions become a state that changes only when a new
label is confirmed, and each state change is an event.

:class:`Tracker` is the pure state machine of one region. A prediction is first reduced to a
*candidate*: its top label when the score is at or above that label's threshold and the label
is not ignored, else ``None`` (nothing recognised). A candidate other than the current state
becomes the state once it is the candidate of ``confirm`` of the last ``window`` predictions,
the latest included (``window == confirm``: that many in a row). A glitch shorter than that
never changes the state. The state's ``since`` is the time of its first confirming prediction.

:class:`Thresholds` resolves a label's threshold: the region's per-label value, the region's
own default, the global per-label value, then the live ``EDGE_INFERENCE__THRESHOLD``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge_daemon.state_settings import RegionStateSettings, StateSettings


@dataclass(frozen=True, slots=True)
class Observation:
    """One prediction, as the state machine sees it."""

    #: The candidate: the label recognised, or None.
    label: str | None
    #: The top class's score (below the threshold when ``label`` is None).
    score: float
    #: The source's frame number.
    frame: int
    #: Capture time, seconds since the epoch.
    wall: float


@dataclass(frozen=True, slots=True)
class Change:
    """A new confirmed state."""

    #: The state before: a label, None (nothing recognised), or unknown (``previous_known``).
    previous: str | None
    previous_known: bool
    label: str | None
    #: Capture time of the first confirming prediction.
    since: float
    #: The prediction that confirmed it (its frame is the snapshot's).
    confirming: Observation
    #: The best score among the confirming predictions.
    best: float


class Thresholds:
    """A label's threshold and whether it is ignored, for one region."""

    def __init__(
        self,
        settings: StateSettings,
        region: RegionStateSettings | None,
        default: Callable[[], float],
    ) -> None:
        self._global = dict(settings.thresholds)
        self._region = dict(region.thresholds) if region is not None else {}
        self._region_default = region.threshold if region is not None else None
        ignore = region.ignore if region is not None and region.ignore is not None else None
        self.ignore = frozenset(settings.ignore if ignore is None else ignore)
        self._default = default

    def threshold(self, label: str) -> float:
        """The score a label needs to be recognised."""
        key = label.lower()
        if key in self._region:
            return self._region[key]
        if self._region_default is not None:
            return self._region_default
        if key in self._global:
            return self._global[key]
        return self._default()

    def candidate(self, label: str, score: float) -> str | None:
        """What a prediction whose top class is ``label`` says: the label, or None."""
        if label.lower() in self.ignore or score < self.threshold(label):
            return None
        return label


class Tracker:
    """The state of one region over its predictions."""

    def __init__(self, confirm: int, window: int | None = None) -> None:
        self.confirm = confirm
        self.window = max(window or confirm, confirm)
        self._recent: collections.deque[Observation] = collections.deque(maxlen=self.window)
        #: False until a first state is confirmed.
        self.known = False
        self.state: str | None = None
        self.since = 0.0
        #: The best score seen for the state while it holds.
        self.best = 0.0

    def observe(self, observation: Observation) -> Change | None:
        """Take one prediction; a :class:`Change` when it confirms a new state."""
        label = observation.label
        if self.known and label == self.state:
            self.best = max(self.best, observation.score)
            self._recent.append(observation)
            return None
        self._recent.append(observation)
        agreeing = [o for o in self._recent if o.label == label]
        if len(agreeing) < self.confirm:
            return None
        change = Change(
            previous=self.state,
            previous_known=self.known,
            label=label,
            since=agreeing[0].wall,
            confirming=observation,
            best=max(o.score for o in agreeing),
        )
        self.known, self.state, self.since, self.best = True, label, change.since, change.best
        # Only what came after the change counts towards the next one.
        self._recent.clear()
        return change


def trackers(
    settings: StateSettings,
    regions: Mapping[str, Mapping[str, RegionStateSettings | None]],
    default: Callable[[], float],
) -> dict[tuple[str, str], tuple[Tracker, Thresholds]]:
    """A tracker and thresholds per ``(camera, roi)``, from the regions' own settings."""
    out = {}
    for camera, rois in regions.items():
        for roi, own in rois.items():
            confirm = own.confirm_frames if own and own.confirm_frames else settings.confirm_frames
            out[camera, roi] = (
                Tracker(confirm, settings.window),
                Thresholds(settings, own, default),
            )
    return out
