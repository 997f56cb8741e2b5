"""No work nobody uses: frames pulled or retrieved only when taken, batches only where they
pay, unchanged regions not classified again, labels handed to paho by the caller."""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_daemon import batching, capture, inference, pipeline, sources, threads
from edge_daemon.batcher import Batcher, Item
from edge_daemon.batching import BatchChoice
from edge_daemon.capture import Camera, Frame
from edge_daemon.config import load_settings
from edge_daemon.engine import Engine, load_engine, thread_options
from edge_daemon.errors import CaptureError
from edge_daemon.inference import InferenceStage
from edge_daemon.pipeline import Daemon
from edge_daemon.prediction import Prediction
from edge_daemon.publisher import Publisher
from edge_daemon.settings import CameraSettings
from edge_daemon.threads import ThreadChoice
from tests.helpers import (
    FakeCapture,
    digit_frames,
    running,
    settings_for,
    subscriber,
    unique_prefix,
    wait_until,
    write_video,
)

pytestmark = pytest.mark.runtime

# --- choosing whether batches pay ---------------------------------------------------------------


def learn(
    choice: BatchChoice, n: int, single_s: float, batched_s: float, rounds: int
) -> list[bool]:
    """Run ``rounds`` batches of ``n`` whose time per image is ``single_s`` one by one and
    ``batched_s`` batched; the choices made."""
    made = []
    for _ in range(rounds):
        batched = choice.batch(n)
        made.append(batched)
        choice.record(n, batched, n * (batched_s if batched else single_s))
    return made


def test_auto_batches_a_size_only_once_it_measured_faster() -> None:
    choice = BatchChoice("auto")
    made = learn(choice, 4, single_s=0.010, batched_s=0.005, rounds=40)
    # One by one first (a warm-up and SAMPLES timings), then batched for its own, then kept.
    assert made[: batching.SAMPLES + 1] == [False] * (batching.SAMPLES + 1)
    assert all(made[-10:])
    assert choice.choices() == {"4": "batched"}
    slow = BatchChoice("auto")
    made = learn(slow, 4, single_s=0.010, batched_s=0.0095, rounds=40)  # within the margin
    assert made.count(True) == batching.SAMPLES + 1  # tried, then dropped
    assert not any(made[-10:])
    assert slow.choices() == {"4": "single"}
    assert not slow.batch(1)


def test_auto_decides_again_after_recheck_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "RECHECK", 30)
    choice = BatchChoice("auto")
    learn(choice, 2, single_s=0.010, batched_s=0.005, rounds=30)
    assert choice.choices() == {"2": "batched"}
    # The board changed: batching became slower. After RECHECK batches the choice is remade.
    made = learn(choice, 2, single_s=0.010, batched_s=0.020, rounds=45)
    assert not any(made[-10:])
    assert choice.choices() == {"2": "single"}


def test_on_and_off_never_learn() -> None:
    assert learn(BatchChoice("on"), 3, 0.01, 0.02, 5) == [True] * 5
    assert learn(BatchChoice("off"), 3, 0.02, 0.01, 5) == [False] * 5
    assert BatchChoice("on").batch(1) is False


# --- choosing the interpreter's threads --------------------------------------------------------


def run_rounds(
    choice: ThreadChoice, seconds: float, rates: dict[int | None, float], busy: float, start: float
) -> list[int | None]:
    """``seconds`` of rounds of 4 images at ``rates[threads]`` images a second, inferring for
    ``busy`` of the time, on a made-up clock from ``start``; the threads of each round."""
    now, used = start, []
    while now < start + seconds:
        period = 4 / rates[choice.current]
        used.append(choice.current)
        now += period
        choice.record(4, period * busy, now)
    return used


def test_more_interpreter_threads_are_kept_only_where_they_classify_more() -> None:
    # Inference is the bottleneck and two threads classify 60% more: tried, then kept.
    faster = ThreadChoice((None, 2))
    used = run_rounds(faster, 10, {None: 100, 2: 160}, busy=0.95, start=0)
    assert used[0] is None
    assert faster.current == 2
    assert used[-100:] == [2] * 100  # kept, not tried again before RECHECK_S
    # Two threads take a core the decoders needed: fewer images a second, so back to one.
    slower = ThreadChoice((None, 2))
    used = run_rounds(slower, 20, {None: 400, 2: 360}, busy=0.95, start=0)
    assert 2 in used
    assert slower.current is None
    # One trial: the switch's settling and one window counted.
    assert used.count(2) <= (threads.SETTLE_S + threads.WINDOW_S) * 360 / 4 + 2
    assert used[-500:] == [None] * 500
    # Within the margin: one thread stays.
    level = ThreadChoice((None, 2))
    run_rounds(level, 10, {None: 100, 2: 120}, busy=0.95, start=0)
    assert level.current is None
    # Inference idles half the time: it is not what holds the pipeline back, never tried.
    idle = ThreadChoice((None, 2))
    assert set(run_rounds(idle, 10, {None: 100, 2: 400}, busy=0.5, start=0)) == {None}
    # A number set by hand is never changed.
    fixed = ThreadChoice((3,))
    assert set(run_rounds(fixed, 10, {3: 100}, busy=1.0, start=0)) == {3}


