"""The evidence figure's numbers: each rank's standardized deviation at each step, per metric.

The standardization is the verdict's own (``diagnose.exchangeability.standardize``, the values its
per-metric permutation test sums), on the verdict's comparable scale (``attribution.comparable``:
loss and gradient norm as logarithms when positive, cosines as they are)::

    u(t, i) = clip((x(t, i) − median_j x(t, j)) / s(t), −3, 3)

with ``s(t)`` the ranks' robust spread pooled over steps t−5 … t+5. It is not re-centred here (the
test re-centres each step so that Σ_i u = 0): uncentred, the healthy ranks stay near 0 while one
rank is off, which is what a reader looks for. The clip bounds the colour scale: a rank at ±3 is
three spreads or more away.

Bit-identical ranks (replicated batches) have no spread. Where the pooled spread is 0 the verdict's
standardization falls back on the step's own spread, then on the root-mean-square deviation, so a
rank that differs from its replicas is coloured by its share of that difference and identical ranks
are exactly 0; ``replicas`` names the classes so the figure can say "no spread to compare against"
instead of printing a z of 10¹⁰ (the old outlier line's ``z=-4.75e+10``).

Long records: the rows are the digest's (``record/digest.py``): at most 2000 per run, each a
bucket's mean when the record is longer; the standardization is then of the bucket means (the
verdict's exact numbers stay in its evidence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from testbed.diagnose import replicas
from testbed.diagnose.attribution import LOG_METRICS, METRICS, comparable, metric_table
from testbed.diagnose.exchangeability import CLIP, standardize


@dataclass(frozen=True)
class DeviationMap:
    """One metric's map: ``u[t, i]`` at ``steps[t]`` (steps where every rank is finite)."""

    metric: str
    steps: list[int]
    u: np.ndarray  # [T, N], in [-CLIP, CLIP]
    log_scale: bool
    replicas: list[list[int]] | None  # classes of bit-identical ranks at most steps, or None
    dropped: int  # steps left out because some rank had no finite value

    @property
    def sums(self) -> np.ndarray:
        """Each rank's Σ_t u: how far, all steps together, it sat from the others."""
        return self.u.sum(axis=0)

    def spread_note(self) -> str:
        """Empty, or what a missing spread means for reading this map."""
        if self.replicas is None:
            return ""
        if len(self.replicas) == 1:
            return "all ranks bit-identical: no spread to compare against (the exact control)"
        same = [g for g in self.replicas if len(g) > 1]
        who = "; ".join("ranks " + ", ".join(map(str, g)) for g in same)
        return f"{who} bit-identical: no spread to compare against, any difference is exact (unit: the step's rms)"


def deviation_maps(rows: Sequence[dict[str, Any]], world_size: int | None = None) -> list[DeviationMap]:
    """A ``DeviationMap`` per metric in ``attribution.METRICS`` that the rows hold, over the ranks the
    rows hold (at most ``world_size``: a record's claim never makes the map larger than its rows)."""
    out = []
    for metric in METRICS:
        steps, values, _ = metric_table(rows, metric)
        if not steps:
            continue
        n = min(world_size or values.shape[1], values.shape[1])
        values = values[:, :n]
        x = comparable(values, metric)
        keep = np.isfinite(x).all(axis=1)
        kept = [s for s, k in zip(steps, keep) if k]
        u = standardize(x[keep], clip=CLIP, recenter=False) if kept else np.zeros((0, n))
        labels = replicas.structure(values[keep]) if kept else None
        out.append(DeviationMap(metric, kept, u, bool(metric in LOG_METRICS and x is not values),
                                replicas.classes(labels) if labels is not None else None, int((~keep).sum())))
    return out
