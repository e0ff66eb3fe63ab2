"""Live progress of a run, shown by the launcher process while the ranks work.

Rank 0 appends a line to ``timing.jsonl`` per step and to ``metrics.jsonl`` per measured step;
:class:`RunTail` reads what was added since its last look and :func:`watch_run` shows, from a
thread beside the launcher: step / total, s/step, ETA, the latest global loss and cos_min and
whether the weights are in sync. On a terminal a tqdm bar is updated in place; elsewhere (a CI
log, a pipe) a plain line is printed every ``every_s`` seconds. Nothing here touches the ranks or
the launcher's exit and timeout logic: it only reads files.

A run directory may hold a previous run's files until the launcher removes them; a file that
existed, unchanged, when the watch began is ignored until it is replaced.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from testbed.record.files import METRICS_FILE

TIMING_FILE = "timing.jsonl"
RECENT_STEPS = 20  # s/step is the mean of the last this-many steps


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
            s.steps_done = max(s.steps_done, int(t.get("step", -1)) + 1)
            if isinstance(t.get("seconds"), (int, float)):
                s.recent.append(float(t["seconds"]))
        for row in self.metrics.read():
            s.global_loss = row.get("global_loss", s.global_loss)
            s.cos_min = row.get("cos_min", s.cos_min)
            if isinstance(row.get("weights_in_sync"), bool):
                s.weights_in_sync = row["weights_in_sync"]
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


class ProgressDisplay:
    """A tqdm bar redrawn in place on a terminal; a plain line every ``every_s`` seconds elsewhere."""

    def __init__(self, total: int, *, stream: TextIO | None = None, tty: bool | None = None, every_s: float = 10.0,
                 label: str = ""):
        self.stream = stream or sys.stderr
        self.total, self.every_s, self.label = max(total, 1), every_s, label
        self.tty = self.stream.isatty() if tty is None else tty
        self.last_line, self.last_steps = time.monotonic(), -1
        self.last_drawn: tuple[int, str] | None = None
        # the bar's own cursor control must reach the terminal: the CLI's stream escapes control
        # characters (cli/terminal.py) and offers ``terminal`` for exactly this; the text is ours
        self.raw = getattr(self.stream, "terminal", self.stream)
        self.bar: Any = tqdm(total=self.total, file=self.raw, desc=label or "testbed", unit="step", leave=True,
                             bar_format="{desc} {bar:20} {n_fmt}/{total_fmt}{postfix}") if self.tty else None

    def update(self, s: Snapshot) -> None:
        if self.bar is not None:
            text = describe(s, self.total)
            if (s.steps_done, text) != self.last_drawn:  # redraw on news only
                self.last_drawn = (s.steps_done, text)
                self.bar.n = min(s.steps_done, self.total)
                self.bar.set_postfix_str(text, refresh=True)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s and s.steps_done != self.last_steps:
            self.line(f"step {s.steps_done}/{self.total} | {describe(s, self.total)}")
            self.last_line, self.last_steps = now, s.steps_done

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