def test_the_thread_choice_is_made_again_after_recheck_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "RECHECK_S", 20.0)
    choice = ThreadChoice((None, 2))
    run_rounds(choice, 10, {None: 100, 2: 160}, busy=0.95, start=0)
    assert choice.current == 2
    # The decoders got busier: two threads now barely beat one. Checked again, dropped; and
    # tried again (while on two threads) even though inference no longer fills the thread.
    used = run_rounds(choice, 40, {None: 100, 2: 105}, busy=0.6, start=10)
    assert choice.current is None
    assert used[0] == 2


def test_the_daemons_engine_chooses_its_threads_only_when_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert thread_options(None, use_edgetpu=False) == (None, 4)
    assert thread_options(2, use_edgetpu=False) == (2,)
    assert thread_options(None, use_edgetpu=True) == (None,)  # the TPU runs the model
    assert load_engine(load_settings()).threads.options == (None, 4)
    monkeypatch.setenv("EDGE_MODEL__NUM_THREADS", "3")
    assert load_engine(load_settings()).threads.options == (3,)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert thread_options(None, use_edgetpu=False) == (None,)


def test_the_engine_gives_the_same_scores_on_more_threads(digits_engine: Engine) -> None:
    crops = digit_frames(6, 96)
    digits_engine.threads = ThreadChoice((None, 2))
    for mode in ("off", "on"):
        digits_engine.batching = BatchChoice(mode)
        one = digits_engine.classify(crops)
        digits_engine.threads.current = 2
        two = digits_engine.classify(crops)
        digits_engine.threads.current = None
        np.testing.assert_array_equal(one, two)
    # Interpreters on two threads were made beside the first, for one image and for six.
    assert {(1, 2), (6, 2), (1, None), (6, None)} <= set(digits_engine._interpreters)


def test_the_engine_drops_interpreters_on_threads_it_stopped_using(
    digits_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "WARMUP_S", 0.0)
    monkeypatch.setattr(threads, "SETTLE_S", 0.0)
    monkeypatch.setattr(threads, "WINDOW_S", 0.3)
    monkeypatch.setattr(threads, "BUSY", 0.0)  # every window counts as busy
    monkeypatch.setattr(threads, "GAIN", 1e9)  # two threads never pay
    digits_engine.threads = ThreadChoice((None, 2))
    digits_engine.batching = BatchChoice("on")
    crops = [digits_engine.shape(crop) for crop in digit_frames(4, 96)]
    seen = set()
    deadline = time.monotonic() + 10
    while digits_engine.threads.decisions == 0 and time.monotonic() < deadline:
        digits_engine.infer_shaped(crops)
        seen |= set(digits_engine._interpreters)
    assert digits_engine.threads.decisions == 1
    assert digits_engine.threads.current is None
    assert (4, 2) in seen  # tried on two threads, for real
    assert set(digits_engine._interpreters) == {(1, None), (4, None)}


def test_the_engine_gives_the_same_scores_batched_or_one_by_one(digits_engine: Engine) -> None:
    crops = digit_frames(6, 96)
    digits_engine.batching = BatchChoice("off")
    single = digits_engine.classify(crops)
    digits_engine.batching = BatchChoice("on")
    batched = digits_engine.classify(crops)
    assert np.allclose(single, batched, atol=1e-6)
    assert digits_engine.batching.choices() == {"6": "batched"}
    auto = BatchChoice("auto")
    digits_engine.batching = auto
    for _ in range(3 * batching.SAMPLES):
        assert np.allclose(digits_engine.classify(crops), single, atol=1e-6)
    assert auto.choices()["6"] in ("batched", "single")  # decided, either way, from timings


# --- regions that did not change ----------------------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.predictions: list[Prediction] = []

    def __call__(self, item: Item, prediction: Prediction) -> None:
        del item
        self.predictions.append(prediction)


def stage_for(engine: Engine, **inference: Any) -> tuple[InferenceStage, Collected]:
    settings = load_settings(inference=inference)
    out = Collected()
    batcher = Batcher([], max_batch=8, max_delay_s=0.0)
    stage = InferenceStage(
        settings.inference, "dev", batcher, engine=engine, emit=out, reload=lambda: engine
    )
    return stage, out


