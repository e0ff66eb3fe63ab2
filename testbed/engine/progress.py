"""Live progress of a run, shown by the launcher process while the ranks work.

Rank 0 appends a line to ``timing.jsonl`` per step and to ``metrics.jsonl`` per measured step;
:class:`RunTail` reads what was added since its last look and :func:`watch_run` shows, from a
thread beside the launcher: step / total, s/step, ETA, the latest global loss and cos_min and
whether the weights are in sync. On a terminal a tqdm bar is updated in place; elsewhere (a CI
log, a pipe) a plain line is printed every ``every_s`` seconds. Nothing here touches the ranks or
the launcher's exit and timeout logic: it only reads files.

The bar's size is ours, not tqdm's: a pseudo-terminal whose window size was never set (``script``
without a terminal, ``docker run -t``, CI runners and editors that allocate a pty, Python's
``pty.openpty()``) reports 0 columns and 0 rows; tqdm takes them as ``0 - 1``, finds its bar
"below the last row" and draws nothing at all between the first line and the verdict. An unknown
width is taken as ``$COLUMNS`` or 100 and an unknown height as 20, and a narrow terminal gets the
short form of the line (no bar graphic) instead of a cut one.

A run directory may hold a previous run's files until the launcher removes them; a file that
existed, unchanged, when the watch began is ignored until it is replaced.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from testbed.record.files import METRICS_FILE, TIMING_FILE
from testbed.schema import row as R

RECENT_STEPS = 20  # s/step is the mean of the last this-many steps
UNKNOWN_WIDTH = 100  # columns assumed for a terminal that reports none (and no $COLUMNS)
UNKNOWN_ROWS = 20  # rows assumed for a terminal that reports none
BAR_FORMAT = "{desc} {bar:20} {n_fmt}/{total_fmt}{postfix}"
SHORT_FORMAT = "{desc} {n_fmt}/{total_fmt}{postfix}"


class _Tail:
    """New complete JSON lines of one append-only file."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""
        self.stale = self._identity()

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> list[dict[str, Any]]:
        ident = self._identity()
        if ident is None or ident == self.stale:
            self.stale = None if ident is None else self.stale  # gone: whatever appears next is this run's
            self.offset, self.partial = 0, b""
            return []
        self.stale = None
        if ident[2] < self.offset:  # replaced by a shorter file
            self.offset, self.partial = 0, b""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@dataclass
class Snapshot:
    """What the run has done so far, as far as rank 0's files say."""

    steps_done: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    global_loss: float | None = None
    cos_min: float | None = None
    weights_in_sync: bool | None = None

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


class RunTail:
    """Reads a run directory's ``timing.jsonl`` and ``metrics.jsonl`` as they grow."""

    def __init__(self, run_dir: Path):
        self.timing, self.metrics = _Tail(Path(run_dir) / TIMING_FILE), _Tail(Path(run_dir) / METRICS_FILE)
        self.snapshot = Snapshot()

    def poll(self) -> Snapshot:
        s = self.snapshot
        for t in self.timing.read():
            s.steps_done = max(s.steps_done, int(t.get(R.STEP, -1)) + 1)
            if isinstance(t.get("seconds"), (int, float)):
                s.recent.append(float(t["seconds"]))
        for row in self.metrics.read():
            s.global_loss = row.get(R.GLOBAL_LOSS, s.global_loss)
            s.cos_min = row.get(R.COS_MIN, s.cos_min)
            if isinstance(row.get(R.WEIGHTS_IN_SYNC), bool):
                s.weights_in_sync = row[R.WEIGHTS_IN_SYNC]
        return s


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def describe(s: Snapshot, total: int) -> str:
    """``s/step, ETA, loss, cos_min, weights`` - the text after the step count."""
    sps = s.seconds_per_step
    eta = f"ETA {sps * max(total - s.steps_done, 0):.0f} s" if sps is not None else "ETA -"
    sync = {None: "weights -", True: "weights in sync", False: "weights DIVERGED"}[s.weights_in_sync]
    return (f"{_num(sps, '.3f')} s/step, {eta} | global_loss {_num(s.global_loss)} cos_min {_num(s.cos_min)} "
            f"| {sync}")


