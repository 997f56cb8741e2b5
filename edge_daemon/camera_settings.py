"""The settings of one camera: its source, its regions of interest, and their own state
settings (``EDGE_CAMERAS__<name>__...``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge_daemon.fields import MAX_PIXELS, MAX_TEXT, Group, check_names
from edge_daemon.state_settings import RegionStateSettings

SourceKind = Literal["device", "file", "stream", "gstreamer"]
_STREAM = re.compile(r"^(rtsps?|https?|rtmp|udp|tcp|srt)://", re.IGNORECASE)
_DEVICE = re.compile(r"^(\d+|/dev/video\d+)$")


def source_kind(source: str) -> SourceKind:
    """What kind of source a setting names."""
    if _DEVICE.match(source.strip()):
        return "device"
    if _STREAM.match(source.strip()):
        return "stream"
    if "!" in source:
        return "gstreamer"
    return "file"


def decoded_by_ffmpeg(source: str) -> bool:
    """Whether OpenCV opens the source through FFmpeg: a stream, or a video file (not a
    numbered image sequence such as ``frames/%04d.png``)."""
    kind = source_kind(source)
    return kind == "stream" or (kind == "file" and "%" not in source)


class Roi(Group):
    """A region of interest: ``x, y, width, height`` in pixels, or in fractions of the frame
    when all four are at most 1 (``0.5,0.2,0.5,0.8`` is the right half, from 20% down)."""

    x: float = Field(ge=0, le=MAX_PIXELS)
    y: float = Field(ge=0, le=MAX_PIXELS)
    width: float = Field(gt=0, le=MAX_PIXELS)
    height: float = Field(gt=0, le=MAX_PIXELS)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 4:
            raise ValueError("give x,y,width,height, e.g. 0.25,0.25,0.5,0.5 or 80,60,160,120")
        try:
            x, y, w, h = (float(p) for p in parts)
        except ValueError:
            raise ValueError("x,y,width,height must be numbers") from None
        return {"x": x, "y": y, "width": w, "height": h}

    @classmethod
    def parse(cls, text: str) -> Roi:
        """``"x,y,width,height"`` to a :class:`Roi`."""
        return cls.model_validate(text)

    @property
    def fractional(self) -> bool:
        """True when the four numbers are fractions of the frame."""
        return max(self.x, self.y, self.width, self.height) <= 1.0

    def pixels(self, frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
        """The region in pixels of a frame of the given size, as set (not clipped)."""
        if self.fractional:
            x, y = round(self.x * frame_width), round(self.y * frame_height)
            w, h = round(self.width * frame_width), round(self.height * frame_height)
            return x, y, w, h
        return round(self.x), round(self.y), round(self.width), round(self.height)

    def reaches_outside(self, frame_width: int, frame_height: int) -> bool:
        """Whether the region as set reaches past the right or bottom edge of such a frame
        (fractions by more than rounding)."""
        if self.fractional:
            return self.x + self.width > 1.0 + 1e-9 or self.y + self.height > 1.0 + 1e-9
        x, y, w, h = self.pixels(frame_width, frame_height)
        return x + w > frame_width or y + h > frame_height

    def box(self, frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
        """The region in pixels of a frame of the given size, clipped to it."""
        x, y, w, h = self.pixels(frame_width, frame_height)
        x, y = min(x, frame_width - 1), min(y, frame_height - 1)
        return x, y, max(1, min(w, frame_width - x)), max(1, min(h, frame_height - y))


class CameraSettings(Group):
    """One video source."""

    source: str = Field(min_length=1, max_length=MAX_TEXT)
    """Device index or path (/dev/video0), video file, rtsp:// or http(s):// URL, or a
    GStreamer pipeline ending in appsink."""
    fps: float | None = Field(default=None, gt=0, le=240)
    """Frames per second to take at most (the rest are skipped); none: as fast as they come."""
    # OpenCV takes sizes as doubles: a huge integer would overflow in the camera's thread.
    width: int | None = Field(default=None, gt=0, le=16_384)
    """Devices: capture width hint."""
    height: int | None = Field(default=None, gt=0, le=16_384)
    """Devices: capture height hint."""
    fourcc: str | None = Field(default=None, min_length=4, max_length=4, pattern=r"^[ -~]+$")
    """Devices: pixel format hint (MJPG helps USB cameras reach 720p30)."""
    loop: bool = True
    """Files: start again at the end (true) or stop the camera there."""
    realtime: bool = True
    """Files: play at the file's own frame rate, as a camera would deliver it."""
    decode_threads: int | None = Field(default=None, ge=1, le=64)
    """Files and streams: threads FFmpeg decodes with; none: the cores but one, shared among
    the cameras FFmpeg decodes, at least one each (the other core runs inference)."""
    # OpenCV takes whole milliseconds: a timeout much shorter could never be met.
    open_timeout_s: float = Field(default=10.0, ge=0.1, le=600)
    """Give up opening a source after this long."""
    read_timeout_s: float = Field(default=10.0, ge=0.1, le=600)
    """A source that delivers no frame for this long is reopened."""
    rois: dict[str, Roi] = Field(default_factory=dict)
    """Named regions x,y,width,height (pixels, or fractions when all are at most 1), each one
    batch element with its own topic; none means the whole frame, named 'frame'."""
    state: dict[str, RegionStateSettings] = Field(default_factory=dict)
    """A region's own state settings (over the EDGE_STATE__ ones), keyed by region name
    ('frame' without regions): its default THRESHOLD, per-label THRESHOLDS, CONFIRM_FRAMES,
    and IGNORE (which replaces the global list)."""

    @field_validator("rois")
    @classmethod
    def _roi_names(cls, value: dict[str, Roi]) -> dict[str, Roi]:
        return check_names(value, "ROI")

    @model_validator(mode="after")
    def _decoder(self) -> CameraSettings:
        if self.decode_threads is not None and not decoded_by_ffmpeg(self.source):
            kind = source_kind(self.source)
            raise ValueError(
                f"DECODE_THREADS: only files and streams are decoded by FFmpeg, not a {kind} "
                "source; remove it"
                + (" and set the decoder's threads in the pipeline" if kind == "gstreamer" else "")
            )
        return self

    @model_validator(mode="after")
    def _state_regions(self) -> CameraSettings:
        names = set(self.rois) or {"frame"}
        for name in self.state:
            if name not in names:
                raise ValueError(
                    f"STATE__{name}: no region of that name (regions: {', '.join(sorted(names))})"
                )
        return self
