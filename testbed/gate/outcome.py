"""What the gate learned about one scenario (``Outcome``) and one line of what regressed (``Failure``).

Types only, so that running the gate (``gate.gate``) and reporting it (``gate.outputs``) can both
import them without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.gate import baseline as baselines
from testbed.gate.checks import Finding
from testbed.scenario.spec import Scenario


@dataclass(frozen=True)
class Failure:
    """One line of "what regressed": which check, by how much, and where (when known)."""

    check: str
    message: str
    amount: str = ""
    step: int | None = None
    rank: int | None = None
    level: str | None = None


@dataclass
class Outcome:
    """Everything the gate learned about one scenario."""

    scenario: Scenario
    run_dir: Path
    wall_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    deviations: list[baselines.Deviation] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def passed(self) -> bool:
        return not self.failures
