"""Dynamic batching across cameras and regions of interest.

A batch is handed out when ``max_batch`` crops are ready, when every camera has a frame
waiting, or when ``max_delay`` has passed since the first crop, whichever comes first. Each
camera gives at most its freshest frame to a batch; cameras are visited from a rotating start
so none is starved when there are more crops than room in a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_daemon.capture import Camera, Frame
from edge_daemon.control import RateLimit
from edge_daemon.preprocess import Image, crop, whole_multiple
from edge_daemon.settings import Roi

if TYPE_CHECKING:
    from edge_daemon.engine import Engine
    from edge_daemon.manifest import InputSpec

log = logging.getLogger(__name__)

WHOLE_FRAME = "frame"

#: A frame whose regions cover at least this many pixels has them shaped on the camera's thread.
PREPARE_MIN_PIXELS = 50_000

#: How far one sign of which thread is the slower moves a pulled file's share of the shaping.
SHARE_STEP = 0.05


@dataclass(frozen=True, slots=True)
class Item:
    """One batch element: a crop of one camera's frame, and where it came from."""

    camera: str
    roi: str
    frame: Frame
    crop: Image
    #: Where the crop is in the frame: x, y, width, height in pixels.
    box: tuple[int, int, int, int]
    #: The crop shaped for the model on the camera's thread, and the input it was shaped for.
    shaped: Image | None = None
    spec: InputSpec | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame's regions cropped and shaped for the model by the camera's own thread, so the
    inference thread only converts and invokes (and the work spreads over the cores)."""

    spec: InputSpec
    shaped: dict[str, Image]


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
        self._prepare_failed = RateLimit(rate=1 / 60, burst=1)
        self._camera = {c.name: c for c in self.cameras}
        #: For a pulled file: the share of its frames its own thread shapes (the inference
        #: thread shapes the rest), how much shaping it owes, and the signs it last saw.
        self._share = {c.name: 1.0 for c in self.cameras}
        self._owed = {c.name: 0.0 for c in self.cameras}
        self._seen = {c.name: (0, 0) for c in self.cameras}
        #: Times the inference thread found no crop waiting.
        self._starved = 0
        #: Crops per frame, by camera.
        self._crops_per_frame = {name: len(rois) or 1 for name, rois in self._rois.items()}
        #: The regions' boxes by camera and frame size (computed once per size).
        self._box_cache: dict[tuple[str, int, int], list[tuple[str, tuple[int, int, int, int]]]]
        self._box_cache = {}

    def notify(self) -> None:
        """A camera has a new frame (called from its reader thread)."""
        with self._ready:
            self._ready.notify_all()

    def rois(self, camera: str) -> list[str]:
        """ROI names of a camera, ``frame`` for the whole frame when it has none."""
        return list(self._rois[camera]) or [WHOLE_FRAME]

    def pending(self) -> int:
        """Crops waiting to be batched."""
        return sum(self._crops_per_frame[c.name] for c in self.cameras if c.has_new())

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Wait until crops are waiting, a :meth:`notify`, ``stop`` or ``timeout``."""
        with self._ready:
            if not stop.is_set() and self.pending() == 0:
                self._starved += 1
                self._ready.wait(timeout)

    def take_ready(self) -> list[Item]:
        """A batch of the crops waiting now, without waiting for more (empty when none)."""
        return self._collect() if self.pending() else []

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

    def _boxes(self, camera: str, image: Image) -> list[tuple[str, tuple[int, int, int, int]]]:
        height, width = image.shape[:2]
        key = (camera, height, width)
        boxes = self._box_cache.get(key)
        if boxes is None:
            rois = self._rois[camera]
            if not rois:
                boxes = [(WHOLE_FRAME, (0, 0, width, height))]
            else:
                boxes = [(name, roi.box(width, height)) for name, roi in rois.items()]
                self._warn_clipped(camera, width, height, boxes)
            if len(self._box_cache) > 64:  # a source whose size keeps changing
                self._box_cache.clear()
            self._box_cache[key] = boxes
        return boxes

    def _warn_clipped(
        self,
        camera: str,
        width: int,
        height: int,
        boxes: list[tuple[str, tuple[int, int, int, int]]],
    ) -> None:
        """Say once per frame size which regions reach outside the frame: only their part
        inside it is classified (a typo in a region's numbers would otherwise pass unseen)."""
        for name, box in boxes:
            roi = self._rois[camera][name]
            if roi.reaches_outside(width, height):
                asked = roi.pixels(width, height)
                log.warning(
                    "camera %s: region %s (%s in pixels) reaches outside the %dx%d frame; only "
                    "%s is classified: check EDGE_CAMERAS__%s__ROIS__%s",
                    camera,
                    name,
                    ",".join(map(str, asked)),
                    width,
                    height,
                    ",".join(map(str, box)),
                    camera,
                    name,
                )

    def prepare(self, camera: str, image: Image, engine: Engine) -> Prepared | None:
        """Every region of ``image`` shaped for ``engine`` (called on the camera's thread);
        None when the regions are small (or shaping fails): the inference thread shapes them.

        Resizing runs in OpenCV without Python's interpreter lock, so on the camera's thread it
        runs beside inference: a 720x720 crop to 128x128 takes about 0.9 ms. Regions of one size
        are shaped together (:meth:`Engine.shape_many`), a few calls per frame: one by one, 16
        small regions cost 32 hand-overs of that lock per frame, which made 4 such cameras a
        fifth slower than shaping on the inference thread. So small regions are shaped where
        they are used, unless they are many of one size that can go through OpenCV together.
        """
        boxes = self._boxes(camera, image)
        if not self._worth_preparing([box for _, box in boxes], engine.input_spec):
            return None
        if self._camera[camera].pulled and not self._shapes_here(camera):
            return None
        try:
            images = engine.shape_many([crop(image, box) for _, box in boxes])
            shaped = {name: shaped for (name, _), shaped in zip(boxes, images, strict=True)}
        except Exception:
            log.log(
                logging.WARNING if self._prepare_failed.allow() else logging.DEBUG,
                "camera %s: shaping the regions failed; the inference thread will",
                camera,
                exc_info=True,
            )
            return None
        return Prepared(engine.input_spec, shaped)

    def shaping_share(self, camera: str) -> float:
        """The share of a pulled file's frames its own thread shapes now (0 to 1)."""
        return self._share[camera]

    def _shapes_here(self, camera: str) -> bool:
        """Whether a pulled file's thread shapes this frame itself, or leaves it to the
        inference thread (on the camera's thread, after it waited for the take).

        A pulled file goes at the pace of the slower of the two threads. Decoding a frame on
        one thread takes about as long as shrinking a 720x720 region by area averaging and
        invoking. With one camera, its thread is the slower one when it also shapes, and the
        inference thread waits (workload 2 area x1: 487-501 labels/s shaped on the camera's
        thread, 647-697 on the inference thread); with four cameras, the inference thread is
        the slower one when it shapes them all (364-375 against 625-630). So the share follows
        whichever thread waits: up when the camera waited for its last frame to be taken, down
        when the inference thread waited for crops, and the frames are split by that share.
        """
        waits, starved = self._camera[camera].take_waits, self._starved
        seen_waits, seen_starved = self._seen[camera]
        share = self._share[camera]
        if waits != seen_waits:
            share = min(1.0, share + SHARE_STEP)
        if starved != seen_starved:
            share = max(0.0, share - SHARE_STEP)
        self._seen[camera] = (waits, starved)
        self._share[camera] = share
        owed = self._owed[camera] + share
        here = owed >= 1.0 - 1e-9
        self._owed[camera] = owed - 1.0 if here else owed
        return here

    @staticmethod
    def _worth_preparing(boxes: list[tuple[int, int, int, int]], spec: InputSpec) -> bool:
        """Large regions, or many small ones of one size that go through OpenCV together."""
        pixels = [w * h for _, _, w, h in boxes]
        if sum(pixels) < PREPARE_MIN_PIXELS:
            return False
        if min(pixels) >= PREPARE_MIN_PIXELS:
            return True
        sizes = {(w, h) for _, _, w, h in boxes}
        if len(sizes) != 1:
            return False
        ((w, h),) = sizes
        return whole_multiple(w, h, spec.width, spec.height) is None

    def _crops(self, camera: str, frame: Frame) -> list[Item]:
        prepared = frame.prepared if isinstance(frame.prepared, Prepared) else None
        items = []
        for name, box in self._boxes(camera, frame.image):
            if prepared is not None:
                shaped, spec = prepared.shaped.get(name), prepared.spec
            else:
                shaped, spec = None, None
            items.append(Item(camera, name, frame, crop(frame.image, box), box, shaped, spec))
        return items