def item(image: np.ndarray, number: int, roi: str = "frame") -> Item:
    frame = Frame(image, number, time.monotonic(), time.time())
    h, w = image.shape[:2]
    return Item("cam", roi, frame, image, (0, 0, w, h))


def test_an_unchanged_region_reuses_its_prediction_until_it_changes_or_ages(
    digits_engine: Engine,
) -> None:
    seven, two = digit_frames(2, 96, seed=5)
    stage, out = stage_for(digits_engine, unchanged_below=0.02, unchanged_max_age_s=0.5)
    rng = np.random.default_rng(1)
    noisy = np.clip(seven.astype(np.int16) + rng.integers(-3, 4, seven.shape), 0, 255)
    stage.run_batch([item(seven, 0)])
    stage.run_batch([item(noisy.astype(np.uint8), 1)])  # sensor noise: the same scene
    stage.run_batch([item(two, 2)])  # another digit: classified
    first, again, other = out.predictions
    assert not first.reused
    assert again.reused
    assert not other.reused
    assert (again.label, again.score, again.frame) == (first.label, first.score, 1)
    assert again.inference_ms == 0.0
    assert again.batch == first.batch
    assert other.score != first.score  # classified anew
    assert again.to_dict()["inference_ms"] == 0  # the payload says so, in its v1 shape
    assert first.to_dict()["inference_ms"] > 0
    assert set(again.to_dict()) == set(first.to_dict())
    assert (stage.stats.items, stage.stats.reused) == (2, 1)
    time.sleep(0.6)
    stage.run_batch([item(two, 3)])  # unchanged, but older than the maximum age
    assert not out.predictions[-1].reused
    # A region is compared with its own last crop only; a threshold change applies at once.
    stage.set_threshold(1.0)
    stage.run_batch([item(two, 4), item(two, 4, roi="other")])
    reused, fresh = out.predictions[-2:]
    assert reused.reused
    assert reused.label is None
    assert not fresh.reused
    assert stage.stats.reused == 2


def test_zero_classifies_every_crop_and_a_new_model_forgets(digits_engine: Engine) -> None:
    seven = digit_frames(1, 96, seed=5)[0]
    stage, out = stage_for(digits_engine, unchanged_below=0)
    for n in range(3):
        stage.run_batch([item(seven, n)])
    assert [p.reused for p in out.predictions] == [False] * 3
    stage, out = stage_for(digits_engine, unchanged_below=0.02, unchanged_max_age_s=60)
    stage.run_batch([item(seven, 0)])
    stage.run_batch([item(seven, 1)])
    assert out.predictions[-1].reused
    stage.offer_engine(digits_engine.reopen())
    stage._swap_engine()  # what runs before every batch
    stage.run_batch([item(seven, 2)])
    assert not out.predictions[-1].reused


# --- frames: pulled from files, retrieved from live sources only when taken -----------------------


