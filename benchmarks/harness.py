"""``make bench``: the daemon against the naive loop and each stage alone, from one run.

Each workload runs, side by side on the same clips and model: every stage alone (decode,
preprocess, invoke at the batch sizes used, publish), the naive one-thread loop
(:mod:`benchmarks.naive`), and ``edge-daemon run`` as a user runs it, each with a real broker
and a subscriber in another process (``mosquitto_sub``) recording what arrives, and when. It
writes the figures as JSON under ``benchmarks/results/``, draws a PNG chart beside them, and
prints a table of ratios against the targets of issue 10. On workloads 1-4 the two programs
take turns three times, sharing the window, and every figure is the median of the three (a
burst of load from elsewhere on a shared machine lands on both, and on one turn of three);
each stage alone is measured three times too.

    .venv/bin/python -m benchmarks.harness            # the full run, about 16 minutes
    .venv/bin/python -m benchmarks.harness --tiny     # seconds per case, the digits model only
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks import assets
from edge_daemon.config import load_settings
from edge_daemon.engine import Engine
from edge_daemon.postprocess import Class
from edge_daemon.prediction import Prediction
from edge_daemon.preprocess import as_image, crop
from edge_daemon.publisher import Publisher
from edge_daemon.sources import decoding_threads, quiet_opencv

RESULTS = Path(__file__).resolve().parent / "results"
HOST, PORT = "127.0.0.1", 1883


#: The packages whose modules the measured programs import from this checkout.
PROGRAMS = (Path(__file__).resolve().parent, assets.ROOT / "edge_daemon")


def compile_programs() -> None:
    """Compile the daemon's and the naive loop's modules to bytecode, as ``pip install`` does
    for an installed package. An editable install has none until a first run writes it, and
    where ``PYTHONDONTWRITEBYTECODE`` is set (as on the machines this runs on) no run ever
    does: every start compiled the daemon's 40-odd modules from source again (46 against 90
    ms of imports, measured), a cost no installed daemon pays."""
    for package in PROGRAMS:
        if not compileall.compile_dir(package, quiet=1):
            raise RuntimeError(f"could not compile {package} to bytecode")


# --- one process under test ---------------------------------------------------------------------


@dataclass
class Run:
    """What one process (daemon or naive loop) did in its measured window."""

    who: str
    labels_per_s: float = 0.0
    cpu_percent: float = 0.0
    peak_rss_mb: float = 0.0
    first_label_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    first_p50_ms: float = float("nan")
    last_p50_ms: float = float("nan")
    reused_share: float = 0.0
    threads: int = 0
    labels: int = 0
    #: The broker's and the subscriber's CPU over the same window (on the same cores).
    broker_cpu_percent: float = float("nan")
    subscriber_cpu_percent: float = float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local mosquitto's process, when there is one to read."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "mosquitto":
                pids.append(int(comm.parent.name))
        except OSError:
            continue  # a process that just ended
    return pids[0] if len(pids) == 1 else None


def status_value(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Subscriber:
    """``mosquitto_sub`` in its own process, writing each label's arrival time (from the
    broker's socket, in nanoseconds) and payload to a file. A C client, so that counting
    thousands of messages a second does not take the cores from what is measured (with a Python
    subscriber, the naive loop's p99 at 4,300 labels/s read 149 ms: the subscriber fell
    behind)."""

    def __init__(self, prefix: str, path: Path) -> None:
        self.prefix = prefix
        self.path = path
        self._out = path.open("wb")
        self.proc = subprocess.Popen(
            [
                *("stdbuf", "-oL", "mosquitto_sub", "-h", HOST, "-p", str(PORT), "-q", "1"),
                *("-t", f"{prefix}/+/+/label", "-F", "%U %p"),
            ],
            stdout=self._out,
        )
        marker = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        marker.connect(HOST, PORT)
        marker.loop_start()
        try:
            deadline = time.monotonic() + 30
            while not self.lines():
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto_sub did not start")
                marker.publish(f"{prefix}/ready/ready/label", b"ready", qos=1).wait_for_publish(5)
                time.sleep(0.05)
        finally:
            marker.disconnect()
            marker.loop_stop()
        self.skip = len(self.lines())

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines()

    def first_arrival(self, timeout: float) -> float | None:
        """When the first label arrived, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()[self.skip :]
            if lines:
                return float(lines[0].split(b" ", 1)[0])
            time.sleep(0.005)
        return None

    def stop(self) -> dict[str, list[Any]]:
        """Stop; each label's arrival time, capture-to-arrival milliseconds, and reuse."""
        time.sleep(0.3)  # what is on the way
        self.proc.terminate()
        self.proc.wait(10)
        self._out.close()
        arrived: list[float] = []
        latency: list[float] = []
        reused: list[bool] = []
        for line in self.lines()[self.skip :]:
            stamp, _, raw = line.partition(b" ")
            if raw == b"ready":
                continue
            payload = json.loads(raw)
            at = float(stamp)
            arrived.append(at)
            latency.append((at - datetime.fromisoformat(payload["ts"]).timestamp()) * 1000.0)
            reused.append(payload.get("inference_ms", 1) == 0)  # 0: a result reused
        return {"arrived": arrived, "latency_ms": latency, "reused": reused}


