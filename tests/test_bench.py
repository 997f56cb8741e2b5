"""``edge-daemon bench``: per-batch-size timings of the configured model, and their checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_daemon.bench import run_bench
from edge_daemon.engine import Engine
from edge_daemon.runtime import load_runtime
from tests.conftest import Zoo
from tests.helpers import run_daemon

pytestmark = pytest.mark.runtime


def test_bench_times_each_batch_size_and_checks_the_predictions() -> None:
    proc = run_daemon("bench", "--batch", "4,1,2", "--seconds", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "digits"
    assert report["runtime"] == load_runtime().name  # this environment's runtime
    assert report["delegate"] == "cpu"
    assert report["preprocess_ms_per_image"] > 0
    rows = report["results"]
    assert [r["batch"] for r in rows] == [1, 2, 4]
    for row in rows:
        assert row["runs"] >= 1
        assert row["same_as_batch_1"] is True
        assert row["ms_per_image"] == pytest.approx(row["ms_per_batch"] / row["batch"], rel=1e-2)
        assert row["images_per_s"] == pytest.approx(1000 / row["ms_per_image"], rel=1e-2)
        assert row["speedup"] == pytest.approx(
            rows[0]["ms_per_image"] / row["ms_per_image"], rel=1e-2
        )
    assert rows[0]["speedup"] == 1.0


def test_bench_table_and_bad_arguments() -> None:
    proc = run_daemon("bench", "--batch", "1,3", "--seconds", "0.2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model digits (digits.tflite")
    assert [line.split()[0] for line in lines[3:5]] == ["1", "3"]
    assert lines[3].split()[-2:] == ["1.00x", "yes"]
    assert "preprocessing" in lines[5]
    for args, needle in (
        (["--batch", "0,x"], "give batch sizes from 1 to 256"),
        (["--batch", ""], "give batch sizes"),
        (["--seconds", "0"], "give a time from 0 to 600 seconds"),
    ):
        bad = run_daemon("bench", *args)
        assert bad.returncode == 2, bad.stderr
        assert needle in bad.stderr.splitlines()[-1]
        assert "Traceback" not in bad.stderr
    missing = run_daemon("bench", env={"EDGE_MODEL__PATH": "/nonexistent/model.tflite"})
    assert missing.returncode == 78
    assert missing.stderr.strip().splitlines()[-1].startswith("edge-daemon: error: model file")


def test_bench_of_a_fixed_batch_model_says_so(zoo: Zoo) -> None:
    proc = run_daemon(
        "bench",
        "--batch",
        "1,4",
        "--seconds",
        "0.2",
        env={"EDGE_MODEL__PATH": str(zoo.model("edgetpu"))},
    )
    assert proc.returncode == 0, proc.stderr
    assert "fixed batch of 1: larger batches run image by image" in proc.stdout


def test_a_runtime_that_batches_wrongly_is_caught(zoo: Zoo) -> None:
    engine = Engine.from_path(zoo.model("int8"))
    real = engine.scores

    def shuffled(batch: np.ndarray) -> np.ndarray:
        scores = real(batch)
        return np.roll(scores, 1, axis=0) if len(batch) > 1 else scores  # rows mixed up

    engine.scores = shuffled  # type: ignore[method-assign]
    results = run_bench(engine, [1, 4], 0.1)
    assert [r.same_as_batch_1 for r in results] == [True, False]