class CountingFile:
    """A real file's capture, counting what is decoded (grabs) and kept (retrieves)."""

    def __init__(self, settings: CameraSettings) -> None:
        self.inner = sources.open_source(settings)
        self.grabs = 0
        self.retrieves = 0

    def grab(self) -> bool:
        self.grabs += 1
        return self.inner.grab()

    def retrieve(self) -> tuple[bool, object]:
        self.retrieves += 1
        return self.inner.retrieve()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_file_read_unthrottled_is_pulled_frame_by_frame(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", digit_frames(40, 64), fps=25)
    files: list[CountingFile] = []

    def opener(settings: CameraSettings) -> CountingFile:
        files.append(CountingFile(settings))
        return files[-1]

    settings = CameraSettings(source=str(video), realtime=False, loop=False)
    cam = Camera("file", settings, opener=opener)
    cam.start()
    try:
        assert wait_until(lambda: cam.frames_read == 1, timeout=10)
        time.sleep(0.5)
        assert (cam.frames_read, cam.frames_skipped) == (1, 0)
        # Nobody took the first frame: the next one is decoded, not kept, and no further.
        assert (files[0].grabs, files[0].retrieves) == (2, 1)
        numbers = []
        for _ in range(5):
            assert wait_until(cam.has_new, timeout=5)
            frame = cam.take()
            assert frame is not None
            numbers.append(frame.number)
        assert numbers == [0, 1, 2, 3, 4]  # every frame, in order, none thrown away
        assert wait_until(lambda: files[0].grabs == 7, timeout=5)
        time.sleep(0.2)
        assert (files[0].grabs, files[0].retrieves) == (7, 6)
    finally:
        cam.stop()
    assert cam.frames_skipped == 0


class CountingDevice(FakeCapture):
    """A live camera at about 100 fps that counts grabs and retrieves."""

    def __init__(self, settings: CameraSettings) -> None:
        del settings
        self.grabs = 0
        self.retrieves = 0
        self.image = np.zeros((48, 64, 3), np.uint8)

    def grab(self) -> bool:
        time.sleep(0.01)
        self.grabs += 1
        return True

    def retrieve(self) -> tuple[bool, object]:
        self.retrieves += 1
        return True, self.image.copy()


def test_a_live_source_is_grabbed_always_and_retrieved_only_when_taken() -> None:
    devices: list[CountingDevice] = []

    def opener(settings: CameraSettings) -> CountingDevice:
        devices.append(CountingDevice(settings))
        return devices[-1]

    cam = Camera("live", CameraSettings(source="/dev/video0"), opener=opener)
    cam.start()
    try:
        assert wait_until(lambda: cam.frames_read == 1, timeout=5)
        time.sleep(0.5)  # nobody takes: the source is still read (kept fresh), not retrieved
        device = devices[0]
        assert device.grabs > 20
        # An untaken frame is replaced only once two frame intervals old: at most every other.
        assert device.retrieves <= device.grabs // 2 + 1
        assert cam.frames_skipped >= device.grabs // 2 - 1
        frame = cam.take()
        assert frame is not None
        assert time.monotonic() - frame.monotonic < 0.1  # fresh: a few frame intervals
        before = device.retrieves
        taken = 0
        for _ in range(5):
            time.sleep(0.005)  # well within two intervals: the next grab fills the slot
            if wait_until(cam.has_new, timeout=1, step=0.002) and cam.take() is not None:
                taken += 1
        assert taken == 5
        assert device.retrieves - before <= 7
    finally:
        cam.stop()


# --- labels cost what paho's publish costs -----------------------------------------------------


def record_hand_overs(publisher: Publisher) -> list[str]:
    """The names of the threads that hand ``publisher``'s messages to paho, one a message, in
    order (from now on)."""
    callers: list[str] = []
    real = publisher._hand_over

    def hand_over(message: Any) -> bool:
        callers.append(threading.current_thread().name)
        return real(message)

    publisher._hand_over = hand_over  # type: ignore[method-assign]
    return callers


def test_labels_go_to_paho_from_the_caller_in_order_while_connected() -> None:
    prefix = unique_prefix()
    settings = settings_for(prefix, mqtt={"queue_size": 5000})  # room for the whole burst
    with subscriber(prefix) as sub:
        daemon = Daemon(settings)
        publisher = daemon.publisher
        callers = record_hand_overs(publisher)
        publisher.start()
        try:
            assert wait_until(lambda: publisher.connected and not publisher.queued)
            callers.clear()
            topic = publisher.topic("cam", "frame", "label")
            for n in range(3000):
                publisher.publish(topic, b'{"n":%d}' % n)
                if n % 500 == 499:
                    # The broker keeps at most 1,000 messages queued for a slow subscriber
                    # (mosquitto's max_queued_messages): let it catch up.
                    assert sub.wait_for(functools.partial(arrived_more_than, sub, n))
            arrived = sub.wait_for(lambda: len(sub.on("cam", "frame", "label")) >= 3000, timeout=60)
            assert arrived, (
                f"{len(sub.on('cam', 'frame', 'label'))} arrived; queued {publisher.queued}, "
                f"unconfirmed {len(publisher._pending)}, dropped {publisher.dropped}"
            )
        finally:
            publisher.stop()
    assert publisher.dropped == 0
    numbers = [int(m.payload[5:-1]) for m in sub.on("cam", "frame", "label")]
    assert numbers == list(range(3000))  # every label, in order, whichever thread sent it
    assert threading.current_thread().name in callers  # the caller handed most over itself


def test_kept_messages_go_to_paho_from_the_caller_and_never_wait_for_the_send_lock() -> None:
    """States and events cost no wake of the sender thread while nothing waits; and one
    published while the send lock is held (as from paho's own thread while another hands a
    message to paho) is queued for the sender instead of waiting."""
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix))
        publisher = daemon.publisher
        callers = record_hand_overs(publisher)
        publisher.start()
        try:
            assert wait_until(lambda: publisher.connected and not publisher.queued)
            # ``online`` handed over in full (the sender holds the send lock until then: a
            # kept message meanwhile goes to the lane), and confirmed.
            assert wait_until(
                lambda: (
                    publisher.sent >= 1
                    and not publisher._pending
                    and not publisher._send_lock.locked()
                )
            )
            callers.clear()
            topic = publisher.topic("events")
            for n in range(20):
                publisher.publish(topic, b'{"n":%d}' % n, qos=1, keep=True)
                assert not publisher.queued
                assert wait_until(lambda: not publisher._pending)
            assert callers == [threading.current_thread().name] * 20

            callers.clear()
            held = threading.Event()
            release = threading.Event()

            def hold() -> None:
                with publisher._send_lock:
                    held.set()
                    release.wait(5)

            holder = threading.Thread(target=hold)
            holder.start()
            assert held.wait(5)
            started = time.monotonic()
            publisher.publish(topic, b'{"n":20}', qos=1, keep=True)
            waited = time.monotonic() - started
            queued = publisher.queued
            release.set()
            holder.join(5)
            arrived = sub.wait_for(lambda: len(sub.on("events")) >= 21, timeout=10)
            sent_by = list(callers)  # before stop() sends ``offline``
        finally:
            publisher.stop()
    assert waited < 1.0  # the holder kept the lock for up to 5 s
    assert queued == 1
    assert arrived
    assert sent_by == ["mqtt-sender"]
    assert [int(m.payload[5:-1]) for m in sub.on("events")] == list(range(21))