def measure(
    who: str, command: list[str], env: dict[str, str], *, prefix: str, warmup: float, window: float
) -> Run:
    """Start a subscriber, then ``command``; measure ``window`` seconds after ``warmup``
    seconds of labels arriving."""
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "stderr").open("w+b") as err:
        sub = Subscriber(prefix, Path(tmp) / "received.txt")
        started = time.time()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        first = sub.first_arrival(120)
        if first is None:
            proc.kill()
            sub.stop()
            err.seek(0)
            raise RuntimeError(f"{who}: no label arrived: {err.read().decode()[-1500:]}")
        first_label = first - started
        time.sleep(warmup)
        others = [broker_pid(), sub.proc.pid]
        before = [cpu_seconds(pid) if pid else math.nan for pid in others]
        cpu0, t0 = cpu_seconds(proc.pid), time.time()
        time.sleep(window)
        cpu1, t1 = cpu_seconds(proc.pid), time.time()
        after = [cpu_seconds(pid) if pid else math.nan for pid in others]
        rss = status_value(proc.pid, "VmHWM") / 1024
        threads = status_value(proc.pid, "Threads")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        received = sub.stop()
    run = summarise(who, received, t0, t1)
    run.cpu_percent = (cpu1 - cpu0) / (t1 - t0) * 100
    run.broker_cpu_percent, run.subscriber_cpu_percent = (
        (b - a) / (t1 - t0) * 100 for a, b in zip(before, after, strict=True)
    )
    run.peak_rss_mb = rss
    run.first_label_s = first_label
    run.threads = threads
    return run


def summarise(who: str, received: dict[str, list[Any]], t0: float, t1: float) -> Run:
    """Labels per second and latency of the labels that arrived between ``t0`` and ``t1``."""
    arrived = np.array(received["arrived"])
    latency = np.array(received["latency_ms"])
    reused = np.array(received["reused"], dtype=bool)
    inside = (arrived >= t0) & (arrived < t1)
    run = Run(who)
    run.labels = int(inside.sum())
    run.labels_per_s = run.labels / (t1 - t0)
    if run.labels:
        lat = latency[inside]
        run.p50_ms = float(np.percentile(lat, 50))
        run.p99_ms = float(np.percentile(lat, 99))
        run.reused_share = float(reused[inside].mean())
        sixth = (t1 - t0) / 6
        head = latency[inside & (arrived < t0 + sixth)]
        tail = latency[inside & (arrived >= t1 - sixth)]
        run.first_p50_ms = float(np.median(head)) if head.size else float("nan")
        run.last_p50_ms = float(np.median(tail)) if tail.size else float("nan")
    return run


@dataclass
class Workload:
    """Cameras on a clip with regions, a model, a pace, and how long to measure."""

    name: str
    model: Path
    clip: Path
    cameras: int
    rois: dict[str, str] = field(default_factory=dict)
    fps: float = 0.0
    daemon_env: dict[str, str] = field(default_factory=dict)
    #: The naive loop shrinks by area averaging (OpenCV's INTER_AREA), as the model declares.
    naive_area: bool = False


