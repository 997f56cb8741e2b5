"""Collecting region crops to label: ``edge-daemon collect DIR``.

Each camera region's crops are saved as PNG under ``DIR/<camera>_<roi>/``, the layout the
labelling page and ``edge-convert train`` read once sorted into one sub-folder per class. A crop
is saved every ``every_s`` seconds, or sooner when it changed a lot since the last one saved,
and never when it is a near duplicate of that one (a still scene gives one image, not one every
few seconds). Collecting stops, with one warning and never a crash, once the files or bytes
written reach their bounds or the disk's free space would fall below its floor; the cameras
and everything else go on. Each file is written under a temporary name and renamed, so nothing
that reads the folder sees half an image.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_daemon.batcher import Batcher, Item
from edge_daemon.capture import Camera
from edge_daemon.preprocess import Image
from edge_daemon.settings import CameraSettings
from edge_daemon.sources import Opener, open_source

log = logging.getLogger(__name__)

#: Crops are compared at this size, in gray: cheap, and blind to sensor noise.
THUMB = 32


@dataclass(frozen=True, slots=True)
class CollectLimits:
    """When to save a crop, and when to stop."""

    every_s: float = 10.0
    #: Save sooner when the crop differs this much from the last saved one (0-1: the mean
    #: absolute difference of the small gray versions, as a share of full scale).
    change: float = 0.08
    #: Never save a crop differing less than this from the last saved one.
    duplicate: float = 0.01
    max_files: int = 10_000
    max_bytes: int = 1 << 30
    #: Stop before the disk's free space would fall below this many bytes.
    min_free_bytes: int = 500 << 20


def thumbnail(image: Image) -> npt.NDArray[np.float32]:
    """A small gray version of a crop, values 0-1, for comparing crops."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.float32) / 255.0


def difference(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """How much two thumbnails differ: their mean absolute difference, 0 to 1."""
    return float(np.mean(np.abs(a - b)))


class Collector:
    """Decides which crops to keep and writes them; bounded, and never fatal."""

    def __init__(
        self,
        root: Path,
        limits: CollectLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
    ) -> None:
        self.root = root
        self.limits = limits or CollectLimits()
        self._clock = clock
        self._free_bytes = free_bytes
        self._last: dict[tuple[str, str], tuple[float, npt.NDArray[np.float32]]] = {}
        self.saved = 0
        self.bytes = 0
        self.skipped_duplicates = 0
        #: Why collecting stopped, once it has; None while it goes on.
        self.stopped: str | None = None

    def offer(self, item: Item) -> bool:
        """Consider one region crop; True when it was saved."""
        if self.stopped is not None:
            return False
        key = (item.camera, item.roi)
        now = self._clock()
        thumb = thumbnail(item.crop)
        last = self._last.get(key)
        if last is not None:
            when, previous = last
            changed = difference(thumb, previous)
            if changed < self.limits.duplicate:
                if now - when >= self.limits.every_s:
                    self.skipped_duplicates += 1  # due, but the scene has not changed
                return False
            if now - when < self.limits.every_s and changed < self.limits.change:
                return False
        if self._write(item):
            self._last[key] = (now, thumb)
            return True
        return False

    def _write(self, item: Item) -> bool:
        ok, png = cv2.imencode(".png", item.crop)
        if not ok:
            return False
        data = png.tobytes()
        limits = self.limits
        if self.saved + 1 > limits.max_files:
            self._stop(f"{limits.max_files} files written (the bound)")
            return False
        if self.bytes + len(data) > limits.max_bytes:
            self._stop(f"{self.bytes} bytes written, the next would pass {limits.max_bytes}")
            return False
        folder = self.root / f"{item.camera}_{item.roi}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self._free_bytes(folder) - len(data) < limits.min_free_bytes:
                self._stop(
                    f"the disk under {self.root} would have less than "
                    f"{limits.min_free_bytes / (1 << 20):.3g} MiB free"
                )
                return False
            stamp = datetime.fromtimestamp(item.frame.wall, UTC).strftime("%Y%m%dT%H%M%S%f")
            final = folder / f"{stamp}_{item.frame.number:08d}.png"
            partial = folder / f".{final.name}.partial"
            partial.write_bytes(data)
            partial.replace(final)
        except OSError as exc:
            self._stop(f"cannot write under {self.root}: {exc.strerror or exc}")
            return False
        self.saved += 1
        self.bytes += len(data)
        return True

    def _stop(self, why: str) -> None:
        self.stopped = why
        log.warning(
            "collecting stopped: %s; %d crops saved under %s (the cameras go on)",
            why,
            self.saved,
            self.root,
        )


def run_collect(
    cameras: Mapping[str, CameraSettings],
    collector: Collector,
    *,
    duration: float | None,
    stop: threading.Event,
    opener: Opener = open_source,
) -> None:
    """Read the cameras and offer every region crop to ``collector`` until ``stop``, the
    ``duration``, or every file has ended. No model and no broker are needed."""
    batchers: list[Batcher] = []

    def notify() -> None:  # the cameras tell the batcher, made after them
        batchers[0].notify()

    readers = [Camera(name, cfg, opener=opener, on_frame=notify) for name, cfg in cameras.items()]
    batcher = Batcher(readers, max_batch=256, max_delay_s=0.0)
    batchers.append(batcher)
    for camera in readers:
        log.info("camera %s: regions %s", camera.name, ", ".join(batcher.rois(camera.name)))
        camera.start()
    end = time.monotonic() + duration if duration else float("inf")
    next_report = time.monotonic() + 10.0
    try:
        while not stop.is_set() and time.monotonic() < end:
            for item in batcher.next_batch(stop):
                collector.offer(item)
            for camera in readers:
                camera.check_stalled()
            if all(c.finished for c in readers) and not batcher.pending():
                log.info("every source has ended")
                break
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 10.0
                log.info(
                    "%d crops saved (%.1f MiB), %d near duplicates skipped",
                    collector.saved,
                    collector.bytes / (1 << 20),
                    collector.skipped_duplicates,
                )
    finally:
        for camera in readers:
            camera.request_stop()
        for camera in readers:
            camera.stop(timeout=1.0)
    log.info(
        "%d crops saved under %s (%.1f MiB)",
        collector.saved,
        collector.root,
        collector.bytes / (1 << 20),
    )
