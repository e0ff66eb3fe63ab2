"""Where a step's row and events go: a list of sinks sharing one small interface.

The step path (``engine/step_path.py``) hands every row to ``write_row`` and every event - an
alarm, or a non-finite value on a rank - to ``write_event`` of each sink in its list, in order.
Built in: ``JsonlSink`` (the run record's ``metrics.jsonl`` / ``events.jsonl``), ``LoggerSink``
(alarms as warnings of the ``testbed`` logger) and ``ListenerSink`` (the monitor's ``on_row`` /
``on_alarm`` callables). Framework sinks live with their framework: TensorBoard
(``integrations/tensorboard.py``), the HF Trainer's and Lightning's logs (their callbacks). A new
output is one class with these three methods; a sink that only wants alarms checks
``event[EVENT] == ALARM``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol

from testbed.record.files import EVENTS_FILE, METRICS_FILE, JsonlWriter
from testbed.schema import event as E
from testbed.schema.event import Event
from testbed.schema.row import Row

LOG = logging.getLogger("testbed")


class Sink(Protocol):
    def write_row(self, row: Row) -> None: ...

    def write_event(self, event: Event) -> None: ...

    def close(self) -> None: ...


def is_alarm(event: Event) -> bool:
    return event.get(E.EVENT) == E.ALARM


class JsonlSink:
    """``DIR/metrics.jsonl`` (a line per row) and ``DIR/events.jsonl`` (opened at the first event),
    each line written whole and unbuffered (``record.files.JsonlWriter``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.metrics: JsonlWriter | None = JsonlWriter(self.out_dir / METRICS_FILE)
        self.events: JsonlWriter | None = None

    def write_row(self, row: Row) -> None:
        if self.metrics is not None:
            self.metrics.write(row)

    def write_event(self, event: Event) -> None:
        if self.metrics is None:
            return  # closed
        self.events = self.events or JsonlWriter(self.out_dir / EVENTS_FILE)
        self.events.write(event)

    def close(self) -> None:
        for writer in (self.metrics, self.events):
            if writer is not None:
                writer.close()
        self.metrics = self.events = None


class LoggerSink:
    """Alarms as warnings of the ``testbed`` logger (rows are not logged)."""

    def write_row(self, row: Row) -> None:
        pass

    def write_event(self, event: Event) -> None:
        if is_alarm(event):
            LOG.warning("testbed alarm at step %s: %s: %s", event.get(E.STEP), event.get(E.KIND), event.get(E.MESSAGE))

    def close(self) -> None:
        pass


class ListenerSink:
    """Calls ``on_row`` listeners with every row and ``on_alarm`` listeners with every alarm (the
    lists are the caller's: listeners added later are called too)."""

    def __init__(self, on_row: list[Callable[[Row], None]], on_alarm: list[Callable[[Event], None]]):
        self.on_row, self.on_alarm = on_row, on_alarm

    def write_row(self, row: Row) -> None:
        for listener in list(self.on_row):
            listener(row)

    def write_event(self, event: Event) -> None:
        if is_alarm(event):
            for listener in list(self.on_alarm):
                listener(event)

    def close(self) -> None:
        pass
