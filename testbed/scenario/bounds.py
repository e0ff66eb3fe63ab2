"""Numeric bounds of a registered kind's parameters, written in its signature:
``lr: Annotated[float, Bounds(gt=0)]``. The validator reads them with the type, so a value the
rank would reject (or that would overflow a tensor op) is refused with the file and the field
before any process starts, and the schema still lives in one place: the function.

Every float parameter of a registered kind must also be finite and representable in float32
(``FLOAT32_MAX``): the tensors a parameter scales are float32, and ``lr = 1e308`` otherwise ends
in a rank as "value cannot be converted to type float without overflow".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Bounds:
    """``ge`` / ``gt`` / ``le`` / ``lt``: inclusive and exclusive limits (None = no limit)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """``">= 0 and < 1"``, for "expected a number >= 0 and < 1"."""
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def representable(value: Any) -> bool:
    """A float parameter a float32 tensor op can take: finite, magnitude at most ``FLOAT32_MAX``."""
    return not isinstance(value, float) or (math.isfinite(value) and abs(value) <= FLOAT32_MAX)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"
