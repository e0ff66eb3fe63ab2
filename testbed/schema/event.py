"""One line of ``events.jsonl``: an alarm or a non-finite value, its keys and the built-in alarm kinds.

Writers (``engine/step_path.py``, ``engine/alarms.py``, ``integrations/monitor.py``) and readers
(``engine/finalize.py``, ``gate/``) use these names. Two shapes share the file:

- an alarm: ``{"step", "event": "alarm", "kind", "message", "ranks", ...details}`` (plus the
  framework's ``global_step`` when the step has one);
- a non-finite value: ``{"step", "event": "nonfinite_loss" | "nonfinite_grad", "rank"}``.
"""
from __future__ import annotations

from typing import TypedDict

from testbed.schema.row import GLOBAL_STEP, NONFINITE_GRAD, NONFINITE_LOSS, STEP

EVENT = "event"
KIND = "kind"
MESSAGE = "message"
RANKS = "ranks"
RANK = "rank"
ALARM = "alarm"  # the value of EVENT for an alarm
NONFINITE_EVENTS = (NONFINITE_LOSS, NONFINITE_GRAD)  # values of EVENT for a non-finite value

# The built-in alarm kinds (docs/monitor.md, "Alarms")
WEIGHTS_DIVERGED = "weights_diverged"  # a state check found the replicas' checksums differ
NONFINITE = "nonfinite"  # a NaN / Inf loss or gradient on a rank
INCONSISTENT = "inconsistent"  # the online exchangeability test crossed 1/alpha
LR_DIFFERS = "lr_differs"  # the ranks stepped with different learning rates
DATA = "data"  # the data ledger found a cause: details "cause" (replicated | overlap | epoch_repeat | uncovered)
STATE_DIFFERS = "state_differs"  # buffers differ where DDP has just synced them (details "tensor")
CONFIG_DIFFERS = "config_differs"  # the ranks' settings differ (details "keys")
BUILTIN_ALARMS = (WEIGHTS_DIVERGED, NONFINITE, INCONSISTENT, LR_DIFFERS, DATA, STATE_DIFFERS, CONFIG_DIFFERS)

__all__ = ["EVENT", "KIND", "MESSAGE", "RANKS", "RANK", "ALARM", "NONFINITE_EVENTS", "WEIGHTS_DIVERGED", "NONFINITE",
           "INCONSISTENT", "LR_DIFFERS", "DATA", "STATE_DIFFERS", "CONFIG_DIFFERS", "BUILTIN_ALARMS", "STEP",
           "GLOBAL_STEP", "Event"]


class Event(TypedDict, total=False):
    step: int
    event: str
    kind: str
    message: str
    ranks: list[int] | None
    rank: int | None
    global_step: int
