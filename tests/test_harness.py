"""``make bench`` cannot rot: its tiny run builds its clips from nothing, runs every workload
with the naive loop and the daemon against the real broker, and writes the JSON, the chart and
the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from benchmarks.harness import Run, cpu, median_run, median_stages

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def test_the_tiny_bench_runs_every_workload_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--tiny", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())
    groups = report["workloads"]
    assert list(groups) == [
        "1 inference-bound",
        "2 balanced",
        "3 many regions",
        "4 live",
        "5 scaling",
    ]
    for entries in groups.values():
        for entry in entries:
            for who in ("naive", "daemon"):
                run = entry[who]
                assert run["labels_per_s"] > 0, (entry["name"], who)
                assert run["cpu_percent"] > 0
                assert run["peak_rss_mb"] > 20
                assert 0 < run["first_label_s"] < 30
                assert run["p99_ms"] >= run["p50_ms"] > 0
    for entry in groups["3 many regions"]:
        assert entry["regions"] == 16
        assert set(entry["stages"]) >= {"decode", "preprocess", "invoke_b1", "publish"}
    assert (tmp_path / "cache" / "pan_1280x720_20.mp4").is_file()  # built, not found
    # Workload 2 twice: a model declaring bilinear shrinking, and one declaring area
    # averaging (the naive loop shrinks as each declares).
    balanced = groups["2 balanced"]
    names = ["720p h264 x1", "720p h264 x4", "720p h264 area x1", "720p h264 area x4"]
    assert [e["name"] for e in balanced] == names
    twin = tmp_path / "cache" / f"{balanced[0]['model']}" / f"{balanced[0]['model']}.json"
    assert json.loads(twin.read_text())["input"]["resize"] == "bilinear"
    assert balanced[2]["model"] != balanced[0]["model"]
    live = groups["4 live"][0]
    # The naive loop on a thread per camera too, the shape live cameras need.
    assert live["naive_threads"]["labels_per_s"] > 60
    # Paced at 30 fps: each of 4 cameras gives about 30 labels a second, never more.
    assert 60 < live["daemon"]["labels_per_s"] < 135
    assert report["still"]["reuse unchanged"]["reused_share"] > 0.5
    assert report["still"]["every crop"]["reused_share"] == 0
    assert report["per_label_us"]["daemon"] > 0
    startup = report["startup_s"]
    assert startup["settings_library"] > startup["python"] > 0
    chart = cv2.imread(str(tmp_path / "out" / "tiny.png"))
    assert chart is not None
    assert chart.shape[0] > 500
    assert chart.std() > 10  # drawn, not blank
    for heading in ("## Throughput", "## Live", "## Scaling", "## Still scene", "## Costs"):
        assert heading in proc.stdout
    assert proc.stdout.count("| 3: digits 16 regions") == 4  # ratios, and where the cores went
    assert "Where the cores went" in proc.stdout


def test_a_part_that_does_not_exist_is_refused_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--only", "9"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--only: invalid choice: '9'" in proc.stderr
    assert "building" not in proc.stdout  # refused before any work


def test_each_figure_is_the_median_of_the_turns() -> None:
    nan = float("nan")
    turns = [
        Run("daemon", labels_per_s=600.0, cpu_percent=180.0, p99_ms=nan, threads=13),
        Run("daemon", labels_per_s=500.0, cpu_percent=150.0, p99_ms=4.0, threads=12),
        Run("daemon", labels_per_s=700.0, cpu_percent=170.0, p99_ms=6.0, threads=15),
    ]
    run = median_run(turns)
    assert run.who == "daemon"
    assert run.labels_per_s == 600.0
    assert run.cpu_percent == 170.0  # each figure on its own, not the median turn's
    assert run.p99_ms == 5.0  # the turns that measured it
    assert run.threads == 13
    assert isinstance(run.threads, int)
    assert math.isnan(run.first_label_s)  # no turn measured it
    stages = median_stages([{"decode": 1.0, "invoke_b4": 5.0}, {"decode": 3.0}, {"decode": 2.0}])
    assert stages == {"decode": 2.0, "invoke_b4": 5.0}


@pytest.mark.parametrize("threads", [[], ["--thread-per-camera"]])
def test_the_naive_loop_refuses_a_source_it_cannot_open_in_one_line(threads: list[str]) -> None:
    model = ROOT / "edge_daemon" / "models" / "digits.tflite"
    command = [sys.executable, "-m", "benchmarks.naive", "--model", str(model), "--prefix", "t/x"]
    proc = subprocess.run(
        [*command, "--source", "/no/such/clip.mp4", "--seconds", "2", *threads],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("cannot open --source /no/such/clip.mp4: check the path or URL")
    )


#: Imports what each measured program imports, counting the modules of the packages named
#: that it compiled from source (the "compile" audit event of each module without bytecode).
_COUNT_COMPILED = """
import sys
ours = tuple(sys.argv[1:])
compiled = []
sys.addaudithook(
    lambda event, args: compiled.append(args[1])
    if event == "compile" and str(args[1]).startswith(ours) else None
)
import benchmarks.naive, edge_daemon.cli, edge_daemon.config, edge_daemon.pipeline
print(len(compiled))
"""


def test_the_bench_compiles_both_programs_before_it_measures_them(tmp_path: Path) -> None:
    # Bytecode goes to a folder of the test's own, so what the checkout holds does not count.
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    packages = ("edge_daemon", "benchmarks")

    def compiled_on_start() -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _COUNT_COMPILED, *(f"{ROOT / p}{os.sep}" for p in packages)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(proc.stdout.split()[-1])

    assert compiled_on_start() > 20  # every start compiles them: nothing writes bytecode
    subprocess.run(
        [sys.executable, "-c", "from benchmarks.harness import compile_programs as c; c()"],
        cwd=ROOT,
        env=env,
        timeout=120,
        check=True,
    )
    assert compiled_on_start() == 0


def test_the_machine_is_named_with_its_widest_vector_instructions() -> None:
    epyc = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    flags = "flags\t\t: fpu sse2 avx avx2 {}\n"
    assert cpu(epyc + flags.format("")) == {
        "cpu": "AMD EPYC",
        "cpu_id": "family 25 model 17",
        "vector": "AVX2",
    }
    assert cpu(epyc + flags.format("avx512f avx512bw"))["vector"] == "AVX-512"
    assert cpu(epyc + flags.format("avx512f avx512_vnni"))["vector"] == "AVX-512 VNNI"
    # The second processor's lines do not count.
    assert cpu(epyc + flags.format("") + "processor\t: 1\nflags\t\t: avx512f\n")["vector"] == "AVX2"
    pi = (
        "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
        "CPU part\t: 0xd08\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    )
    assert cpu(pi) == {
        "cpu": "Raspberry Pi 4 Model B Rev 1.4",
        "cpu_id": "implementer 0x41 part 0xd08",
        "vector": "NEON",
    }
