"""A metrics row as the plain scalars that experiment loggers take (TensorBoard, W&B, MLflow, Lightning).

Loggers take one float per name: ``None`` values (a degenerate case, see docs/metrics.md; its flag is
in the row) are left out rather than written as 0 or NaN, lists become one value per rank, and
``weights_in_sync`` becomes 1.0 / 0.0. Names are ``testbed/<metric>`` and, per rank,
``testbed/<metric>/rank<r>``, so every per-rank metric forms one group.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from testbed.schema import event as E
from testbed.schema import row as R

PREFIX = "testbed/"
#: one value per step, in the order loggers show them
SCALARS = (R.GLOBAL_LOSS, R.LOSS_STD, R.LOSS_CV, R.GRAD_NORM_STD, R.GRAD_NORM_CV, R.MEAN_GRAD_NORM, R.COS_MEAN,
           R.COS_MIN, R.NOISE_SCALE, R.PAIRWISE_COS_MEAN)
#: one value per rank
PER_RANK = R.PER_RANK


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def scalar_values(row: Mapping[str, Any]) -> dict[str, float]:
    """``{metric: value}`` for the row's defined one-per-step values (no prefix)."""
    out = {k: v for k in SCALARS if (v := _number(row.get(k))) is not None}
    if isinstance(row.get(R.WEIGHTS_IN_SYNC), bool):
        out[R.WEIGHTS_IN_SYNC] = 1.0 if row[R.WEIGHTS_IN_SYNC] else 0.0
    if R.FLAGS in row:
        out[R.FLAGS] = float(len(row[R.FLAGS] or []))
    return out


def per_rank_values(row: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {"rank<r>": value}}`` for the per-rank lists (undefined entries left out)."""
    out: dict[str, dict[str, float]] = {}
    for key in PER_RANK:
        values = row.get(key)
        if isinstance(values, list):
            group = {f"rank{r}": v for r, x in enumerate(values) if (v := _number(x)) is not None}
            if group:
                out[key] = group
    return out


def flat_values(row: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """Everything in one flat dict of floats (what ``Trainer.log`` and ``LightningModule.log_dict`` take)."""
    out = {prefix + k: v for k, v in scalar_values(row).items()}
    for key, group in per_rank_values(row).items():
        out.update({f"{prefix}{key}/{rank}": v for rank, v in group.items()})
    return out


def alarm_values(event: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """An alarm as a logger scalar: ``testbed/alarm/<kind>`` = 1.0 at its step."""
    return {f"{prefix}alarm/{event.get(E.KIND, E.ALARM)}": 1.0}
