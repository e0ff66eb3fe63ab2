"""TensorBoard event files for a plain training loop: ``testbed.attach(model, tensorboard="runs/tb")``.

Written with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: the ``tensorboard``
extra), by rank 0 only - the row is the same on every rank. Each one-per-step metric is a scalar
``testbed/<metric>``; each per-rank metric is one chart ``testbed/<metric>`` with a line per rank
(``add_scalars``, which TensorBoard stores as one sub-run per rank). Alarms are a scalar
``testbed/alarm/<kind>`` (1.0 at the step) and a text entry ``testbed/alarms``. Hugging Face
``Trainer`` runs do not need this: ``report_to="tensorboard"`` receives the same values through the
Trainer's logs (``TestbedCallback``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from testbed.engine.sinks import is_alarm
from testbed.integrations.scalars import PREFIX, alarm_values, per_rank_values, scalar_values
from testbed.schema import event as E
from testbed.schema import row as R


class TensorBoardSink:
    """Writes rows and alarms to one TensorBoard log directory (an ``engine.sinks.Sink``); the step
    is the framework's ``global_step`` when the row has one, else the monitor's ``step``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
            raise ImportError("attach(..., tensorboard=DIR) needs the tensorboard package: "
                              "pip install 'testbed[tensorboard]' (or pip install tensorboard)") from e
        self.writer: Any = SummaryWriter(log_dir=str(log_dir))

    def write_row(self, row: Mapping[str, Any]) -> None:
        step = int(row.get(R.GLOBAL_STEP, row[R.STEP]))
        for key, value in scalar_values(row).items():
            self.writer.add_scalar(PREFIX + key, value, step)
        for key, group in per_rank_values(row).items():
            self.writer.add_scalars(PREFIX + key, group, step)
        self.writer.flush()

    def write_event(self, event: Mapping[str, Any]) -> None:
        if not is_alarm(event):  # type: ignore[arg-type]
            return
        step = int(event.get(E.GLOBAL_STEP, event.get(E.STEP)) or 0)
        for key, value in alarm_values(event).items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_text(PREFIX + "alarms", f"{event.get(E.KIND)}: {event.get(E.MESSAGE, '')}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
