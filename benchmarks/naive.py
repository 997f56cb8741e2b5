"""The loop a user would write instead of running edge-daemon: one thread, camera after camera.

Read a frame, then for each region: crop, resize, convert, quantise, invoke at batch 1, take the
best class, build the JSON, publish with paho. No queue, no other thread than paho's own
(``--thread-per-camera``: each source on a thread of its own, as blocking live reads need). It
reads the model's manifest for its input range (a user knows their model) and takes the same
interpreter threads as the daemon. A paced source (``--fps``) is read when its next frame is
due, as a live camera delivers it; otherwise files are read as fast as they decode.

    python -m benchmarks.naive --model M.tflite --source clip.mp4 --source clip.mp4 --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    except ImportError:
        from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415
    return Interpreter


def parse_rois(text: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``name=x,y,w,h;...`` in pixels; empty for the whole frame."""
    rois = []
    for part in filter(None, text.split(";")):
        name, _, box = part.partition("=")
        x, y, w, h = (int(v) for v in box.split(","))
        rois.append((name, (x, y, w, h)))
    return rois


class Model:
    """The interpreter at batch 1, and what the user knows of the model's input."""

    def __init__(self, path: Path, threads: int | None, area: bool = False) -> None:
        #: Shrink by area averaging (as the daemon does) instead of OpenCV's default bilinear.
        self.interpolation = cv2.INTER_AREA if area else cv2.INTER_LINEAR
        manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        self.labels = manifest["labels"]
        self.spec = manifest["input"]
        self.interpreter = interpreter_class()(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        _, self.height, self.width, _ = (int(v) for v in self.input["shape"])
        dtype = self.input["dtype"]
        self.limits = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None

    def classify(self, image: np.ndarray) -> tuple[str, float]:
        """The best class of one crop and its score."""
        image = cv2.resize(image, (self.width, self.height), interpolation=self.interpolation)
        if self.spec["colour"] == "gray":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[..., None]
        elif self.spec["colour"] == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        values = image.astype(np.float32) * self.spec["scale"] + self.spec["offset"]
        if self.limits is not None:
            scale, zero = self.input["quantization"]
            values = np.clip(np.round(values / scale + zero), self.limits.min, self.limits.max)
        self.interpreter.set_tensor(self.input["index"], values.astype(self.input["dtype"])[None])
        self.interpreter.invoke()
        scores = self.interpreter.get_tensor(self.output["index"])[0].astype(np.float32)
        out_scale, out_zero = self.output["quantization"]
        if out_scale:
            scores = (scores - out_zero) * out_scale
        best = int(np.argmax(scores))
        return self.labels[best], float(scores[best])


class Loop:
    """Reads its sources in turn, and classifies and publishes each region of each frame."""

    def __init__(
        self, args: argparse.Namespace, model: Model, client: mqtt.Client, stop: dict[str, bool]
    ) -> None:
        self.args = args
        self.model = model
        self.client = client
        self.stop = stop
        self.rois = parse_rois(args.rois)
        self.started = time.monotonic()
        self.end = self.started + args.seconds

    def serve(
        self, cams: list[tuple[int, Any]], lock: contextlib.AbstractContextManager[object]
    ) -> None:
        """Read ``cams`` (number and capture) one after another until the time is up; the
        model and the client are used under ``lock``."""
        fps = self.args.fps
        numbers = [0] * len(cams)
        while time.monotonic() < self.end and not self.stop["now"]:
            for k, (cam, capture) in enumerate(cams):
                if fps:
                    delay = self.started + numbers[k] / fps - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                ok, frame = capture.read()
                if not ok:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, frame = capture.read()
                captured = time.time()
                number = numbers[k]
                numbers[k] += 1
                regions = self.rois or [("frame", (0, 0, frame.shape[1], frame.shape[0]))]
                with lock:
                    for name, (x, y, w, h) in regions:
                        label, score = self.model.classify(frame[y : y + h, x : x + w])
                        payload = {
                            "camera": f"cam{cam}",
                            "roi": name,
                            "frame": number,
                            "ts": datetime.fromtimestamp(captured, UTC).isoformat(
                                timespec="milliseconds"
                            ),
                            "label": label,
                            "score": round(score, 6),
                        }
                        self.client.publish(
                            f"{self.args.prefix}/cam{cam}/{name}/label",
                            json.dumps(payload),
                            qos=self.args.qos,
                        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--source", action="append", required=True)
    parser.add_argument("--rois", default="")
    parser.add_argument("--fps", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--area", action="store_true", help="shrink by area averaging")
    parser.add_argument(
        "--thread-per-camera",
        action="store_true",
        help="each source read on a thread of its own (one at a time through the model)",
    )
    args = parser.parse_args()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    model = Model(args.model, args.threads, args.area)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(args.host, args.port)
    client.loop_start()
    cams = [(i, cv2.VideoCapture(source)) for i, source in enumerate(args.source)]
    for (_, capture), source in zip(cams, args.source, strict=True):
        if not capture.isOpened():
            client.loop_stop()
            parser.error(f"cannot open --source {source}: check the path or URL")
    loop = Loop(args, model, client, stop)
    if args.thread_per_camera:
        lock = threading.Lock()
        workers = [threading.Thread(target=loop.serve, args=([c], lock)) for c in cams]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    else:
        loop.serve(cams, contextlib.nullcontext())
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
