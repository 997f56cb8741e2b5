"""``edge-daemon``: run the daemon, check a configuration, write the settings example.

Exit codes: 0 clean stop; 78 (EX_CONFIG) bad settings or an unusable model, which systemd must
not restart in a loop (``RestartPreventExitStatus=78``); 1 unexpected failure or a stage that
died (systemd restarts the daemon); 2 bad command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_daemon import __version__
from edge_daemon.errors import ConfigError, EdgeDaemonError, UsageError
from edge_daemon.signals import stop_on_signals

log = logging.getLogger("edge_daemon")


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or sizes[-1] > 256:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give batch sizes from 1 to 256 separated by commas, e.g. 1,4,8"
        )
    return sizes


def _within(
    low: float, high: float, hint: str, kind: Callable[[str], float] = float
) -> Callable[[str], float]:
    """An argument type: a number (``kind`` of the text) above ``low`` and at most ``high``
    (NaN never is)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = low
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
        return value

    return parse


_seconds = _within(0, 600, "give a time from 0 to 600 seconds")
_interval = _within(0, 86_400, "give seconds from 0 to 86400")
_share = _within(0, 1, "give a share from 0 to 1, e.g. 0.08")
_count = _within(0, 10_000_000, "give a whole number from 1 to 10000000", kind=int)
#: ``--duration``: leaving it out runs until stopped.
_duration = _within(
    0, 31_536_000, "give seconds above 0 and at most 31536000 (a year), or leave it out"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-daemon",
        description="Cameras to batched TFLite inference to MQTT. Configured by EDGE_* "
        "environment variables (see config/edge-daemon.env.example).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="log at debug level and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon until stopped")
    run.add_argument("--env-file", type=Path, help="a file of EDGE_...=value lines")
    run.add_argument("--duration", type=_duration, help="stop by itself after this many seconds")
    check = sub.add_parser("check", help="validate settings, model, sources and broker")
    check.add_argument("--env-file", type=Path, help="a file of EDGE_...=value lines")
    check.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds to wait for each source and the broker (default: 5)",
    )
    bench = sub.add_parser(
        "bench",
        help="time the configured model at each batch size (EDGE_MODEL__* settings)",
    )
    bench.add_argument("--env-file", type=Path, help="a file of EDGE_...=value lines")
    bench.add_argument(
        "--batch",
        type=_batch_sizes,
        default=[1, 2, 4, 8],
        help="batch sizes to time, comma-separated (default: 1,2,4,8)",
    )
    bench.add_argument(
        "--seconds", type=_seconds, default=2.0, help="time per batch size (default: 2)"
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    collect = sub.add_parser(
        "collect",
        help="save each camera region's crops under DIR/<camera>_<roi>/ for labelling",
    )
    collect.add_argument("dir", type=Path, help="where to save the crops")
    collect.add_argument("--env-file", type=Path, help="a file of EDGE_...=value lines")
    collect.add_argument(
        "--duration", type=_duration, help="stop by itself after this many seconds"
    )
    collect.add_argument(
        "--every", type=_interval, default=10.0, help="seconds between crops of a region (10)"
    )
    collect.add_argument(
        "--change",
        type=_share,
        default=0.08,
        help="save sooner when a crop changed this much, 0-1 (0.08)",
    )
    collect.add_argument(
        "--max-files", type=_count, default=10_000, help="stop after this many files (10000)"
    )
    collect.add_argument(
        "--max-mb", type=_count, default=1024, help="stop after this many MiB written (1024)"
    )
    collect.add_argument(
        "--min-free-mb",
        type=_count,
        default=500,
        help="stop before the disk has less than this many MiB free (500)",
    )
    example = sub.add_parser("env-example", help="print the documented settings example")
    example.add_argument("--output", type=Path, help="write it here instead of stdout")
    demo = sub.add_parser(
        "demo",
        help="the sample clip through the daemon to a subscriber "
        "that prints labels and their accuracy (make run)",
    )
    demo.add_argument("--duration", type=_duration, help="stop by itself after this many seconds")
    return parser


def _setup_logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if not debug:
        logging.getLogger("paho").setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    from edge_daemon.runtime import dismiss_checker, start_checker  # noqa: PLC0415

    # First of all: a stop asked for while the model loads must be a clean stop too.
    stop = threading.Event()
    # SIGHUP before the daemon runs is kept, and taken once it does.
    reload = threading.Event()
    stop_watching_signals = stop_on_signals(stop, reload)
    # The model's check starts its interpreter now, beside the imports of the settings.
    start_checker()
    try:
        return _run_until_stopped(args, stop, reload)
    finally:
        dismiss_checker()
        stop_watching_signals()


def _run_until_stopped(
    args: argparse.Namespace, stop: threading.Event, reload: threading.Event
) -> int:
    from edge_daemon.config import load_settings  # noqa: PLC0415 - a fast --help
    from edge_daemon.runtime import dismiss_checker, probe_in_background  # noqa: PLC0415

    settings = load_settings(args.env_file)
    _setup_logging(settings.log_level, args.debug)
    if settings.model.delegate == "cpu":
        # The model's check in a child process overlaps the imports below.
        probe_in_background(settings.model.path, settings.model.runtime)
    else:
        dismiss_checker()  # a delegate's model is not checked in a child

    from edge_daemon.engine import model_summary  # noqa: PLC0415
    from edge_daemon.pipeline import Daemon  # noqa: PLC0415
    from edge_daemon.sources import quiet_opencv  # noqa: PLC0415

    quiet_opencv(args.debug)
    daemon = Daemon(settings)
    log.info("model %s", model_summary(daemon.engine))
    if daemon.using_sample:
        log.warning(
            "no camera configured: playing the bundled sample clip as camera 'sample'. "
            "Set EDGE_CAMERAS__<name>__SOURCE (a device, file, rtsp:// or http:// URL) "
            "to use your own"
        )
    try:
        daemon.start()
        daemon.run(duration=args.duration, stop=stop, reload=reload)
    finally:
        daemon.stop()
    for name in daemon.stuck_threads():
        log.debug("%s is still inside OpenCV or the runtime; not waiting for it", name)
    if daemon.fatal is not None:
        print(f"edge-daemon: error: {daemon.fatal}", file=sys.stderr)
        return daemon.fatal.exit_code
    log.info("stopped")
    return 0


def _check(args: argparse.Namespace) -> int:
    from edge_daemon.checks import run_checks  # noqa: PLC0415
    from edge_daemon.sources import quiet_opencv  # noqa: PLC0415

    quiet_opencv(args.debug)
    return run_checks(args.env_file, args.timeout)


def _bench(args: argparse.Namespace) -> int:
    from edge_daemon.bench import bench  # noqa: PLC0415
    from edge_daemon.config import load_settings  # noqa: PLC0415

    settings = load_settings(args.env_file)
    _setup_logging(settings.log_level, args.debug)
    return bench(settings, args.batch, args.seconds, args.json)


def _env_example(args: argparse.Namespace) -> int:
    from edge_daemon.envdoc import generate  # noqa: PLC0415
    from edge_daemon.manifest import write_atomic  # noqa: PLC0415

    text = generate()
    if args.output:
        output: Path = args.output
        # Writing is a rename over the target: never over a device, a pipe or a folder.
        if output.exists() and not output.is_file():
            raise UsageError(f"--output {output} exists and is not a regular file")
        if not output.parent.is_dir():
            raise UsageError(f"--output {output}: folder {output.parent} does not exist")
        write_atomic(output, text.encode("utf-8"))
    else:
        print(text, end="")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from edge_daemon.collect import CollectLimits, Collector, run_collect  # noqa: PLC0415
    from edge_daemon.config import load_settings  # noqa: PLC0415
    from edge_daemon.settings import sample_camera  # noqa: PLC0415
    from edge_daemon.sources import quiet_opencv, require_backends  # noqa: PLC0415

    root: Path = args.dir
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder: give a folder for the crops")
    settings = load_settings(args.env_file)
    _setup_logging(settings.log_level, args.debug)
    quiet_opencv(args.debug)
    cameras = settings.cameras or sample_camera()
    require_backends(cameras)
    limits = CollectLimits(
        every_s=args.every,
        change=args.change,
        max_files=args.max_files,
        max_bytes=args.max_mb << 20,
        min_free_bytes=args.min_free_mb << 20,
    )
    stop = threading.Event()
    undo = stop_on_signals(stop)
    try:
        run_collect(cameras, Collector(root, limits), duration=args.duration, stop=stop)
    finally:
        undo()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from edge_daemon.demo import run_demo  # noqa: PLC0415

    return run_demo(args.duration, debug=args.debug)


_COMMANDS = {
    "run": _run,
    "check": _check,
    "bench": _bench,
    "env-example": _env_example,
    "collect": _collect,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edge-daemon``; returns the exit code."""
    args = _parser().parse_args(argv)
    _setup_logging("info", args.debug)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge-daemon: error: {problem}", file=sys.stderr)
        if args.debug:
            log.exception("configuration error")
        return exc.exit_code
    except EdgeDaemonError as exc:
        print(f"edge-daemon: error: {exc}", file=sys.stderr)
        if args.debug:
            log.exception("failed")
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        if args.debug:
            log.exception("unexpected failure")
        print(
            f"edge-daemon: unexpected error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _threads_left() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]


def entry() -> None:
    """The console script: :func:`main`, then exit.

    A camera thread can still be inside OpenCV (an open or read that has not timed out yet)
    when the daemon has stopped. Letting the interpreter finalise around it aborts the process
    (``terminate called without an active exception``, exit 134, or a segfault) after a clean
    stop. So once everything that matters is flushed and closed, a process with such threads
    left ends with ``os._exit``, which runs no finalisers over them.
    """
    code = main()
    if _threads_left():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
