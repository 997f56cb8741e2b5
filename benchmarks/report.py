"""The ratio table and the chart of a harness run (``benchmarks/results/*.json``).

.venv/bin/python -m benchmarks.report benchmarks/results/latest.json
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

#: Issue 10's targets.
ONE_CAMERA, FOUR_CAMERAS, OF_SLOWEST = 1.0, 1.3, 0.85
LIVE_P99_MARGIN_MS, GROWTH, FIRST_LABEL, RSS_MB = 5.0, 0.20, 1.5, 150.0
#: The workloads measured in labels a second against the naive loop.
THROUGHPUT = ("1 inference-bound", "2 balanced", "3 many regions")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def ceiling(stages: dict[str, float], cores: int) -> float:
    """Labels per second no program could beat here: every stage's CPU per label (all its
    threads', measured alone) spread perfectly over the cores. NaN for a run without it."""
    invokes = {k: v for k, v in stages.items() if k.startswith("invoke")}
    fastest = max(invokes, key=lambda k: invokes[k])
    keys = ("cpu_decode", "cpu_preprocess", f"cpu_{fastest}", "cpu_publish")
    if not all(k in stages for k in keys):
        return math.nan
    return cores / sum(stages[k] for k in keys)


def slowest(stages: dict[str, float]) -> tuple[str, float]:
    """The stage that bounds a pipeline: the slowest of decode, preprocess, the faster way to
    invoke, publish."""
    invoke = max(v for k, v in stages.items() if k.startswith("invoke"))
    bounds = {
        "decode": stages["decode"],
        "preprocess": stages["preprocess"],
        "invoke": invoke,
        "publish": stages["publish"],
    }
    name = min(bounds, key=lambda k: bounds[k])
    return name, bounds[name]


def _cores_table(report: dict[str, Any]) -> list[str]:
    """Where the cores went in each throughput run: the program, the broker, the subscriber."""
    rows = [
        "Where the cores went (CPU over the window; 100% is one core):",
        "",
        "| workload | naive | its broker + subscriber | daemon | its broker + subscriber |",
        "| --- | --- | --- | --- | --- |",
    ]
    for group in THROUGHPUT:
        for e in report["workloads"].get(group, []):
            cells = []
            for who in ("naive", "daemon"):
                run = e[who]
                broker = run.get("broker_cpu_percent", math.nan)
                sub = run.get("subscriber_cpu_percent", math.nan)
                cells += [f"{run['cpu_percent']:.0f}%", f"{broker:.0f}% + {sub:.0f}%"]
            rows.append(f"| {group[0]}: {e['name']} | {' | '.join(cells)} |")
    return [*rows, ""]


