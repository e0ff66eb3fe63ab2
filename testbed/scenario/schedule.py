"""``[optim] schedule``, ``warmup_steps``, ``warmup_ratio``: the learning-rate schedule, validated.

The schedules are transformers' (``get_scheduler``; built in ``testbed.workloads.optim``), so a
run's lr per step is what a ``Trainer`` with the same arguments would use:

- ``constant`` (default): the base lr; with warmup, transformers' ``constant_with_warmup``;
- ``linear``: linear warmup, then linear decay to 0 at the last step;
- ``cosine``: linear warmup, then half a cosine down to 0 at the last step (the Stanford Alpaca
  recipe: ``cosine`` with ``warmup_ratio = 0.03``).

``warmup_ratio`` becomes ``ceil(steps × ratio)`` warmup steps, as transformers' ``TrainingArguments``
computes it. The total is the scenario's ``steps`` (optimizer steps). Bad values are refused here,
before any process starts, naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from testbed.scenario.errors import ScenarioError

SCHEDULES = ("constant", "linear", "cosine")
#: the keys of ``[optim]`` that belong to the schedule, not to the optimizer kind
SCHEDULE_KEYS = frozenset({"schedule", "warmup_steps", "warmup_ratio"})


@dataclass(frozen=True)
class ScheduleSpec:
    """The learning-rate schedule over the scenario's ``steps``."""

    name: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    def warmup(self, total_steps: int) -> int:
        """The number of warmup steps over ``total_steps``."""
        return self.warmup_steps or math.ceil(total_steps * self.warmup_ratio)

    @property
    def is_constant(self) -> bool:
        return self.name == "constant" and not self.warmup_steps and not self.warmup_ratio


def read_schedule(optim: Mapping[str, Any], source: str, steps: int) -> ScheduleSpec:
    """The schedule fields of an ``[optim]`` table; ScenarioError names the field."""
    name = optim.get("schedule", "constant")
    if name not in SCHEDULES:
        raise ScenarioError(source, "optim.schedule", "one of " + ", ".join(repr(s) for s in SCHEDULES), name)
    warmup_steps = optim.get("warmup_steps", 0)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= steps:
        raise ScenarioError(source, "optim.warmup_steps", f"an integer in 0..{steps} (steps = {steps})", warmup_steps)
    ratio = optim.get("warmup_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ScenarioError(source, "optim.warmup_ratio", "a number in [0, 1) (a fraction of steps)", ratio)
    if warmup_steps and ratio:
        raise ScenarioError(source, "optim.warmup_ratio", "warmup_steps or warmup_ratio, not both "
                            f"(warmup_steps = {warmup_steps})", ratio)
    return ScheduleSpec(name, warmup_steps, float(ratio))