def arrived_more_than(sub: Any, count: int) -> bool:
    return len(sub.on("cam", "frame", "label")) > count


@pytest.fixture
def digits_engine() -> Engine:
    return load_engine(load_settings())


def test_a_daemon_on_files_decodes_no_frame_it_does_not_classify(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", digit_frames(60, 64), fps=25)
    cams = {
        f"c{i}": CameraSettings(source=str(video), realtime=False, loop=False) for i in range(3)
    }
    prefix = unique_prefix()
    with subscriber(prefix) as sub:
        daemon = Daemon(settings_for(prefix, cameras=cams, inference={"unchanged_below": 0}))
        with running(daemon):
            assert wait_until(lambda: all(c.finished for c in daemon.cameras), timeout=60)
            assert sub.wait_for(lambda: len(sub.labels("c0")) >= 60)
    for cam in daemon.cameras:
        assert (cam.frames_read, cam.frames_skipped) == (60, 0)
    assert daemon.stats.items == 180
    assert [json_frame(m) for m in sub.labels("c1")] == list(range(60))


def json_frame(payload: Any) -> int:
    return int(payload["frame"])


def test_regions_of_one_size_are_shaped_together_exactly_as_one_by_one(
    digits_engine: Engine,
) -> None:
    rng = np.random.default_rng(4)
    crops = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(16)]
    crops += [rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)]  # grows: alone
    crops += [rng.integers(0, 255, (97, 41, 3), dtype=np.uint8) for _ in range(2)]
    together = digits_engine.shape_many(crops)
    alone = [digits_engine.shape(c) for c in crops]
    assert len(together) == len(alone)
    spec = digits_engine.input_spec
    for a, b in zip(together, alone, strict=True):
        assert a.shape == b.shape == (spec.height, spec.width, 1)
        assert np.array_equal(a, b)


def test_large_regions_are_shaped_on_the_camera_thread_for_the_model_that_runs(
    digits_engine: Engine,
) -> None:
    frame = np.random.default_rng(6).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    cam = Camera("c", CameraSettings(source="/tmp/c.mp4", rois={}))
    batcher = Batcher([cam], max_batch=8, max_delay_s=0.0)
    prepared = batcher.prepare("c", frame, digits_engine)  # a whole 640x480 frame
    assert prepared is not None
    assert prepared.spec is digits_engine.input_spec
    assert np.array_equal(prepared.shaped["frame"], digits_engine.shape(frame))
    assert batcher.prepare("c", frame[:100, :100], digits_engine) is None  # small: not here
    cam.offer(Frame(frame, 0, time.monotonic(), time.time(), prepared))
    (queued,) = batcher.next_batch(threading.Event())
    assert queued.shaped is prepared.shaped["frame"]
    stage, out = stage_for(digits_engine, unchanged_below=0)
    stage.run_batch([queued])
    stage.run_batch([item(frame, 1)])  # shaped by the inference thread instead
    assert out.predictions[0].top == out.predictions[1].top
    # Shaped for another model (a reload in between): shaped again for the one that runs.
    other = digits_engine.reopen()
    stage2, out2 = stage_for(other, unchanged_below=0)
    stage2.run_batch([queued])
    assert out2.predictions[0].top == out.predictions[0].top