def daemon_command(w: Workload, prefix: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(
        EDGE_MQTT__HOST=HOST,
        EDGE_MQTT__PORT=str(PORT),
        EDGE_MQTT__TOPIC_PREFIX=prefix,
        EDGE_MQTT__STATS_INTERVAL_S="0",
        EDGE_LOG_LEVEL="warning",
        EDGE_MODEL__PATH=str(w.model),
        # Like for like: every crop classified (the reuse of unchanged ones is measured alone).
        EDGE_INFERENCE__UNCHANGED_BELOW="0",
    )
    env.update(w.daemon_env)
    for i in range(w.cameras):
        env[f"EDGE_CAMERAS__cam{i}__SOURCE"] = str(w.clip)
        env[f"EDGE_CAMERAS__cam{i}__REALTIME"] = "true" if w.fps else "false"
        for name, box in w.rois.items():
            env[f"EDGE_CAMERAS__cam{i}__ROIS__{name}"] = box
    return [sys.executable, "-m", "edge_daemon", "run"], env


def naive_command(w: Workload, prefix: str) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "benchmarks.naive", "--model", str(w.model)]
    command += ["--prefix", prefix, "--host", HOST, "--port", str(PORT), "--seconds", "3600"]
    for _ in range(w.cameras):
        command += ["--source", str(w.clip)]
    if w.rois:
        command += ["--rois", ";".join(f"{k}={v}" for k, v in w.rois.items())]
    if w.fps:
        command += ["--fps", str(w.fps)]
    if w.naive_area:
        command.append("--area")
    return command, dict(os.environ)


def naive_threads_command(w: Workload, prefix: str) -> tuple[list[str], dict[str, str]]:
    """The naive loop with each source read on a thread of its own, as a live camera's
    blocking reads need (the daemon's shape)."""
    command, env = naive_command(w, prefix)
    return [*command, "--thread-per-camera"], env


def compare(
    w: Workload, warmup: float, window: float, defaults: bool = False, repeats: int = 1
) -> dict[str, list[Run]]:
    """The naive loop and the daemon on one workload, taking turns ``repeats`` times over
    ``window`` seconds in all (a burst of load from elsewhere on the machine lands on both);
    with ``defaults`` also the daemon as installed (unchanged crops reuse their prediction)
    and the naive loop on a thread per camera. Each program's runs, in order."""
    runs: dict[str, list[Run]] = {}
    cases = [("naive", naive_command), ("daemon", daemon_command)]
    if defaults:
        cases.append(("daemon_defaults", daemon_command))
        cases.append(("naive_threads", naive_threads_command))
    for _ in range(repeats):
        for who, build in cases:
            prefix = f"bench/{uuid.uuid4().hex[:8]}"
            command, env = build(w, prefix)
            if who == "daemon_defaults":
                env.pop("EDGE_INFERENCE__UNCHANGED_BELOW")
            run = measure(who, command, env, prefix=prefix, warmup=warmup, window=window / repeats)
            runs.setdefault(who, []).append(run)
            print(f"  {w.name} {who}: {fmt_run(run)}", flush=True)
    return runs


def median_run(runs: list[Run]) -> Run:
    """One run whose every figure is the median of ``runs``' (NaN where all are NaN)."""
    out = Run(runs[0].who)
    for f in fields(Run):
        if f.name == "who":
            continue
        known = [v for r in runs if not math.isnan(v := getattr(r, f.name))]
        middle = statistics.median(known) if known else math.nan
        setattr(out, f.name, round(middle) if f.type in ("int", int) else float(middle))
    return out


