"""The whole loop of "your own classes", as a user walks it, on a scene the test renders.

A garage door seen by a fixed camera, closed, ajar or open, under changing light and with
sensor noise: collect crops from a clip (``edge-daemon collect``), sort them on the labelling
page in a real headless browser, train and quantise with the gate (``edge-convert``), write
the model where a running daemon watches, and read that daemon's labels on a clip the model
never saw.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest

from converter.cli import main as convert
from converter.label import serve
from edge_daemon.pipeline import Daemon
from edge_daemon.settings import BUNDLED_MODEL, CameraSettings, Roi
from tests.helpers import run_daemon, running, settings_for, subscriber, unique_prefix
from tests.scenes import STATES, door
from tests.test_label import _count

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [
    pytest.mark.converter,
    pytest.mark.skipif(
        shutil.which("chromedriver") is None,
        reason="needs Debian's chromium and chromium-driver (make test installs them)",
    ),
]

#: Where the door is in the camera's 160x120 frame.
BOX = (40, 16, 80, 96)
ROI = ",".join(map(str, BOX))
FPS = 10.0


def _clip(path: Path, seed: int, segments: int, fps: float = FPS) -> list[str]:
    """A clip of the door changing state every 8 to 14 frames; the state of each frame."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (160, 120))
    truth: list[str] = []
    previous = None
    for _ in range(segments):
        state = str(rng.choice([s for s in STATES if s != previous]))
        previous = state
        for _ in range(int(rng.integers(8, 15))):
            frame = np.full((120, 160, 3), (60, 80, 70), np.uint8)  # the yard around the door
            x, y, w, h = BOX
            frame[y : y + h, x : x + w] = cv2.resize(door(state, rng, 96), (w, h))
            writer.write(frame)
            truth.append(state)
    writer.release()
    return truth


def _browser(profile: Path) -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _label_in_browser(folder: Path, truth: Callable[[str], str], profile: Path) -> int:
    """Sort every crop of ``folder`` on the labelling page, by clicks and keys."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve(folder, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = _browser(profile)
    sorted_count = 0
    try:
        wait: WebDriverWait[Any] = WebDriverWait(driver, 10)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid img"))
        for state in sorted(STATES):  # keys 1, 2, 3 in this order
            driver.find_element(By.ID, "newclass").send_keys(state, Keys.ENTER)
            wait.until(_count(f"button[data-cls='{state}']", 1))
        keys = {state: str(i + 1) for i, state in enumerate(sorted(STATES))}
        while images := driver.find_elements(By.CSS_SELECTOR, "#grid img"):
            name = images[0].get_attribute("data-file")
            assert name is not None
            images[0].click()
            driver.find_element(By.TAG_NAME, "body").send_keys(keys[truth(name)])
            wait.until(_count(f"img[data-file='{name}']", 0))
            sorted_count += 1
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    return sorted_count


def test_collect_label_train_quantise_reload_and_the_daemon_reads_a_new_clip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    times: dict[str, float] = {}

    def step(name: str, started: float) -> None:
        times[name] = time.monotonic() - started

    seen = _clip(tmp_path / "seen.mp4", seed=1, segments=18, fps=40)
    unseen = _clip(tmp_path / "unseen.mp4", seed=2, segments=12)

    # 1. Collect: the daemon's own crops of the region, the clip played as a camera would.
    started = time.monotonic()
    crops = tmp_path / "crops"
    env = {
        "EDGE_CAMERAS__gate__SOURCE": str(tmp_path / "seen.mp4"),
        "EDGE_CAMERAS__gate__ROIS__door": ROI,
        "EDGE_CAMERAS__gate__LOOP": "false",
    }
    proc = run_daemon(
        "collect", str(crops), "--every", "0.05", "--change", "0.02", env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    folder = crops / "gate_door"
    collected = sorted(folder.glob("*.png"))
    step("collect", started)
    assert len(collected) >= 50, len(collected)

    # 2. Label: every crop sorted on the page, in the browser (the frame number in each file
    # name says which state the clip showed).
    started = time.monotonic()

    def truth_of(name: str) -> str:
        return seen[int(name.split("_")[1].split(".", maxsplit=1)[0])]

    assert _label_in_browser(folder, truth_of, tmp_path / "chromium") == len(collected)
    counts = {s: len(list((folder / s).glob("*.png"))) for s in STATES}
    step("label", started)
    assert sum(counts.values()) == len(collected)

    # 3. Train and quantise with the gate.
    started = time.monotonic()
    model_dir = tmp_path / "trained"
    code = convert(
        [
            "train",
            "--dataset",
            str(folder),
            "--input-size",
            "32",
            "--epochs",
            "8",
            "--output",
            str(model_dir),
            "--name",
            "door",
        ]
    )
    assert code == 0, capsys.readouterr().err
    step("train", started)
    started = time.monotonic()
    code = convert(["quantize", str(model_dir / "door.keras"), "--mode", "int8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    step("quantise", started)
    gate = next(line for line in out.splitlines() if line.startswith("int8:"))

    # 4. A daemon already running on the unseen clip, with the digits model; the new model is
    # written where it watches, and taken without a restart.
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(BUNDLED_MODEL, live / "door.tflite")
    shutil.copy(BUNDLED_MODEL.with_suffix(".json"), live / "door.json")
    prefix = unique_prefix()
    camera = CameraSettings(source=str(tmp_path / "unseen.mp4"), rois={"door": Roi.parse(ROI)})
    settings = settings_for(
        prefix,
        cameras={"gate": camera},
        model={"path": str(live / "door.tflite")},
        mqtt={"labels": "every"},
    )
    with subscriber(prefix) as sub:
        daemon = Daemon(settings)
        with running(daemon):
            assert sub.wait_for(lambda: len(sub.labels()) >= 5)
            started = time.monotonic()
            shutil.copy(model_dir / "labels.txt", live / "labels.txt")
            shutil.copy(model_dir / "door.json", live / "door.json")
            shutil.copy(model_dir / "door.tflite", live / "door.tflite")
            assert sub.wait_for(lambda: sub.labels()[-1]["model"] == "door", timeout=20)
            step("reload", started)
            swap = len(sub.labels())
            assert sub.wait_for(lambda: len(sub.labels()) >= swap + len(unseen), timeout=60)
            assert all(c.online for c in daemon.cameras)
    after = [p for p in sub.labels()[swap:] if p["model"] == "door"]
    right = sum(p["top"][0]["label"] == unseen[p["frame"]] for p in after) / len(after)
    print(
        f"loop: {len(collected)} crops collected ({counts}); {gate}; on the unseen clip "
        f"{right * 100:.1f}% of {len(after)} labels right; seconds per step "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
    )
    assert right >= 0.9
