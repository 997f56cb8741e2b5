"""RTSP cameras, served for real on loopback by GStreamer's RTSP server (tests/rtsp_server.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_daemon.pipeline import Daemon
from edge_daemon.postprocess import top_k
from edge_daemon.preprocess import as_image, preprocess_batch
from edge_daemon.settings import SAMPLE_CLIP, CameraSettings, Roi, sample_camera_rois
from tests.helpers import (
    RtspServer,
    Subscriber,
    running,
    settings_for,
    subscriber,
    unique_prefix,
)

pytestmark = pytest.mark.runtime


def sample_frame(index: int) -> tuple[np.ndarray, str]:
    """Frame ``index`` of the bundled clip, and the digit it shows."""
    meta = json.loads(SAMPLE_CLIP.with_suffix(".json").read_text())
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    capture.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = capture.read()
    capture.release()
    assert ok
    return frame, meta["truth"][index]


def statuses(sub: Subscriber, camera: str) -> list[bytes]:
    return [m.payload for m in sub.on(camera, "status")]


def test_rtsp_camera_is_classified_and_comes_back_after_the_camera_restarts(
    tmp_path: Path,
) -> None:
    frame, truth = sample_frame(12)
    server = RtspServer(tmp_path / "frames", [frame], fps=15)
    prefix = unique_prefix()
    camera = CameraSettings(
        source=server.url,
        open_timeout_s=3,
        read_timeout_s=2,
        rois={name: Roi.parse(text) for name, text in sample_camera_rois().items()},
    )
    try:
        server.start()
        with subscriber(prefix) as sub:
            daemon = Daemon(settings_for(prefix, cameras={"door": camera}))
            # What the model makes of the served JPEG decoded here, without the network.
            jpeg = as_image(cv2.imread(str(tmp_path / "frames" / "0000.jpg")))
            x, y, w, h = camera.rois["digit"].box(jpeg.shape[1], jpeg.shape[0])
            batch = preprocess_batch([jpeg[y : y + h, x : x + w]], daemon.engine.input_spec)
            local = top_k(daemon.engine.scores(batch)[0], daemon.engine.labels)[0].label
            assert local == truth
            with running(daemon):
                assert sub.wait_for(lambda: len(sub.labels("door")) >= 20, timeout=30)
                assert statuses(sub, "door")[-1] == b"online"
                assert {p["label"] for p in sub.labels("door")} == {truth}
                # The camera loses power: offline within the read timeout and the watch.
                server.stop()
                lost = time.monotonic()
                assert sub.wait_for(lambda: statuses(sub, "door")[-1] == b"offline", timeout=15)
                offline_after = time.monotonic() - lost
                # It boots again on the same address: the daemon finds it by itself.
                count = len(sub.labels("door"))
                server.start()
                back = time.monotonic()
                assert sub.wait_for(lambda: len(sub.labels("door")) > count + 10, timeout=60)
                resumed_after = time.monotonic() - back
                assert statuses(sub, "door")[-1] == b"online"
                assert daemon.cameras[0].reopens >= 1
                # It hangs with the connection open: the read timeout finds it out.
                server.hang()
                hung = time.monotonic()
                assert sub.wait_for(lambda: statuses(sub, "door")[-1] == b"offline", timeout=20)
                stalled_after = time.monotonic() - hung
                count = len(sub.labels("door"))
                server.hang()
                assert sub.wait_for(lambda: len(sub.labels("door")) > count + 10, timeout=60)
                assert statuses(sub, "door")[-1] == b"online"
            assert {p["label"] for p in sub.labels("door")} == {truth}
            assert sub.validate_all() > 30
    finally:
        server.stop()
    print(
        f"RTSP camera offline {offline_after:.1f} s after it died, "
        f"labels again {resumed_after:.1f} s after it returned, "
        f"offline {stalled_after:.1f} s after it hung (read timeout 2 s)"
    )