def describe_short(s: Snapshot, total: int) -> str:
    """The same facts in fewer columns, for a narrow terminal."""
    sps = s.seconds_per_step
    eta = f"ETA {sps * max(total - s.steps_done, 0):.0f}s" if sps is not None else "ETA -"
    sync = {None: "", True: " sync", False: " DIVERGED"}[s.weights_in_sync]
    return f"{eta} loss {_num(s.global_loss, '.3g')} cos_min {_num(s.cos_min, '.3g')}{sync}"


def terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, rows) of the stream's terminal; for a size it reports as 0 (a pty whose window
    size was never set) or cannot be asked: ``$COLUMNS`` or UNKNOWN_WIDTH columns, UNKNOWN_ROWS rows."""
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        columns, rows = 0, 0
    if columns <= 0:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or UNKNOWN_WIDTH
        except ValueError:
            columns = UNKNOWN_WIDTH
    return columns, rows if rows > 0 else UNKNOWN_ROWS


class ProgressDisplay:
    """A tqdm bar redrawn in place on a terminal; a plain line every ``every_s`` seconds elsewhere."""

    def __init__(self, total: int, *, stream: TextIO | None = None, tty: bool | None = None, every_s: float = 10.0,
                 label: str = ""):
        self.stream = stream or sys.stderr
        self.total, self.every_s, self.label = max(total, 1), every_s, label
        self.tty = self.stream.isatty() if tty is None else tty
        self.last_line, self.last_steps = time.monotonic(), -1
        self.last_drawn: tuple[int, str, int] | None = None
        # the bar's own cursor control must reach the terminal: the CLI's stream escapes control
        # characters (cli/terminal.py) and offers ``terminal`` for exactly this; the text is ours
        self.raw = getattr(self.stream, "terminal", self.stream)
        self.bar: Any = tqdm(total=self.total, file=self.raw, desc=label or "testbed", unit="step", leave=True,
                             bar_format=BAR_FORMAT, ncols=terminal_size(self.raw)[0],
                             nrows=terminal_size(self.raw)[1]) if self.tty else None

    def update(self, s: Snapshot) -> None:
        if self.bar is not None:
            width, height = terminal_size(self.stream)  # asked every time: the terminal may be resized
            text, form = self._fit(s, width)
            if (s.steps_done, text, width) != self.last_drawn:  # redraw on news only
                self.last_drawn = (s.steps_done, text, width)
                self.bar.ncols, self.bar.nrows, self.bar.bar_format = width, height, form
                self.bar.n = min(s.steps_done, self.total)
                self.bar.set_postfix_str(text, refresh=True)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s and s.steps_done != self.last_steps:
            self.line(f"step {s.steps_done}/{self.total} | {describe(s, self.total)}")
            self.last_line, self.last_steps = now, s.steps_done

    def _fit(self, s: Snapshot, width: int) -> tuple[str, str]:
        """The longest form of the line that fits: bar + full text, bar + short text, short text."""
        counts = len(self.bar.desc or "") + len(f" {self.total}/{self.total}, ")
        full, short = describe(s, self.total), describe_short(s, self.total)
        for text, form, bar in ((full, BAR_FORMAT, 21), (short, BAR_FORMAT, 21), (short, SHORT_FORMAT, 0)):
            if counts + bar + len(text) < width:
                return text, form
        return short, SHORT_FORMAT  # tqdm trims the tail

    def line(self, text: str) -> None:
        """A line that stays (printed above the bar on a terminal)."""
        text = f"{self.label}: {text}" if self.label else f"testbed: {text}"
        if self.bar is not None:
            self.bar.write(text, file=self.raw)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def watch_run(run_dir: Path, total_steps: int, *, stream: TextIO | None = None, tty: bool | None = None,
              every_s: float = 10.0, label: str = "", poll_s: float = 0.25,
              enabled: bool = True) -> Iterator[ProgressDisplay | None]:
    """Show the run's progress while the body (the launcher) runs; the watcher stops when it returns."""
    if not enabled:
        yield None
        return
    tail = RunTail(run_dir)  # notes the files already there now, before the launcher removes them
    display = ProgressDisplay(total_steps, stream=stream, tty=tty, every_s=every_s, label=label)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(poll_s):
            display.update(tail.poll())

    thread = threading.Thread(target=loop, name="testbed-progress", daemon=True)
    thread.start()
    try:
        yield display
    finally:
        stop.set()
        thread.join()
        if display.bar is not None:
            display.update(tail.poll())
        display.close()
