"""Dynamic batching across cameras and regions of interest.

A batch is handed out when ``max_batch`` crops are ready, when every camera has a frame
waiting, or when ``max_delay`` has passed since the first crop, whichever comes first. Each
camera gives at most its freshest frame to a batch; cameras are visited from a rotating start
so none is starved when there are more crops than room in a batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge_daemon.capture import Camera, Frame
from edge_daemon.preprocess import Image, crop
from edge_daemon.settings import Roi

WHOLE_FRAME = "frame"


@dataclass(frozen=True, slots=True)
class Item:
    """One batch element: a crop of one camera's frame, and where it came from."""

    camera: str
    roi: str
    frame: Frame
    crop: Image
    #: Where the crop is in the frame: x, y, width, height in pixels.
    box: tuple[int, int, int, int]


class Batcher:
    """Collects the cameras' freshest frames into batches of crops."""

    def __init__(self, cameras: Sequence[Camera], max_batch: int, max_delay_s: float) -> None:
        self.cameras = list(cameras)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._ready = threading.Condition()
        self._start = 0
        self._rois: dict[str, dict[str, Roi]] = {
            c.name: dict(c.settings.rois) for c in self.cameras
        }

    def notify(self) -> None:
        """A camera has a new frame (called from its reader thread)."""
        with self._ready:
            self._ready.notify_all()

    def rois(self, camera: str) -> list[str]:
        """ROI names of a camera, ``frame`` for the whole frame when it has none."""
        return list(self._rois[camera]) or [WHOLE_FRAME]

    def pending(self) -> int:
        """Crops waiting to be batched."""
        return sum(len(self.rois(c.name)) for c in self.cameras if c.has_new())

    def next_batch(self, stop: threading.Event, idle_timeout: float = 0.2) -> list[Item]:
        """Wait for crops and return a batch; an empty list after ``idle_timeout`` or on stop."""
        with self._ready:
            deadline = time.monotonic() + idle_timeout
            while not stop.is_set() and self.pending() == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._ready.wait(remaining)
            if stop.is_set():
                return []
            due = time.monotonic() + self.max_delay_s
            # Wait for more only while more can come: once every camera has a frame waiting,
            # none can add to this batch, and waiting would only add latency.
            while (
                not stop.is_set()
                and self.pending() < self.max_batch
                and not all(c.has_new() for c in self.cameras)
            ):
                remaining = due - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
        return self._collect()

    def _collect(self) -> list[Item]:
        items: list[Item] = []
        n = len(self.cameras)
        for offset in range(n):
            camera = self.cameras[(self._start + offset) % n]
            names = self.rois(camera.name)
            if items and len(items) + len(names) > self.max_batch:
                continue
            if not camera.has_new():
                continue
            frame = camera.take()
            if frame is None:
                continue
            items.extend(self._crops(camera.name, frame))
        self._start = (self._start + 1) % max(n, 1)
        return items

    def _crops(self, camera: str, frame: Frame) -> list[Item]:
        rois = self._rois[camera]
        height, width = frame.image.shape[:2]
        if not rois:
            return [Item(camera, WHOLE_FRAME, frame, frame.image, (0, 0, width, height))]
        items = []
        for name, roi in rois.items():
            box = roi.box(width, height)
            items.append(Item(camera, name, frame, crop(frame.image, box), box))
        return items
