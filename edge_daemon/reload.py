"""Replacing the running model without a restart: SIGHUP, the ``reload`` command, or a new file.

A reload loads the configured model again on a thread of its own, while the old one keeps
running: the file is read and checked (in a child process, as at start), then one test
inference on a blank image proves that it runs. Only then is it handed to the inference stage,
which swaps it in between two batches; the cameras never stop. A model that fails any of this
is refused with one clear error and the old one keeps running.

The model file (and its manifest and labels file) is watched: a change is taken once the file
has stopped changing for :data:`SETTLE_S`, so a file still being copied is not loaded half
written. Writing the manifest last, as ``edge-convert`` does, gives one reload for both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_daemon.engine import Engine
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.settings import Settings
from edge_daemon.stage import StageThread

log = logging.getLogger(__name__)

#: A changed model file is loaded once it has been still this long.
SETTLE_S = 1.0
#: How often the model files are looked at.
WATCH_INTERVAL_S = 0.5

Signature = tuple[tuple[int, int, int] | None, ...]


def check_engine(engine: Engine) -> None:
    """One inference on a blank image: the new model must run before it replaces the old."""
    spec = engine.input_spec
    blank = np.zeros((spec.height, spec.width, 3), dtype=np.uint8)
    scores = engine.probabilities(engine.infer([blank]))
    if scores.shape != (1, len(engine.labels)) or not np.all(np.isfinite(scores)):
        raise EdgeDaemonError(
            f"a test inference gave {scores.shape} scores"
            + ("" if np.all(np.isfinite(scores)) else " holding NaN or infinity")
            + f" for {len(engine.labels)} labels"
        )


class Reloader:
    """Loads a new model in the background and hands it over; watches the model's files."""

    def __init__(
        self,
        settings: Settings,
        *,
        load: Callable[[], Engine],
        install: Callable[[Engine], None],
        current: Callable[[], Engine],
        report: Callable[[str | None, bool, str, Engine], None] = lambda *_: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._load = load
        self._install = install
        self._current = current
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: StageThread | None = None
        #: Another reload was asked for while one ran: run once more after it.
        self._again: tuple[str, str | None] | None = None
        self.done = 0
        self.failed = 0
        #: Seconds the last successful load took (read, check, test inference).
        self.last_load_s = 0.0
        self._paths = self._watched_paths()
        self._seen = self._signature()
        self._changed_at: float | None = None
        self._next_look = 0.0

    def _watched_paths(self) -> list[Path]:
        model = self.settings.model
        paths = [model.path, model.path.with_suffix(".json")]
        paths.append(model.labels or model.path.with_name("labels.txt"))
        return paths

    def _signature(self) -> Signature:
        out: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = path.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    # --- asking for a reload ---------------------------------------------------------------

    def request(self, why: str, command_id: str | None = None) -> bool:
        """Start loading the model again; False (and one more load after it) when a load is
        already running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._again = (why, command_id)
                return False
            self._thread = StageThread("model-reload", lambda: self._run(why, command_id))
            self._thread.start()
            return True

    def poll(self) -> None:
        """On the supervisor's thread: look at the model's files; a change that has settled
        starts a reload."""
        now = self._clock()
        if now < self._next_look:
            return
        self._next_look = now + WATCH_INTERVAL_S
        signature = self._signature()
        if signature != self._seen:
            self._seen = signature
            self._changed_at = now  # still changing, perhaps: wait for it to settle
            return
        if self._changed_at is not None and now - self._changed_at >= SETTLE_S:
            self._changed_at = None
            if signature[0] is None:
                log.warning(
                    "the model file %s is gone: still running %s",
                    self._paths[0],
                    self._current().name,
                )
                return
            self.request(f"{self._paths[0].name} changed")

    @property
    def busy(self) -> bool:
        """True while a model is being loaded."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # --- the loading thread ----------------------------------------------------------------

    def _run(self, why: str, command_id: str | None) -> None:
        while True:
            self._load_once(why, command_id)
            with self._lock:
                if self._again is None:
                    return
                why, command_id = self._again
                self._again = None

    def _load_once(self, why: str, command_id: str | None) -> None:
        old = self._current()
        log.info("reloading the model (%s)", why)
        started = self._clock()
        try:
            engine = self._load()
            check_engine(engine)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old model
            self.failed += 1
            text = (
                f"new model refused: {exc}; still running {old.name} ({old.digest})"
                if isinstance(exc, EdgeDaemonError)
                else f"new model refused ({type(exc).__name__}: {exc}); still running "
                f"{old.name} ({old.digest})"
            )
            log.error("%s", text)  # noqa: TRY400 - one line, no traceback: the old model runs
            self._report(command_id, False, text, old)
            return
        self.last_load_s = self._clock() - started
        if (engine.digest, engine.labels) == (old.digest, old.labels) and (
            engine.input_spec == old.input_spec
        ):
            text = f"model {old.name} ({old.digest}) is unchanged: kept running"
            log.info("%s", text)
            self._report(command_id, True, text, old)
            return
        self._install(engine)
        self.done += 1
        text = (
            f"model {old.name} ({old.digest}) replaced by {engine.name} ({engine.digest}), "
            f"loaded and checked in {self.last_load_s * 1000:.0f} ms"
        )
        log.info("%s", text)
        self._report(command_id, True, text, engine)