def _decode_table(report: dict[str, Any]) -> list[str]:
    """Decode alone as FFmpeg threads it by default and as the daemon does, where decoding
    is the slowest stage."""
    rows = []
    for group in THROUGHPUT:
        for e in report["workloads"].get(group, []):
            st = e["stages"]
            if "decode_daemon" not in st or slowest(st)[0] != "decode":
                continue
            daemon = e["daemon"]["labels_per_s"]
            rows.append(
                f"| {group[0]}: {e['name']} | {st['decode']:.0f}/s | {st['decode_daemon']:.0f}/s "
                f"on {st['decode_threads']:.0f} | {daemon:.0f}/s | "
                f"**{daemon / st['decode_daemon']:.2f}** |"
            )
    if not rows:
        return []
    return [
        "Where decoding bounds the pipeline, decode alone both ways: on FFmpeg's default "
        "threads (one per core, the yardstick above) and on the threads the daemon gives each "
        "camera (the cores but one, shared among the cameras FFmpeg decodes; it made more "
        "labels a second than FFmpeg's default, measured side by side):",
        "",
        "| workload | decode, FFmpeg's threads | decode, the daemon's threads | daemon | "
        "daemon / decode as it decodes |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def _bounded_verdict(ratio: float, target: float, ceiling_ratio: float) -> str:
    """Met; out of reach when not even the CPU ceiling (the daemon's stages spread perfectly
    over the cores) gives ``target``, as the same ratio; or missed."""
    if ratio >= target:
        return "met"
    if ceiling_ratio < target:
        return f"out of reach (ceiling {ceiling_ratio:.2f})"
    return "MISSED"


def table(report: dict[str, Any]) -> str:
    rows: list[str] = []
    add = rows.append
    add(
        "| workload | slowest stage alone | naive | daemon | daemon / naive | target | "
        "daemon / slowest | target | CPU ceiling | daemon / ceiling |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cores = int(report["machine"]["cores"] or 1)
    for group in THROUGHPUT:
        for e in report["workloads"].get(group, []):
            stage, bound = slowest(e["stages"])
            naive, daemon = e["naive"]["labels_per_s"], e["daemon"]["labels_per_s"]
            ratio = daemon / naive if naive else math.nan
            target = ONE_CAMERA if e["cameras"] == 1 else FOUR_CAMERAS
            of_slowest = daemon / bound
            top = ceiling(e["stages"], cores)
            slow_verdict = _bounded_verdict(of_slowest, OF_SLOWEST, top / bound)
            add(
                f"| {group[0]}: {e['name']} | {stage} {bound:.0f}/s | {naive:.0f}/s | "
                f"{daemon:.0f}/s | **{ratio:.2f}** | >= {target} "
                f"{_bounded_verdict(ratio, target, top / naive if naive else math.nan)} | "
                f"**{of_slowest:.2f}** | >= {OF_SLOWEST} {slow_verdict} | {top:.0f}/s | "
                f"**{daemon / top:.2f}** |"
            )
    lines = [
        "## Throughput (labels per second at the subscriber)",
        "",
        *rows,
        "",
        *_decode_table(report),
        *_cores_table(report),
        f"The CPU ceiling is what {cores} cores allow if every stage ran in parallel with no "
        "cost of its own: the cores divided by the CPU seconds per label of decode, "
        "preprocess, the faster invoke and publish, each measured alone (all of its threads: "
        "FFmpeg's decoders, paho's network thread). The broker and the subscriber, on the "
        "same cores, are not counted, so no program reaches it.",
        "",
    ]
    if report["workloads"].get("2 balanced"):
        lines += [
            "Workload 2's model declares in its manifest how its training images were shrunk "
            "(input.resize), and both programs shrink the 720x720 crop to 128x128 that way: "
            "bilinear (OpenCV's default; 4 of every 31 pixels reach the input) in the rows "
            "without 'area', area averaging (every pixel counts; the converter's default) in "
            "the 'area' rows.",
            "",
        ]
    for e in report["workloads"].get("4 live", []):
        lines += _live_table(e)
    scaling = report["workloads"].get("5 scaling", [])
    if scaling:
        lines += [
            "## Scaling: CPU per camera at 15 fps",
            "",
            "| cameras | naive CPU / camera | daemon CPU / camera | daemon / naive |",
            "| --- | --- | --- | --- |",
        ]
        for e in scaling:
            n = e["naive"]["cpu_percent"] / e["cameras"]
            d = e["daemon"]["cpu_percent"] / e["cameras"]
            lines.append(f"| {e['cameras']} | {n:.1f}% | {d:.1f}% | {d / n:.2f} |")
        lines.append("")
    every, reuse = report["still"]["every crop"], report["still"]["reuse unchanged"]
    lines += [
        "## Still scene, 4 cameras at 30 fps: unchanged crops reuse their prediction",
        "",
        "| | every crop classified | unchanged reused (default) |",
        "| --- | --- | --- |",
        f"| labels/s | {every['labels_per_s']:.0f} | {reuse['labels_per_s']:.0f} |",
        f"| share reused | {every['reused_share']:.0%} | {reuse['reused_share']:.0%} |",
        f"| CPU | {every['cpu_percent']:.0f}% | {reuse['cpu_percent']:.0f}% |",
        "",
    ]
    cost = report["per_label_us"]
    ratio = cost["daemon"] / cost["paho"]
    firsts = []
    peaks = []
    for group, entries in report["workloads"].items():
        for e in entries:
            firsts.append((e["name"], e["naive"]["first_label_s"], e["daemon"]["first_label_s"]))
            if e["model"] == "digits" and e["cameras"] == 4:
                peaks.append((e["name"], e["daemon"]["peak_rss_mb"]))
        del group
    worst_first = max(d / n for _, n, d in firsts)
    startup = report.get("startup_s")
    worst_peak = max(p for _, p in peaks) if peaks else math.nan
    lines += [
        "## Costs",
        "",
        "| measure | naive | daemon | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| caller's time per label (JSON + publish) | {cost['paho']:.0f} µs | "
        f"{cost['daemon']:.0f} µs | {ratio:.2f} | within 15% of JSON + paho: "
        f"{verdict(ratio <= 1.15)} |",
        f"| first label after start, worst workload | | | {worst_first:.2f} | <= {FIRST_LABEL}: "
        f"{_first_label_verdict(firsts, startup)} |",
        f"| peak RSS, 4 cameras on the digits model | | {worst_peak:.0f} MB | | <= {RSS_MB:g} MB: "
        f"{verdict(worst_peak <= RSS_MB)} |",
        "",
        "First label (s) per workload, naive / daemon: "
        + "; ".join(f"{name} {n:.2f} / {d:.2f}" for name, n, d in firsts),
    ]
    if startup:
        settings = _settings_import(startup)
        lines += [
            "",
            "Start-up in a fresh interpreter (median): Python alone "
            f"{startup['python'] * 1e3:.0f} ms; with the naive loop's imports "
            f"{startup['naive_imports'] * 1e3:.0f} ms; with pydantic-settings, the daemon's "
            f"settings library, {startup['settings_library'] * 1e3:.0f} ms"
            + (
                f"; with both {startup['naive_and_settings'] * 1e3:.0f} ms"
                if "naive_and_settings" in startup
                else ""
            )
            + f". That import alone adds {settings * 1e3:.0f} ms to the daemon's start"
            + (" beyond the naive loop's imports" if "naive_and_settings" in startup else "")
            + ": at best "
            + "; ".join(f"{name} {_floor(n, settings):.2f}" for name, n, _ in firsts)
            + " times the naive loop's first label.",
        ]
    return "\n".join(lines)


def _settings_import(startup: dict[str, float]) -> float:
    """Seconds pydantic-settings' import adds to the start of a program that imports what the
    naive loop does (the standard library modules both need count once); in a report from
    before that was measured, what it adds to a bare interpreter's (more)."""
    if "naive_and_settings" in startup:
        return max(startup["naive_and_settings"] - startup["naive_imports"], 0.0)
    return max(startup["settings_library"] - startup["python"], 0.0)


def _floor(naive_first: float, settings: float) -> float:
    """The least first-label ratio for a daemon whose only extra start-up work, against a naive
    loop that took ``naive_first`` seconds, was ``settings`` seconds of importing its settings
    library."""
    return (naive_first + settings) / naive_first


def _first_label_verdict(
    firsts: list[tuple[str, float, float]], startup: dict[str, float] | None
) -> str:
    """Met; or out of reach where even a daemon whose only extra work was importing its
    settings library would start more than :data:`FIRST_LABEL` times later than the naive
    loop; or missed."""
    late = [(name, n) for name, n, d in firsts if d / n > FIRST_LABEL]
    if not late:
        return "met"
    if startup is None:
        return "MISSED"
    settings = _settings_import(startup)
    floors = [_floor(n, settings) for _, n in late]
    if min(floors) > FIRST_LABEL:
        return (
            f"out of reach (importing pydantic-settings alone takes {settings * 1e3:.0f} ms: "
            f"at best {min(floors):.2f})"
        )
    return "MISSED"


def _growth(run: dict[str, Any]) -> float:
    first = run["first_p50_ms"]
    return float(run["last_p50_ms"] / first - 1) if first else math.nan


def _live_table(e: dict[str, Any]) -> list[str]:
    """Live cameras: the naive loop, the daemon classifying every crop (the targets are
    checked on it), and the daemon as installed."""
    n, d = e["naive"], e["daemon"]
    dd = e.get("daemon_defaults", d)
    nt = e.get("naive_threads")
    runs = (n, d, dd) if nt is None else (n, d, dd, nt)

    def row(name: str, key: str, fmt: str, target: str = "") -> str:
        cells = " | ".join(fmt.format(run[key]) for run in runs)
        return f"| {name} | {cells} | {target} |"

    cpu_ok = d["cpu_percent"] <= n["cpu_percent"]
    cpu_target = f"<= naive: {verdict(cpu_ok)}"
    if not cpu_ok and nt is not None and nt["cpu_percent"]:
        # What a thread per camera costs the naive loop itself on this machine.
        ratio = d["cpu_percent"] / nt["cpu_percent"]
        cpu_target += f"; {ratio:.2f} times the naive loop on a thread per camera"

    p99_ok = d["p99_ms"] <= n["p99_ms"] + LIVE_P99_MARGIN_MS
    growth = _growth(d)
    return [
        f"## Live: {e['name']}",
        "",
        "| | naive | daemon, every crop | daemon as installed"
        + (" | naive, a thread per camera" if nt is not None else "")
        + " | target (every crop) |",
        "| --- " * (len(runs) + 2) + "|",
        row("labels/s", "labels_per_s", "{:.0f}"),
        row("capture to subscriber p50", "p50_ms", "{:.2f} ms"),
        row(
            "capture to subscriber p99",
            "p99_ms",
            "{:.2f} ms",
            f"<= naive + {LIVE_P99_MARGIN_MS:g} ms: {verdict(p99_ok)}",
        ),
        row("CPU", "cpu_percent", "{:.0f}%", cpu_target),
        row("p50, first sixth", "first_p50_ms", "{:.2f} ms"),
        row(
            "p50, last sixth",
            "last_p50_ms",
            "{:.2f} ms",
            f"within 20% ({growth:+.0%}): {verdict(abs(growth) <= GROWTH)}",
        ),
        row("share reused", "reused_share", "{:.0%}"),
        row("peak RSS", "peak_rss_mb", "{:.0f} MB"),
        row("threads", "threads", "{}"),
        "",
    ]


def chart(report: dict[str, Any], path: Path) -> None:
    """Four panels: throughput ratios, live latency, CPU per camera, first label."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _throughput(axes[0][0], report)
    _live(axes[0][1], report)
    _scaling(axes[1][0], report)
    _first_label(axes[1][1], report)
    m = report["machine"]
    fig.suptitle(
        f"edge-daemon benchmarks {report['when']}{' (tiny run)' if report['tiny'] else ''}: "
        f"{m['cpu']}{f' ({v})' if (v := m.get('vector')) else ''}, {m['cores']} cores, "
        f"{m['runtime']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _throughput(ax: Any, report: dict[str, Any]) -> None:
    names, ratios, targets = [], [], []
    for group in THROUGHPUT:
        for e in report["workloads"].get(group, []):
            names.append(e["name"])
            ratios.append(e["daemon"]["labels_per_s"] / max(e["naive"]["labels_per_s"], 1e-9))
            targets.append(ONE_CAMERA if e["cameras"] == 1 else FOUR_CAMERAS)
    bars = ax.bar(range(len(names)), ratios, color="#3b7dd8")
    ax.scatter(range(len(names)), targets, marker="_", s=900, color="#d83b3b", label="target")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("daemon / naive loop (labels per second)")
    ax.set_title("Throughput against the naive loop")
    ax.legend()


def _live(ax: Any, report: dict[str, Any]) -> None:
    live = report["workloads"].get("4 live", [])
    if live:
        e = live[0]
        labels = ["p50", "p99"]
        x = range(len(labels))
        ax.bar(
            [i - 0.2 for i in x],
            [e["naive"]["p50_ms"], e["naive"]["p99_ms"]],
            0.4,
            label="naive",
            color="#999999",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [e["daemon"]["p50_ms"], e["daemon"]["p99_ms"]],
            0.4,
            label="daemon",
            color="#3b7dd8",
        )
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("capture to subscriber (ms)")
        ax.set_title(f"Live: {e['name']}")
        ax.legend()


def _scaling(ax: Any, report: dict[str, Any]) -> None:
    scaling = report["workloads"].get("5 scaling", [])
    if scaling:
        cams = [e["cameras"] for e in scaling]
        ax.plot(
            cams,
            [e["naive"]["cpu_percent"] / e["cameras"] for e in scaling],
            "o-",
            color="#999999",
            label="naive",
        )
        ax.plot(
            cams,
            [e["daemon"]["cpu_percent"] / e["cameras"] for e in scaling],
            "o-",
            color="#3b7dd8",
            label="daemon",
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(cams, [str(c) for c in cams])
        ax.set_xlabel("cameras at 15 fps")
        ax.set_ylabel("CPU per camera (%)")
        ax.set_title("Scaling")
        ax.legend()


def _first_label(ax: Any, report: dict[str, Any]) -> None:
    firsts = [
        (e["name"], e["naive"]["first_label_s"], e["daemon"]["first_label_s"])
        for entries in report["workloads"].values()
        for e in entries
    ]
    y = range(len(firsts))
    ax.barh([i + 0.2 for i in y], [f[1] for f in firsts], 0.4, label="naive", color="#999999")
    ax.barh([i - 0.2 for i in y], [f[2] for f in firsts], 0.4, label="daemon", color="#3b7dd8")
    ax.set_yticks(list(y), [f[0] for f in firsts], fontsize=8)
    ax.set_xlabel("first label after start (s)")
    ax.set_title("Start-up")
    ax.legend()


def main() -> None:
    import json  # noqa: PLC0415

    report = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    print(table(report))


if __name__ == "__main__":
    main()