def median_stages(measured: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's figure: the median of the repetitions that measured it."""
    keys = dict.fromkeys(k for m in measured for k in m)
    return {k: float(statistics.median(m[k] for m in measured if k in m)) for k in keys}


def fmt_run(r: Run) -> str:
    return (
        f"{r.labels_per_s:.1f} labels/s, CPU {r.cpu_percent:.0f}% (broker "
        f"{r.broker_cpu_percent:.0f}%, subscriber {r.subscriber_cpu_percent:.0f}%), "
        f"p50 {r.p50_ms:.1f} ms, "
        f"p99 {r.p99_ms:.1f} ms, first label {r.first_label_s:.2f} s, "
        f"peak RSS {r.peak_rss_mb:.0f} MB, {r.threads} threads"
    )


# --- each stage alone ----------------------------------------------------------------------------


def timed(fn: Any, seconds: float) -> float:
    """Seconds per call of ``fn`` over about ``seconds``."""
    return timed_cpu(fn, seconds)[0]


def timed_cpu(fn: Any, seconds: float) -> tuple[float, float]:
    """Seconds per call of ``fn`` over about ``seconds``, and this process's CPU seconds per
    call meanwhile (every thread's: FFmpeg's decoding threads, paho's network thread)."""
    fn()
    calls, started, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return elapsed / calls, (time.process_time() - cpu) / calls


def stages(w: Workload, seconds: float) -> dict[str, float]:
    """Labels per second each stage manages alone, on one thread: decode (frames x regions),
    preprocess, invoke at batch 1 and at the batch the workload forms, publish."""
    capture = cv2.VideoCapture(str(w.clip))

    def decode() -> None:
        ok, _ = capture.read()
        if not ok:
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)

    regions = max(len(w.rois), 1)
    wall, cpu = timed_cpu(decode, seconds)
    out: dict[str, float] = {"decode": regions / wall, "cpu_decode": cpu / regions}
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
    _, first = capture.read()
    capture.release()
    # Also as the daemon decodes: on its share of the cores (one thread a camera on 2 cores)
    # instead of FFmpeg's default of one per core.
    threads = decoding_threads(w.cameras)
    capture = cv2.VideoCapture(str(w.clip), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    wall, cpu = timed_cpu(decode, seconds)
    capture.release()
    out["decode_threads"] = threads
    out["decode_daemon"], out["cpu_decode_daemon"] = regions / wall, cpu / regions
    frame = as_image(first)
    engine = Engine.from_path(w.model)
    h, wd = frame.shape[:2]
    boxes = [parse_box(b) for b in w.rois.values()] or [(0, 0, wd, h)]
    crops = [crop(frame, b) for b in boxes]
    wall, cpu = timed_cpu(lambda: [engine.shape(c) for c in crops], seconds)
    out["preprocess"], out["cpu_preprocess"] = len(crops) / wall, cpu / len(crops)
    shaped = [engine.shape(c) for c in crops]
    engine.batching.mode = "off"
    wall, cpu = timed_cpu(lambda: engine.infer_shaped(shaped[:1]), seconds)
    out["invoke_b1"], out["cpu_invoke_b1"] = 1 / wall, cpu
    batch = len(shaped) if w.rois else w.cameras
    if batch > 1 and engine.batched:
        many = (shaped * batch)[:batch]
        engine.batching.mode = "on"
        wall, cpu = timed_cpu(lambda: engine.infer_shaped(many), seconds)
        out[f"invoke_b{batch}"], out[f"cpu_invoke_b{batch}"] = batch / wall, cpu / batch
    out["publish"], out["cpu_publish"] = publish_rate(seconds)
    return out


def parse_box(text: str) -> tuple[int, int, int, int]:
    x, y, w, h = (int(v) for v in text.split(","))
    return x, y, w, h


def sample_prediction() -> Prediction:
    top = (Class(7, "7", 0.97), Class(1, "1", 0.02), Class(9, "9", 0.01))
    return Prediction.from_top(
        top,
        0.5,
        device="bench",
        camera="cam0",
        roi="digit",
        frame=1234,
        captured=time.time(),
        model="digits",
        model_hash="0123456789ab",
        latency_ms=3.2,
        inference_ms=0.2,
        batch=1,
    )


def publish_rate(seconds: float) -> tuple[float, float]:
    """Labels per second one paho client delivers alone at QoS 1, acknowledgements included
    (its network thread's work is part of publishing), and the CPU seconds per label."""
    prediction = sample_prediction()
    topic = f"bench/{uuid.uuid4().hex[:8]}/cam0/digit/label"
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(100)
    client.connect(HOST, PORT)
    client.loop_start()
    sent, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        infos = [client.publish(topic, prediction.to_json(), qos=1) for _ in range(500)]
        infos[-1].wait_for_publish(30)
        sent += len(infos)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return sent / elapsed, cpu / sent


def publish_cost(seconds: float, rounds: int = 5) -> dict[str, float]:
    """Seconds of the caller's time per label at QoS 1 to the same broker: the payload's JSON
    handed to paho's own publish, against the same through :meth:`Publisher.publish`; the
    median of ``rounds`` alternating rounds (this machine is shared and noisy)."""
    prediction = sample_prediction()
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}/cam0/digit/label"
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(100)  # the daemon's window
    client.connect(HOST, PORT)
    client.loop_start()
    settings = load_settings(mqtt={"host": HOST, "port": PORT, "topic_prefix": prefix})
    publisher = Publisher(settings)
    publisher.start()
    deadline = time.monotonic() + 10
    while not publisher.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    paho: list[float] = []
    daemon: list[float] = []
    for _ in range(rounds):
        paho.append(timed(lambda: client.publish(topic, prediction.to_json(), qos=1), seconds))
        time.sleep(0.2)  # the acknowledgements come in
        daemon.append(timed(lambda: publisher.publish(topic, prediction.to_json()), seconds))
        time.sleep(0.2)
    publisher.stop(1.0)
    client.disconnect()
    client.loop_stop()
    return {
        "paho": statistics.median(paho),
        "daemon": statistics.median(daemon),
        "json": timed(prediction.to_json, seconds),
    }


