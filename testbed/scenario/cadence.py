"""Which steps do what: the one cadence rule of the scenario runner and the drop-in monitor.

Three instruments run at their own rates: the per-rank metrics (``every``), the exact pairwise
cosine matrix (``pairwise_every``) and the exact cross-rank state check (``weight_check_every``:
a checksum of every rank's parameters). Their defaults live here and nowhere else: a scenario's
``[metrics]`` table, ``testbed.attach`` and both framework callbacks read them from this module.

The rule (``Cadence.plan``): a step is measured when ``step % every == 0`` and always when it is the
last step; pairwise when ``step % pairwise_every == 0``; state-checked at the first step (a replica
that starts from different weights - a checkpoint loaded on one rank after wrapping - is caught
at once), after every ``weight_check_every`` optimizer steps (``(step + 1) % k == 0``) and at the
last step. ``0`` switches pairwise or the state check off. When the last step is not known in
advance (a user's loop), ``Monitor.close`` runs the final state check instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

EVERY = 1  # per-rank loss, gradient norm, cosine: every step
PAIRWISE_EVERY = 0  # the N x N cosine matrix: off (costs an all-to-all instead of the all-reduce)
WEIGHT_CHECK_EVERY = 10  # the state check: step 0, then every 10 steps, and the last (benchmarks/overhead.py --state-check)


class StepCadence(NamedTuple):
    """What one step runs. ``collective``: whether the step's one all-gather happens at all."""

    measure: bool
    pairwise: bool
    check_state: bool

    @property
    def collective(self) -> bool:
        return self.measure or self.pairwise or self.check_state


@dataclass(frozen=True)
class Cadence:
    """How often each instrument runs (module doc); ``ValueError`` on a value out of range."""

    every: int = EVERY
    pairwise_every: int = PAIRWISE_EVERY
    weight_check_every: int = WEIGHT_CHECK_EVERY

    def __post_init__(self) -> None:
        for name, low in (("every", 1), ("pairwise_every", 0), ("weight_check_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}{' (0 = off)' if low == 0 else ''}, got {value!r}")

    def plan(self, step: int, last: int | None = None) -> StepCadence:
        """The instruments of ``step`` (0-based); ``last``: the last step's index, when known."""
        is_last = last is not None and step == last
        k = self.weight_check_every
        return StepCadence(
            measure=step % self.every == 0 or is_last,
            pairwise=self.pairwise_every > 0 and step % self.pairwise_every == 0,
            check_state=k > 0 and (step == 0 or (step + 1) % k == 0 or is_last),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
