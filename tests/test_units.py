"""The pure parts, each alone: batching, the pixel table, top-k, regions, backoff, scores, JSON."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import cv2
import jsonschema
import numpy as np
import pytest

from edge_daemon import engine as engine_module
from edge_daemon.backoff import Backoff
from edge_daemon.batcher import WHOLE_FRAME, Batcher
from edge_daemon.capture import Camera, Frame
from edge_daemon.control import Inbox
from edge_daemon.manifest import InputSpec, OutputSpec, Quantization
from edge_daemon.postprocess import (
    Class,
    finite_rows,
    looks_like_logits,
    scores,
    softmax,
    top_k,
    top_k_rows,
)
from edge_daemon.prediction import EncodeError, Prediction, encode
from edge_daemon.preprocess import (
    as_image,
    fit,
    fit_stack,
    lookup_into,
    pixel_table,
    preprocess_into,
    resize,
    to_colour,
)
from edge_daemon.settings import CameraSettings, Roi
from tests.helpers import PREDICTION
from tests.scenes import door

pytestmark = pytest.mark.runtime

# --- batcher ------------------------------------------------------------------------------------


def camera(name: str, rois: dict[str, str] | None = None) -> Camera:
    parsed = {k: Roi.parse(v) for k, v in (rois or {}).items()}
    return Camera(name, CameraSettings(source=f"/tmp/{name}.mp4", rois=parsed))


def offer(cam: Camera, number: int, size: tuple[int, int] = (40, 60)) -> None:
    image = np.full((*size, 3), number % 256, np.uint8)
    cam.offer(Frame(image, number, time.monotonic(), time.time()))


def test_a_region_reaching_outside_the_frame_is_clipped_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    regions = {
        "inside": "0,0,60,40",  # exactly the frame
        "typo": "600,10,20,20",  # far to the right of a 60-wide frame
        "wide": "0.8,0,0.5,1",  # 0.8 + 0.5 of the width
        "thirds": "0.333333,0,0.666667,1",  # to the edge, give or take rounding
    }
    cam = camera("porch", regions)
    batcher = Batcher([cam], max_batch=8, max_delay_s=0.0)
    with caplog.at_level(logging.WARNING, logger="edge_daemon.batcher"):
        for n in range(2):
            offer(cam, n)
            items = batcher.take_ready()
            assert [i.roi for i in items] == list(regions)
    shapes = {i.roi: i.crop.shape[:2] for i in items}
    assert shapes == {"inside": (40, 60), "typo": (20, 1), "wide": (40, 12), "thirds": (40, 40)}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # once each, not per frame
    assert "region typo (600,10,20,20 in pixels) reaches outside the 60x40 frame" in warned[0]
    assert "only 59,10,1,20 is classified: check EDGE_CAMERAS__porch__ROIS__typo" in warned[0]
    assert "region wide (48,0,30,40 in pixels)" in warned[1]


def test_batcher_takes_each_cameras_freshest_frame_once() -> None:
    a, b = camera("a"), camera("b", {"left": "0,0,0.5,1", "right": "0.5,0,0.5,1"})
    batcher = Batcher([a, b], max_batch=8, max_delay_s=0.0)
    stop = threading.Event()
    for n in range(3):
        offer(a, n)  # only the freshest survives
    offer(b, 7)
    items = batcher.next_batch(stop)
    assert [(i.camera, i.roi, i.frame.number) for i in items] == [
        ("a", WHOLE_FRAME, 2),
        ("b", "left", 7),
        ("b", "right", 7),
    ]
    assert items[1].crop.shape == (40, 30, 3)
    assert batcher.next_batch(stop, idle_timeout=0.05) == []  # nothing new


def test_batcher_never_splits_a_frames_regions_and_rotates_so_none_starves() -> None:
    cams = [camera(f"c{i}", {"x": "0,0,1,1", "y": "0,0,0.5,0.5"}) for i in range(3)]
    batcher = Batcher(cams, max_batch=4, max_delay_s=0.0)
    stop = threading.Event()
    served: list[str] = []
    for round_ in range(6):
        for cam in cams:
            offer(cam, round_)
        items = batcher.next_batch(stop)
        assert len(items) == 4  # two cameras' two regions; a third would not fit
        served += sorted({i.camera for i in items})
    assert {served.count(c.name) for c in cams} == {4}  # each camera in 4 of 6 batches


def test_batcher_waits_at_most_max_delay_for_more_and_not_when_all_have_a_frame() -> None:
    a, b = camera("a"), camera("b")
    batcher = Batcher([a, b], max_batch=8, max_delay_s=0.3)
    stop = threading.Event()
    offer(a, 1)
    started = time.monotonic()
    assert len(batcher.next_batch(stop)) == 1
    assert 0.25 <= time.monotonic() - started < 2.0  # waited for b, then gave up
    offer(a, 2)
    offer(b, 2)
    started = time.monotonic()
    assert len(batcher.next_batch(stop)) == 2
    assert time.monotonic() - started < 0.25  # every camera had a frame: no wait
    a.paused = True
    offer(a, 3)
    assert batcher.next_batch(stop, idle_timeout=0.05) == []  # paused frames are not taken


# --- preprocessing ------------------------------------------------------------------------------


def spec(**kw: object) -> InputSpec:
    base: dict[str, object] = {
        "height": 4,
        "width": 4,
        "channels": 1,
        "colour": "gray",
        "dtype": "float32",
        "scale": 1 / 255,
        "offset": 0.0,
    }
    base.update(kw)
    return InputSpec.model_validate(base)


def test_pixel_table_normalises_and_quantises_exactly() -> None:
    table = pixel_table(spec())
    assert table.dtype == np.float32
    assert table[0] == 0.0
    assert table[255] == pytest.approx(1.0)
    q = pixel_table(spec(dtype="int8", quantization=Quantization(scale=1 / 255, zero_point=-128)))
    assert (q[0], q[128], q[255]) == (-128, 0, 127)
    # Out-of-range values clip instead of wrapping around.
    clipped = pixel_table(spec(dtype="uint8", scale=2.0, offset=-10.0))
    assert (clipped[0], clipped[5], clipped[200]) == (0, 0, 255)
    with pytest.raises(ValueError, match="read-only"):
        table[0] = 1.0


def test_preprocess_into_writes_a_slot_in_place() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, :4] = 255
    out = np.full((4, 4, 1), -1.0, np.float32)
    preprocess_into(image, spec(), out)
    assert out[0, 0, 0] == pytest.approx(1.0)
    assert out[3, 3, 0] == 0.0


def test_the_pixel_lookup_gives_numpys_values_in_place_for_every_input_type() -> None:
    rng = np.random.default_rng(0)
    tables = [
        pixel_table(spec()),
        pixel_table(spec(dtype="int8", quantization=Quantization(scale=1 / 255, zero_point=-128))),
        pixel_table(spec(dtype="uint8", scale=1.0, offset=0.0)),
        pixel_table(spec(dtype="int16", scale=3.0, offset=-300.0)),
    ]
    for table in tables:
        for shape in ((28, 28, 1), (16, 12, 3), (1, 1, 1)):
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            tensor = np.zeros((3, *shape), table.dtype)  # an input tensor of batch 3
            lookup_into(table, image, tensor[1])
            assert np.array_equal(tensor[1], np.take(table, image)), (table.dtype, shape)
            assert not tensor[[0, 2]].any()  # only its own slot
    # An output OpenCV cannot write into (not contiguous): the same values, another way.
    wide = np.zeros((28, 28, 2), np.float32)
    image = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    lookup_into(tables[0], image, wide[:, :, :1])
    assert np.array_equal(wide[:, :, :1], np.take(tables[0], image))


def test_a_colour_crop_for_a_gray_model_turns_gray_before_it_shrinks() -> None:
    rng = np.random.default_rng(1)
    image = door("open", rng, 96)
    shrunk = fit(image, 28, 28, "gray")
    # The old order (shrink three channels, then gray): the same image to within rounding.
    old = to_colour(resize(image, 28, 28), "gray")
    assert shrunk.shape == old.shape == (28, 28, 1)
    difference = np.abs(shrunk.astype(int) - old.astype(int))
    assert difference.max() <= 1
    # Gray first, not merely close: this is the gray image shrunk.
    gray = as_image(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    assert np.array_equal(shrunk[:, :, 0], resize(gray, 28, 28))
    # A crop that grows is converted after (fewer pixels to convert); colour models unchanged.
    small = door("ajar", rng, 12)
    assert np.array_equal(fit(small, 28, 28, "gray"), to_colour(resize(small, 28, 28), "gray"))
    assert np.array_equal(fit(image, 28, 28, "rgb"), to_colour(resize(image, 28, 28), "rgb"))


@pytest.mark.parametrize("colour", ["gray", "rgb", "bgr"])
@pytest.mark.parametrize(
    ("size", "channels"),
    [
        ((60, 80), 3),  # a bilinear step to 56x56, then averaged by 2: the step taken alone
        ((84, 56), 3),  # a whole multiple: straight to averaging
        ((97, 41), 3),  # under twice as wide: OpenCV's general averaging
        ((60, 80), 1),  # gray crops
    ],
)
def test_crops_fitted_together_are_the_crops_fitted_one_by_one(
    colour: str, size: tuple[int, int], channels: int
) -> None:
    rng = np.random.default_rng(2)
    crops = [rng.integers(0, 256, (*size, channels), dtype=np.uint8) for _ in range(5)]
    tall = fit_stack(crops, 28, 28, colour)
    assert tall.shape == (5 * 28, 28, 1 if colour == "gray" else 3)
    for n, crop in enumerate(crops):
        assert np.array_equal(tall[n * 28 : (n + 1) * 28], fit(crop, 28, 28, colour)), n


def test_bilinear_shrinking_is_opencvs_default_resize_and_not_area_averaging() -> None:
    image = door("closed", np.random.default_rng(4), 96)
    for colour, code in (("rgb", cv2.COLOR_BGR2RGB), ("bgr", None)):
        sampled = cv2.resize(image, (28, 28), interpolation=cv2.INTER_LINEAR)
        want = sampled if code is None else cv2.cvtColor(sampled, code)
        assert np.array_equal(fit(image, 28, 28, colour, "bilinear"), want)
    averaged = fit(image, 28, 28, "rgb")
    assert np.abs(averaged.astype(int) - fit(image, 28, 28, "rgb", "bilinear")).mean() > 2
    # Growing is bilinear either way.
    small = door("ajar", np.random.default_rng(5), 12)
    assert np.array_equal(fit(small, 28, 28, "rgb", "bilinear"), fit(small, 28, 28, "rgb"))


# --- postprocessing -----------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [4, 10, 64, 65, 1000])
def test_top_k_of_a_batch_is_top_k_of_each_row_ties_included(classes: int) -> None:
    rng = np.random.default_rng(classes)
    # Scores from a few levels (a quantised output): many equal ones.
    rows = (rng.integers(0, 6, (5, classes)) / 8).astype(np.float32)
    labels = tuple(f"c{i}" for i in range(classes))
    for k in (1, 3, classes + 2):
        assert top_k_rows(rows, labels, k) == [top_k(row, labels, k) for row in rows]


def test_an_integer_output_that_stays_in_0_1_needs_no_checks() -> None:
    def engine_bounded(dtype: str, scale: float, zero: int) -> bool:
        return engine_module._bounded(np.dtype(dtype), Quantization(scale=scale, zero_point=zero))

    assert engine_bounded("uint8", 1 / 256, 0)  # the converter's softmax output
    assert engine_bounded("int8", 1 / 256, -128)
    assert not engine_bounded("int8", 1 / 256, 0)  # -0.5 .. 0.5
    assert not engine_bounded("uint8", 0.1, 0)  # up to 25.5: logits
    assert not engine_module._bounded(np.dtype("float32"), None)


def test_top_k_ties_go_to_the_lower_index_and_threshold_filters() -> None:
    row = np.array([0.2, 0.3, 0.3, 0.2], np.float32)
    labels = ("a", "b", "c", "d")
    assert [c.label for c in top_k(row, labels, 4)] == ["b", "c", "a", "d"]
    assert [c.label for c in top_k(row, labels, 10, threshold=0.25)] == ["b", "c"]


def test_scores_dequantise_softmax_logits_and_leave_non_finite_rows_to_the_caller() -> None:
    probs = OutputSpec(classes=3, dtype="float32")
    raw = np.array(
        [[0.1, 0.7, 0.2], [2.0, -1.0, 0.5], [np.inf, 0.0, 0.0], [np.nan, 0.1, 0.2]], np.float32
    )
    assert looks_like_logits(raw)  # row 1, in a model that claims probabilities
    as_logits = scores(raw, probs, logits=True)
    np.testing.assert_allclose(as_logits[0], softmax(raw[0:1])[0], rtol=1e-6)  # every row
    np.testing.assert_allclose(as_logits[1], softmax(raw[1:2])[0], rtol=1e-6)
    assert list(finite_rows(as_logits)) == [True, True, False, False]
    assert raw[1, 0] == 2.0  # the caller's array is untouched
    as_given = scores(raw[:1], probs)
    np.testing.assert_allclose(as_given, [[0.1, 0.7, 0.2]])
    # Float rounding just past 1 is still a probability: clipped, not softmaxed.
    rounded = np.array([[1.0000001, 0.0, -1e-7]], np.float32)
    assert not looks_like_logits(rounded)
    np.testing.assert_allclose(scores(rounded, probs), [[1.0, 0.0, 0.0]])
    quantised = OutputSpec(
        classes=2, dtype="uint8", quantization=Quantization(scale=1 / 256, zero_point=0)
    )
    out = scores(np.array([[64, 192]], np.uint8), quantised)
    np.testing.assert_allclose(out, [[0.25, 0.75]])


def test_softmax_is_stable_for_huge_logits() -> None:
    out = softmax(np.array([[1e30, 0.0, -1e30]], np.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0]])


# --- regions and backoff ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("0.5,0.2,0.5,0.8", (320, 96, 320, 384)),  # fractions of 640x480
        ("10,20,100,50", (10, 20, 100, 50)),  # pixels
        ("600,400,100,100", (600, 400, 40, 80)),  # clipped to the frame
        ("5000,5000,10,10", (639, 479, 1, 1)),  # off the frame: one pixel at the corner
        ("0,0,1,1", (0, 0, 640, 480)),  # all at most 1: the whole frame
    ],
)
def test_roi_boxes(text: str, box: tuple[int, int, int, int]) -> None:
    assert Roi.parse(text).box(640, 480) == box


def test_backoff_doubles_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(1))
    delays = [backoff.next() for _ in range(8)]
    nominal = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, base in zip(delays, nominal, strict=True):
        assert 0.5 * base <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    backoff.reset()
    assert backoff.next() <= 1.0


# --- payloads -----------------------------------------------------------------------------------


def prediction(score: float) -> Prediction:
    return Prediction.from_top(
        (Class(3, "three", score), Class(1, "one", 0.05)),
        0.5,
        device="dev",
        camera="door",
        roi="frame",
        frame=12,
        captured=1_700_000_000.123,
        model="digits",
        model_hash="0123456789ab",
        latency_ms=1.5,
        inference_ms=0.25,
        batch=2,
    )


def test_prediction_encodes_to_the_schema() -> None:
    payload = json.loads(prediction(0.9).to_json())
    jsonschema.validate(payload, PREDICTION)
    assert payload["label"] == "three"
    assert payload["ts"] == "2023-11-14T22:13:20.123+00:00"
    assert json.loads(prediction(0.4).to_json())["label"] is None  # below the threshold


def test_nan_and_infinity_are_never_encoded() -> None:
    with pytest.raises(EncodeError):
        prediction(float("nan")).to_json()
    with pytest.raises(EncodeError):
        encode({"score": float("inf")})


def test_inbox_drops_oversize_and_oldest_messages_and_counts_them() -> None:
    inbox = Inbox(max_bytes=10, size=3)
    for payload in (b"1", b"x" * 11, b"2", b"3", b"4"):
        inbox.put(payload)
    assert inbox.drain() == [b"2", b"3", b"4"]
    assert (inbox.received, inbox.oversize, inbox.dropped) == (5, 1, 1)
    assert inbox.oversize_since_last_call() == 1
    assert inbox.oversize_since_last_call() == 0
