"""One piece of the verdict's evidence, and which pieces count against a run.

Kept apart so that the modules producing evidence (``verdict``, ``replicas``, ``transient``,
``exact``) and the text share one definition without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
EXACT_KINDS = ("data", "state", "config")  # exact evidence with a cause (METRICS.md, "Exact evidence")


@dataclass(frozen=True)
class Evidence:
    """One finding: exactly one of ``rank`` / ``group`` is set (``group`` is a split, e.g.
    ``[[0, 1], [2, 3]]``; with two ranks ``[[0], [1]]``). ``effect`` holds ``value``, ``unit`` and,
    where they apply, ``since_step``, ``steps`` (steps agreeing with the effect's sign) and ``of``.

    The exact kinds (``data``, ``state``, ``config``) carry ``details``: the cause (``cause``,
    ``tensor`` or ``key`` with ``values``), ``ranks`` (the culprits; [] for a job-wide or not
    attributable cause) and ``step``; their ``group`` is ``[ranks]``."""

    metric: str
    kind: str  # persistent | transient | divergence | nonfinite | data | state | config
    effect: dict[str, Any]
    p_value: float | None
    rank: int | None = None
    group: list[list[int]] | None = None
    details: dict[str, Any] | None = None

    def to_json(self) -> Row:
        if self.kind in EXACT_KINDS:
            return {"kind": self.kind, **(self.details or {}), "effect": self.effect, "metric": self.metric,
                    "p_value": None}
        who: Row = {"group": self.group} if self.group is not None else {"rank": self.rank}
        return {"metric": self.metric, **who, "effect": self.effect, "p_value": self.p_value, "kind": self.kind}

    @property
    def since_step(self) -> int | None:
        return self.effect.get("since_step")

    @property
    def culprits(self) -> list[int]:
        """An exact item's named ranks ([] = job-wide or not attributable)."""
        return list((self.details or {}).get("ranks") or [])


def counts(evidence: Evidence) -> bool:
    """Whether an evidence item makes the run inconsistent: every kind does, except a spike that is
    not ``confirmed`` (``transient``) and an exact cause the run declared intended."""
    if evidence.kind in EXACT_KINDS:
        return not evidence.effect.get("intended")
    return evidence.kind != "transient" or evidence.effect.get("confirmed", True)