def test_a_pulled_file_shapes_on_whichever_thread_is_waiting(digits_engine: Engine) -> None:
    frame = np.random.default_rng(7).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    cam = Camera("c", CameraSettings(source="/tmp/c.mp4", rois={}))
    live = Camera("live", CameraSettings(source="/dev/video0", rois={}))
    batcher = Batcher([cam, live], max_batch=8, max_delay_s=0.0)
    stop = threading.Event()

    def shaped_here(frames: int) -> list[bool]:
        return [batcher.prepare("c", frame, digits_engine) is not None for _ in range(frames)]

    def camera_waits_for_the_take() -> None:
        offered(cam, cam.frames_read)
        waiting = threading.Thread(target=cam._wait_until_taken)
        waiting.start()
        assert wait_until(lambda: cam.take_waits > waits, timeout=5)
        assert cam.take() is not None
        waiting.join(5)

    cam.pulled = True
    assert shaped_here(3) == [True] * 3  # at first its own thread shapes, as a live one does
    # The inference thread finds no crop waiting before each frame: it takes the shaping over.
    for _ in range(25):
        batcher.wait(stop, 0.0)
        batcher.prepare("c", frame, digits_engine)
    assert batcher.shaping_share("c") == 0.0
    assert shaped_here(5) == [False] * 5
    # Now the camera waits for its frames to be taken: it shapes half of them, then all.
    for _ in range(10):
        waits = cam.take_waits
        camera_waits_for_the_take()
        batcher.prepare("c", frame, digits_engine)
    assert batcher.shaping_share("c") == pytest.approx(0.5)
    assert shaped_here(4).count(True) == 2
    # Both wait as often: the share stays.
    waits = cam.take_waits
    camera_waits_for_the_take()
    batcher.wait(stop, 0.0)
    batcher.prepare("c", frame, digits_engine)
    assert batcher.shaping_share("c") == pytest.approx(0.5)
    # A live source's frames are shaped on its own thread whatever the inference thread does.
    for _ in range(25):
        batcher.wait(stop, 0.0)
        assert batcher.prepare("live", frame, digits_engine) is not None


# --- live frames classified on the camera's own thread -----------------------------------------


def offered(camera: Camera, number: int) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    camera.offer(Frame(image, number, time.monotonic(), time.time()))