#: What each program must import before its first label, timed in a fresh interpreter.
STARTUP_IMPORTS = {
    "python": "pass",
    "naive_imports": "import benchmarks.naive as n; n.interpreter_class()",
    "settings_library": "import pydantic_settings",
    # What pydantic-settings adds to a program that has imported the naive loop's modules
    # already (the standard library modules both need are imported once).
    "naive_and_settings": "import benchmarks.naive as n; n.interpreter_class(); "
    "import pydantic_settings",
}


def startup_costs(rounds: int = 5) -> dict[str, float]:
    """Seconds from spawn to exit of a fresh interpreter that imports each of
    :data:`STARTUP_IMPORTS`, the median of ``rounds`` alternating rounds. ``settings_library``
    less ``python`` is what pydantic-settings costs a program that imports nothing else;
    ``naive_and_settings`` less ``naive_imports`` what it adds to the naive loop's imports."""
    times: dict[str, list[float]] = {name: [] for name in STARTUP_IMPORTS}
    for _ in range(rounds):
        for name, code in STARTUP_IMPORTS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=assets.ROOT)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


# --- the workloads -----------------------------------------------------------------------------


def workloads(tiny: bool) -> dict[str, list[Workload]]:
    digits = assets.digits_model()
    sample = assets.SAMPLE_CLIP
    sample_roi = assets.sample_rois()
    grid = assets.grid_rois(320, 240, 4)
    big = digits if tiny else assets.mobilenet(1.0, 224)
    balanced = digits if tiny else assets.mobilenet(0.35, 128)
    clip720 = assets.h264_clip(frames=20 if tiny else 150)
    clip30 = assets.sample_clip_at(30)
    return {
        "1 inference-bound": [
            Workload(f"mnv2-224 x{n}" if not tiny else f"big x{n}", big, sample, n) for n in (1, 4)
        ],
        # The model declares how its training images were shrunk (the manifest's
        # input.resize); the naive loop shrinks the same way, as its user knows.
        "2 balanced": [
            Workload(
                f"720p h264{' area' if area else ''} x{n}",
                balanced if area else assets.shrinking_by(balanced, "bilinear"),
                clip720,
                n,
                {"centre": "320,0,720,720"},
                naive_area=area,
            )
            for area in (False, True)
            for n in (1, 4)
        ],
        "3 many regions": [
            Workload(f"digits 16 regions x{n}", digits, sample, n, grid) for n in (1, 4)
        ],
        "4 live": [Workload("live 4 x 30 fps", digits, clip30, 4, sample_roi, fps=30)],
        "5 scaling": [
            Workload(f"15 fps x{n}", digits, assets.sample_clip_at(15), n, sample_roi, fps=15)
            for n in ((1, 2) if tiny else (1, 2, 4, 8))
        ],
    }


def still_scene(tiny: bool, warmup: float, window: float) -> dict[str, Run]:
    """4 cameras at 30 fps on a still scene with sensor noise, MobileNetV2 0.35 at 128: every
    crop classified against unchanged crops reusing their prediction (the default)."""
    model = assets.digits_model() if tiny else assets.mobilenet(0.35, 128)
    w = Workload("still 4 x 30 fps", model, assets.still_clip(), 4)
    w.rois = assets.sample_rois()
    w.fps = 30
    runs = {}
    for label, below in (("every crop", "0"), ("reuse unchanged", "0.005")):
        w.daemon_env = {"EDGE_INFERENCE__UNCHANGED_BELOW": below}
        prefix = f"bench/{uuid.uuid4().hex[:8]}"
        command, env = daemon_command(w, prefix)
        env.update(w.daemon_env)
        runs[label] = measure(label, command, env, prefix=prefix, warmup=warmup, window=window)
        print(f"  still {label}: {fmt_run(runs[label])}", flush=True)
    return runs


