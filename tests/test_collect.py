"""``edge-daemon collect``: region crops saved for labelling, bounded, never fatal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_daemon.batcher import Item
from edge_daemon.capture import Frame
from edge_daemon.collect import CollectLimits, Collector
from tests.helpers import run_daemon

pytestmark = pytest.mark.runtime


def _item(value: int, number: int = 0, roi: str = "porch", noise: int = 0) -> Item:
    rng = np.random.default_rng(number)
    crop = np.full((48, 48, 3), value, np.uint8)
    if noise:
        crop = np.clip(crop.astype(int) + rng.integers(-noise, noise + 1, crop.shape), 0, 255)
        crop = crop.astype(np.uint8)
    frame = Frame(crop, number, time.monotonic(), 1_764_000_000.0 + number)
    return Item("door", roi, frame, crop, (0, 0, 48, 48))


def _free(value: int) -> Callable[[Path], int]:
    return lambda _path: value


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_crop_is_kept_every_interval_or_on_a_big_change_never_as_a_near_duplicate(
    tmp_path: Path,
) -> None:
    clock = Clock()
    collector = Collector(tmp_path, CollectLimits(every_s=10, change=0.08), clock=clock)
    assert collector.offer(_item(100, 0))  # the first crop of a region
    clock.now = 1
    assert not collector.offer(_item(110, 1))  # changed a little, too soon
    assert collector.offer(_item(160, 2))  # changed a lot: at once
    clock.now = 5
    assert not collector.offer(_item(160, 3, noise=2))  # sensor noise: a near duplicate
    clock.now = 20
    assert not collector.offer(_item(160, 4, noise=2))  # still the same scene: not again
    assert collector.skipped_duplicates == 1
    assert collector.offer(_item(150, 5))  # a real, small change, once the interval passed
    assert collector.offer(_item(100, 6, roi="gate"))  # each region on its own
    files = sorted((tmp_path / "door_porch").glob("*.png"))
    assert len(files) == 3
    assert [f.name.split("_")[1] for f in files] == ["00000000.png", "00000002.png", "00000005.png"]
    image = cv2.imread(str(files[1]))
    assert image is not None
    assert image.shape == (48, 48, 3)
    assert int(image[0, 0, 0]) == 160
    assert not list(tmp_path.rglob("*.partial"))
    assert len(list((tmp_path / "door_gate").glob("*.png"))) == 1


def test_collecting_stops_at_its_bounds_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    for limits, free, reason in [
        (CollectLimits(every_s=1, max_files=3), 1 << 40, "3 files written"),
        (CollectLimits(every_s=1, max_bytes=300), 1 << 40, "bytes written"),
        (CollectLimits(every_s=1, min_free_bytes=1000), 1010, "MiB free"),
    ]:
        caplog.clear()
        folder = tmp_path / reason.replace(" ", "-")
        collector = Collector(folder, limits, clock=clock, free_bytes=_free(free))
        with caplog.at_level(logging.WARNING):
            for n in range(10):
                clock.now += 2
                collector.offer(_item(n * 25, n))
        assert collector.stopped is not None
        assert reason in collector.stopped
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "collecting stopped" in warnings[0]
        on_disk = sum(f.stat().st_size for f in folder.rglob("*.png"))
        assert on_disk == collector.bytes <= limits.max_bytes
        assert len(list(folder.rglob("*.png"))) == collector.saved <= limits.max_files


def test_a_folder_that_cannot_be_written_stops_collecting_without_a_crash(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    collector = Collector(blocker)
    assert not collector.offer(_item(100))
    assert collector.stopped is not None
    assert "cannot write" in collector.stopped


def test_the_collect_command_saves_the_sample_clip_regions(tmp_path: Path) -> None:
    out = tmp_path / "crops"
    proc = run_daemon("collect", str(out), "--duration", "4", "--every", "1", timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = sorted((out / "sample_digit").glob("*.png"))
    # The sample clip's digit changes every half second: most changes are kept.
    assert 4 <= len(files) <= 16, len(files)
    for file in files:
        image = cv2.imread(str(file))
        assert image is not None
        assert image.shape[:2] == (96, 96)
    assert "crops saved under" in proc.stderr
    proc = run_daemon("collect", str(tmp_path / "crops" / "sample_digit" / files[0].name))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("is not a folder: give a folder for the crops")
    )
