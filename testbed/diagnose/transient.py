"""Transient evidence: one rank, a few steps — and when such a spike counts against the run.

The spikes are the attribution rule's (``testbed.diagnose.attribution``): a rank's robust z above 8 at a
step. A relabeling test cannot judge them: under exchangeability the rank that holds a step's
most extreme value is uniformly random, so one spike gives p ≥ 1/N whatever its size. Whether it
is an anomaly depends on how heavy the tails of healthy per-rank values are — a ×100 corrupted
gradient is a spike, and so is the occasional odd batch of a heavy-tailed data set.

So a spike is reported always, and *counts* against the run (``confirmed``) only when it stands
out from the run's own tails: its |z| is at least ``TAIL_RATIO`` (5) times the largest |z| seen at
every other step (all ranks, all metrics; the ranks and metrics already named persistent are left
out of that reference). For light-tailed values the rest of a run stays below |z| ≈ 5 (Gaussian
ranks, 4000 steps: largest 4.8–5.8 for N = 2…16), so a confirmed spike needs |z| ≳ 25 — the
catalog's ×100 gradient corruption scores 34 on a real run whose other steps stay below 4.9. For
heavy tails the reference grows with them: the ratio of the largest to the next largest of a
Pareto tail with index a exceeds 5 with probability 5^−a (0.8 % for Student-t(3)), so spikes of
a heavy-tailed healthy run are rarely confirmed. An unconfirmed spike stays in the evidence
(``confirmed: false``) without changing the status.

The p-value of a spike is ``None``: this is a rule with a stated assumption (a corrupted value
is far beyond the run's other extremes), not a test at level α; its false-alarm rates are
measured in ``tests/test_verdict.py`` and reported in the verdict's documentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from testbed.diagnose.attribution import comparable, rank_z

TAIL_RATIO = 5.0


@dataclass(frozen=True)
class Spike:
    """A rank's spikes in one metric: the peak z and its step, the first step, how many steps."""

    rank: int
    metric: str
    peak_z: float
    peak_step: int
    first_step: int
    steps: int
    of: int
    confirmed: bool
    reference: float  # largest |z| at the run's other steps


def spikes(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], metrics: Sequence[str],
           named: dict[str, set[int]], threshold: float, ratio: float = TAIL_RATIO) -> list[Spike]:
    """Spikes (|z| > ``threshold``) of the ``metrics`` in ``tables`` (``attribution.metric_table``
    per metric), skipping ranks ``named`` persistent in a metric; confirmation as in the module doc."""
    z_by_metric: dict[str, tuple[list[int], np.ndarray, np.ndarray]] = {}
    for metric in metrics:
        steps, values, nonfinite = tables[metric]
        if steps:
            signed = rank_z(comparable(values, metric), nonfinite)
            z = np.where(np.isfinite(signed), np.abs(signed), 0.0)  # non-finite values: their own evidence
            for r in named.get(metric, set()):
                if r < z.shape[1]:
                    z[:, r] = 0.0
            z_by_metric[metric] = (steps, z, signed)
    all_steps = sorted({s for steps, _, _ in z_by_metric.values() for s in steps})
    where = {s: i for i, s in enumerate(all_steps)}
    n = max((z.shape[1] for _, z, _ in z_by_metric.values()), default=0)
    step_max = np.zeros((len(all_steps), n))  # largest |z| over metrics, per (step, rank)
    for steps, z, _ in z_by_metric.values():
        idx = [where[s] for s in steps]
        step_max[idx, :z.shape[1]] = np.maximum(step_max[idx, :z.shape[1]], z)
    out = []
    for r in range(n):
        own = step_max[:, r] > threshold
        if not own.any():
            continue
        reference = float(step_max[~own].max()) if (~own).any() else 0.0
        peak_all = float(step_max[own, r].max())
        confirmed = peak_all >= ratio * reference
        for metric, (steps, z, signed) in z_by_metric.items():
            hit = np.flatnonzero(z[:, r] > threshold)
            if hit.size:
                peak = hit[np.argmax(z[hit, r])]
                out.append(Spike(r, metric, float(signed[peak, r]), steps[peak], steps[hit[0]], int(hit.size),
                                 len(steps), confirmed, reference))
    return out