def run_workload(
    group: str, w: Workload, warmup: float, window: float, *, stage_s: float, repeats: int
) -> dict[str, Any]:
    """One workload's entry in the report: its stages alone (workloads 1-3) and each program's
    median run, with every turn's labels a second."""
    entry: dict[str, Any] = {"name": w.name, "cameras": w.cameras, "fps": w.fps}
    entry["model"] = w.model.stem
    entry["regions"] = max(len(w.rois), 1)
    # Scaling's runs stay whole: its few percent of CPU over a shorter window would be a
    # handful of the kernel's clock ticks.
    turns = 1 if group.startswith("5") else repeats
    if not group.startswith(("4", "5")):
        entry["stages"] = median_stages([stages(w, stage_s) for _ in range(turns)])
    runs = compare(w, warmup, window, defaults=group.startswith("4"), repeats=turns)
    entry |= {who: asdict(median_run(each)) for who, each in runs.items()}
    entry["repeats"] = {who: [r.labels_per_s for r in each] for who, each in runs.items()}
    if turns > 1:
        medians = ", ".join(
            f"{who} {entry[who]['labels_per_s']:.1f} labels/s CPU {entry[who]['cpu_percent']:.0f}%"
            for who in runs
        )
        print(f"  {w.name} medians: {medians}", flush=True)
    return entry


def main() -> None:
    quiet_opencv(debug=False)  # as the daemon: its warnings about FFmpeg's locks, every open
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a quick run: seconds per case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        action="append",
        choices=("1", "2", "3", "4", "5", "still", "costs"),
        help="run only this part (a workload's number, 'still' or 'costs'; repeatable): "
        "its lines are printed, nothing is written",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        choices=range(1, 10),
        metavar="N",
        help="turns the naive loop and the daemon take on workloads 1-4 (and times each stage "
        "is measured), the window shared among them; the median of each figure is reported "
        "(default 3; 1 with --tiny)",
    )
    args = parser.parse_args()
    only = set(args.only or ())
    tiny = args.tiny
    repeats = args.repeats or (1 if tiny else 3)
    warmup, window, live_window = (0.5, 1.5, 3.0) if tiny else (3.0, 15.0, 60.0)
    stage_s = 0.2 if tiny else 1.0
    started = time.time()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiny": tiny,
        "machine": machine(),
        "workloads": {},
    }
    compile_programs()
    print("building models and clips (cached in build/bench-cache)...", flush=True)
    groups = workloads(tiny)
    for group, items in groups.items():
        if only and group.split()[0] not in only:
            continue
        print(f"workload {group}", flush=True)
        entries = []
        for w in items:
            win = live_window if group.startswith("4") else window
            entries.append(run_workload(group, w, warmup, win, stage_s=stage_s, repeats=repeats))
        report["workloads"][group] = entries
    if not only or "still" in only:
        print("still scene", flush=True)
        report["still"] = {k: asdict(v) for k, v in still_scene(tiny, warmup, window).items()}
    if not only or "costs" in only:
        costs = publish_cost(stage_s)
        report["per_label_us"] = {k: v * 1e6 for k, v in costs.items()}
        print(f"  per label: {report['per_label_us']}", flush=True)
        report["startup_s"] = startup_costs(3 if tiny else 7)
        print(f"  start-up: {report['startup_s']}", flush=True)
    if only:
        return  # a part of the run: the table compares a whole run's figures only
    report["seconds"] = round(time.time() - started, 1)
    from benchmarks.report import chart, table  # noqa: PLC0415

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = "tiny" if tiny else "latest"
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    chart(report, args.out / f"{stamp}.png")
    print(table(report))
    print(f"wrote {args.out / f'{stamp}.json'} and {args.out / f'{stamp}.png'}")


#: The widest vector instructions a CPU has, by its /proc/cpuinfo flag, widest first: int8
#: inference speed depends on them more than on anything else the machine has (machines that
#: all call themselves "AMD EPYC" ran MobileNetV2 1.0 224 int8 at 613 invokes a second with
#: AVX-512 and at 86 with AVX2 alone).
VECTOR_FLAGS = (
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
    ("asimddp", "NEON with dot product"),
    ("asimd", "NEON"),
    ("neon", "NEON"),
)


def cpu(cpuinfo: str) -> dict[str, str]:
    """The CPU's name, family and model, and widest vector instructions, from the text of
    /proc/cpuinfo (its first processor)."""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if "CPU implementer" in info:  # ARM
        ident = f"implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
    else:
        ident = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return {
        "cpu": info.get("model name") or info.get("Model", ""),
        "cpu_id": ident,
        "vector": next((name for flag, name in VECTOR_FLAGS if flag in flags), "none"),
    }


def machine() -> dict[str, Any]:
    from edge_daemon.runtime import load_runtime  # noqa: PLC0415

    return {
        **cpu(Path("/proc/cpuinfo").read_text()),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "runtime": load_runtime().name,
        "opencv": cv2.__version__,
        "kernel": platform.release(),
        "load_before": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    main()