def test_whoever_runs_batches_takes_every_frame_offered_meanwhile(digits_engine: Engine) -> None:
    cams = [Camera(f"c{i}", CameraSettings(source="/dev/video0")) for i in range(4)]
    for cam in cams:
        cam._interval = 1.0  # a long frame interval: no runner gives up for lack of time
    settings = load_settings()
    batcher = Batcher(cams, max_batch=8, max_delay_s=0.0)
    emitted: list[tuple[str, int, str]] = []

    def emit(item: Item, prediction: Prediction) -> None:
        emitted.append((item.camera, prediction.frame, threading.current_thread().name))
        time.sleep(0.0005)  # others offer while this thread holds the role

    stage = InferenceStage(
        settings.inference,
        "dev",
        batcher,
        engine=digits_engine,
        emit=emit,
        reload=lambda: digits_engine,
    )

    def feed(cam: Camera) -> None:
        rng = np.random.default_rng(len(cam.name))
        for n in range(40):
            offered(cam, n)
            stage.frame_ready(cam)
            time.sleep(float(rng.uniform(0, 0.002)))

    threads = [threading.Thread(target=feed, args=(c,), name=f"camera-{c.name}") for c in cams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # The inference thread never started: a frame left waiting would have been stranded.
    assert batcher.pending() == 0
    assert not stage._running
    for cam in cams:
        numbers = [n for name, n, _ in emitted if name == cam.name]
        assert numbers == sorted(numbers)  # in order
        assert numbers[-1] == 39  # the last one too
    runners = {thread for _, _, thread in emitted}
    assert runners <= {f"camera-c{i}" for i in range(4)}
    assert len({(name, thread) for name, _, thread in emitted if name != thread[7:]}) > 0, (
        "no camera's thread ran another camera's frame"
    )


def test_a_camera_thread_runs_batches_only_when_they_are_short_and_nothing_waits(
    digits_engine: Engine,
) -> None:
    cam = Camera("c", CameraSettings(source="/dev/video0"))
    cam._interval = 1 / 30
    stage, _ = stage_for(digits_engine)
    stage._batch_s = 0.001
    assert stage._inline(cam)
    stage._batch_s = 0.010  # more than a quarter of a frame interval: the inference thread
    assert not stage._inline(cam)
    stage._batch_s = 0.001
    cam.pulled = True  # a file read as fast as it decodes: its thread decodes meanwhile
    assert not stage._inline(cam)
    cam.pulled = False
    stage.batcher.max_delay_s = 0.02  # waiting for fuller batches: the inference thread
    assert not stage._inline(cam)


def test_paced_files_keep_step_with_one_clock() -> None:
    pace = 1 / 30
    starts = []
    for _ in range(3):
        start = capture.on_the_beat(pace)
        assert 0 <= start - time.monotonic() <= pace + 1e-6
        ticks = (start - capture._BEAT_EPOCH) / pace
        assert abs(ticks - round(ticks)) < 1e-6  # on the shared clock's ticks
        starts.append(start)
        time.sleep(0.011)
    assert capture.on_the_beat(0) <= time.monotonic()  # unpaced: now


def finished(daemon: Daemon) -> bool:
    return daemon.cameras[0].finished


def test_live_frames_are_classified_on_their_camera_thread_and_pulled_ones_are_not(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "clip.mp4", digit_frames(30, 64), fps=30)
    for realtime, where in ((True, "camera-"), (False, "inference")):
        cams = {"c0": CameraSettings(source=str(video), realtime=realtime, loop=False)}
        daemon = Daemon(settings_for(unique_prefix(), cameras=cams))
        threads: list[str] = []
        real = daemon.inference._emit

        def emit(*args: Any, threads: list[str] = threads, real: Any = real) -> None:
            threads.append(threading.current_thread().name)
            real(*args)

        daemon.inference._emit = emit
        with running(daemon):
            assert wait_until(functools.partial(finished, daemon), timeout=30)
        assert len(threads) >= 10
        on_camera = sum(t.startswith(where) for t in threads)
        assert on_camera >= 0.8 * len(threads), (realtime, threads)


# --- more labels than the broker takes ---------------------------------------------------------


def test_labels_queued_in_a_burst_are_sent_by_later_callers_without_the_sender() -> None:
    prefix = unique_prefix()
    settings = settings_for(prefix, mqtt={"queue_size": 5000})
    with subscriber(prefix) as sub:
        publisher = Daemon(settings).publisher
        publisher._send_loop = publisher._stop.wait  # type: ignore[assignment,method-assign]
        publisher.start()
        try:
            # (``online`` waits in the queue too: the first caller sends it, before its label.)
            assert wait_until(lambda: publisher.connected)
            topic = publisher.topic("cam", "frame", "label")
            for n in range(600):  # six windows at once: most of it is queued
                publisher.publish(topic, b'{"n":%d}' % n)
            assert publisher.queued > 0
            for n in range(600, 1000):  # paced: each caller sends what the window has room for
                time.sleep(0.002)
                publisher.publish(topic, b'{"n":%d}' % n)
            arrived = sub.wait_for(lambda: len(sub.on("cam", "frame", "label")) >= 1000)
            assert arrived, f"{len(sub.on('cam', 'frame', 'label'))} arrived"
        finally:
            publisher.stop(1.0)
    numbers = [int(m.payload[5:-1]) for m in sub.on("cam", "frame", "label")]
    assert numbers == list(range(1000))  # in order, none lost
    assert publisher.dropped == 0


def test_no_batch_runs_while_the_broker_is_behind(digits_engine: Engine) -> None:
    cams = [Camera("c0", CameraSettings(source="/dev/video0"))]
    cams[0]._interval = 1.0
    backlog = {"labels": inference.MAX_BACKLOG + 1}
    emitted: list[int] = []
    settings = load_settings()
    stage = InferenceStage(
        settings.inference,
        "dev",
        Batcher(cams, max_batch=8, max_delay_s=0.0),
        engine=digits_engine,
        emit=lambda item, prediction: emitted.append(prediction.frame),
        reload=lambda: digits_engine,
        backlog=lambda: backlog["labels"],
    )
    assert not stage._inline(cams[0])  # the camera's thread leaves it to the inference thread
    stage.start()
    try:
        offered(cams[0], 0)
        stage.frame_ready(cams[0])
        time.sleep(0.3)
        assert emitted == []  # the frame waits, and a newer one would replace it
        offered(cams[0], 1)
        stage.frame_ready(cams[0])
        backlog["labels"] = 0
        assert wait_until(lambda: emitted == [1], timeout=5)
        assert stage._inline(cams[0])
    finally:
        stage.request_stop()
        stage.thread.join(5)


# --- the first label soon after start ----------------------------------------------------------


def test_sources_open_while_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "clip.mp4", digit_frames(10, 64), fps=10)
    cams = {"c0": CameraSettings(source=str(video), realtime=True, loop=False)}
    opened = threading.Event()
    events: list[str] = []

    def opener(cam: CameraSettings) -> Any:
        events.append(f"open on {threading.current_thread().name}")
        capture = sources.open_source(cam)
        opened.set()
        real_release = capture.release

        def release() -> None:
            events.append("released")
            real_release()

        return Released(capture, release)

    def load(settings: Any) -> Engine:
        # Only an open that runs beside the load lets it finish.
        assert opened.wait(10), "the source was not opened while the model loaded"
        return load_engine(settings)

    monkeypatch.setattr(pipeline, "load_engine", load)
    daemon = Daemon(settings_for(unique_prefix(), cameras=cams), opener=opener)
    assert events == ["open on open-c0"]
    daemon.stop()  # never started: what was opened for the camera is released
    assert events == ["open on open-c0", "released"]


