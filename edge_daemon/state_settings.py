"""Settings of the stable states, their events and snapshots (``EDGE_STATE__``,
``EDGE_SNAPSHOTS__``, and a region's own ``EDGE_CAMERAS__<camera>__STATE__<roi>__``).

Labels are matched without regard to case: the environment's names are read in lower case, so
``EDGE_STATE__THRESHOLDS__open=0.8`` applies to a label ``Open`` as well.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from edge_daemon.fields import Group

#: A score threshold.
Score = Annotated[float, Field(ge=0, le=1)]
#: Longest label a setting names.
MAX_LABEL = 200
#: Most labels a threshold or ignore setting lists.
MAX_LABELS = 1000


def _label_list(value: Any) -> Any:
    """``background, empty`` (or a JSON list) to a tuple of lower-case labels."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("is empty: give labels separated by commas, or leave it out")
        if text.startswith("["):
            import json  # noqa: PLC0415

            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError("give labels separated by commas, e.g. background,empty") from None
        else:
            value = [part for part in (p.strip() for p in text.split(",")) if part]
    if isinstance(value, list | tuple):
        if len(value) > MAX_LABELS:
            raise ValueError(f"lists more than {MAX_LABELS} labels")
        out = []
        for item in value:
            if not isinstance(item, str) or not item.strip() or len(item) > MAX_LABEL:
                raise ValueError(f"each label must be text of 1 to {MAX_LABEL} characters")
            out.append(item.strip().lower())
        return tuple(out)
    return value


def _thresholds(value: dict[str, float]) -> dict[str, float]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"lists more than {MAX_LABELS} labels")
    for label in value:
        if not label.strip() or len(label) > MAX_LABEL:
            raise ValueError(f"each label must be text of 1 to {MAX_LABEL} characters")
    return {label.strip().lower(): score for label, score in value.items()}


LabelList = Annotated[tuple[str, ...], NoDecode]


class RegionStateSettings(Group):
    """One region's own state settings, over the ``EDGE_STATE__`` ones: for example
    ``EDGE_CAMERAS__door__STATE__porch__THRESHOLDS__open=0.9``."""

    threshold: Score | None = None
    """The region's threshold for any label without its own (default: EDGE_STATE__THRESHOLDS,
    then EDGE_INFERENCE__THRESHOLD)."""
    thresholds: dict[str, Score] = Field(default_factory=dict)
    """Per-label thresholds for this region."""
    confirm_frames: int | None = Field(default=None, ge=1, le=1000)
    """This region's EDGE_STATE__CONFIRM_FRAMES."""
    ignore: LabelList | None = None
    """This region's EDGE_STATE__IGNORE (replaces it)."""

    _thresholds = field_validator("thresholds")(_thresholds)
    _ignore = field_validator("ignore", mode="before")(_label_list)


class StateSettings(Group):
    """Stable states: a region's state changes only when a new label is confirmed over
    several predictions; each change is published once, retained, with an event."""

    confirm_frames: int = Field(default=3, ge=1, le=1000)
    """Predictions that must agree (top label at or above its threshold, or all below: null)
    before the state changes; a glitch shorter than this never changes it."""
    window: int | None = Field(default=None, ge=1, le=1000)
    """Confirm over a sliding window instead: the new label in at least CONFIRM_FRAMES of the
    last WINDOW predictions (default: equal to CONFIRM_FRAMES, which means consecutive)."""
    thresholds: dict[str, Score] = Field(default_factory=dict)
    """Per-label score thresholds, e.g. EDGE_STATE__THRESHOLDS__open=0.8 (default for every
    label: EDGE_INFERENCE__THRESHOLD)."""
    ignore: LabelList = ()
    """Labels that read as null (nothing recognised), separated by commas, e.g. background."""

    _thresholds = field_validator("thresholds")(_thresholds)
    _ignore = field_validator("ignore", mode="before")(_label_list)

    @model_validator(mode="after")
    def _window(self) -> StateSettings:
        if self.window is not None and self.window < self.confirm_frames:
            raise ValueError("EDGE_STATE__WINDOW: must be at least EDGE_STATE__CONFIRM_FRAMES")
        return self


class SnapshotSettings(Group):
    """A JPEG on every state change: the frame that confirmed it, the region's box and the new
    label drawn, retained on <prefix>/<camera>/<roi>/snapshot."""

    enabled: bool = True
    """Publish a snapshot on every state change."""
    max_width: int = Field(default=640, ge=32, le=7680)
    """Larger frames are scaled down to this width."""
    quality: int = Field(default=80, ge=10, le=100)
    """JPEG quality."""
    min_interval_s: float = Field(default=2.0, ge=0, le=3600)
    """At most one snapshot per region this often; a change sooner is sent when the interval
    has passed (the latest state's frame, never a stale one)."""