class Released:
    """A capture whose ``release`` is watched."""

    def __init__(self, capture: Any, release: Any) -> None:
        self._capture = capture
        self.release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._capture, name)


def test_a_camera_takes_its_source_or_error_from_the_open_ahead() -> None:
    calls: list[str] = []
    fail = CameraSettings(source="/dev/video7")
    good = CameraSettings(source="/dev/video0")

    class Device(FakeCapture):
        pass

    def opener(cam: CameraSettings) -> Any:
        calls.append(cam.source)
        if cam is fail:
            raise CaptureError("cannot open device /dev/video7")
        return Device()

    ahead = sources.OpenAhead(opener, {"bad": fail, "good": good})
    with pytest.raises(CaptureError, match="cannot open device"):
        ahead(fail)
    assert isinstance(ahead(good), Device)
    assert sorted(calls) == ["/dev/video0", "/dev/video7"]  # once each, ahead
    assert isinstance(ahead(good), Device)  # a reopen opens anew
    assert sorted(calls) == ["/dev/video0", "/dev/video0", "/dev/video7"]
    ahead.close()


def test_a_paced_file_shows_its_first_frame_at_once_then_keeps_the_shared_beat(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "slow.mp4", digit_frames(4, 64), fps=2)
    seen: list[Frame] = []

    def on_frame() -> None:
        frame = cam.take()
        if frame is not None:
            seen.append(frame)

    cam = Camera(
        "slow", CameraSettings(source=str(video), realtime=True, loop=False), on_frame=on_frame
    )
    started = time.monotonic()
    cam.start()
    try:
        assert wait_until(lambda: len(seen) >= 2, timeout=10)
    finally:
        cam.stop()
    # Not held until the clock's next tick (up to half a second at 2 fps).
    assert seen[0].monotonic - started < 0.25
    ticks = (seen[1].monotonic - capture._BEAT_EPOCH) / 0.5
    assert abs(ticks - round(ticks)) < 0.1  # the second on the shared clock's beat


# --- FFmpeg's decoding threads ----------------------------------------------------------------


def test_ffmpeg_decoders_share_the_cores_but_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "clip.mp4", digit_frames(4, 64), fps=10)
    cams = {
        "file": CameraSettings(source=str(video)),
        "net": CameraSettings(source="rtsp://192.0.2.10/stream"),
        "usb": CameraSettings(source="/dev/video0"),
        "frames": CameraSettings(source=str(tmp_path / "%04d.png")),
        "set": CameraSettings(source=str(video), decode_threads=5),
    }

    def threads(cores: int, cameras: dict[str, CameraSettings]) -> dict[str, int | None]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        return {n: c.decode_threads for n, c in sources.decoding_shares(cameras).items()}

    # FFmpeg decodes three of them (the file, the stream and the one set by hand): 7 spare
    # cores make 2 each; a device and an image sequence are not FFmpeg's.
    expected = {"file": 2, "net": 2, "usb": None, "frames": None, "set": 5}
    assert threads(8, cams) == expected
    assert threads(2, cams) == {**expected, "file": 1, "net": 1}
    assert threads(1, cams) == {**expected, "file": 1, "net": 1}
    assert threads(8, {"file": cams["file"]}) == {"file": 7}
    assert cams["file"].decode_threads is None  # the settings themselves are left as they were

    # FFmpeg is told: a capture opened alone takes the share of one camera, else the one given.
    opened = sources.open_source(cams["file"])
    assert opened.get(cv2.CAP_PROP_N_THREADS) == 7
    opened.release()
    opened = sources.open_source(cams["set"])
    assert opened.get(cv2.CAP_PROP_N_THREADS) == 5
    opened.release()

    # The daemon shares the cores among all its cameras before it opens any.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    given: list[int | None] = []

    def opener(cam: CameraSettings) -> Any:
        given.append(cam.decode_threads)
        return sources.open_source(cam)

    files = {f"c{i}": CameraSettings(source=str(video), realtime=False) for i in range(3)}
    daemon = Daemon(settings_for(unique_prefix(), cameras=files), opener=opener)
    try:
        assert [c.settings.decode_threads for c in daemon.cameras] == [1, 1, 1]
        assert wait_until(lambda: len(given) == 3, timeout=10)
        assert given == [1, 1, 1]
    finally:
        daemon.stop()
