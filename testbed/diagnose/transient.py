"""Transient evidence: one rank, a few steps — a test of spikes with a stated error rate, in which
spikes cannot cancel each other.

A relabeling test cannot judge a spike: under exchangeability the rank holding a step's most
extreme value is uniformly random, so one step gives p ≥ 1/N whatever its size. Whether a ×100
gradient is an anomaly depends on how heavy the tails of healthy values are, so the test needs a
tail model, fitted to the run's own values.

Data: the robust z of every rank, metric and step (``testbed.diagnose.attribution``: distance from
the step's cross-rank median in units of the spread around it), |z| = Y (non-finite values are
their own evidence).

Tail model. The test needs to know how far a healthy run's largest values reach. Two models, and
the run's own tail says which applies:

- light (no heavier than exponential: normal-like noise, which per-rank batch means have): above
  the k+1-th largest value u, the excesses ``Y − u`` are Exp; Rényi's representation makes the
  normalized spacings ``D_i = i · (Y_(i) − Y_(i+1))`` of the k largest values independent Exp(λ);
- heavy (no heavier than Pareto: Student-t, Cauchy): ``log Y`` is exponential above ``log u`` — the
  same with ``D_i = i · log(Y_(i) / Y_(i+1))`` (as in Hill's estimator).

The tail is read as light when its Hill index (from the k largest values, the J candidates left
out) is at least ``LIGHT_INDEX``; a Cauchy tail has index 1, Student-t(3) 3, a normal one a large
and growing index. (k: the top ``TAIL_SHARE`` of the values.)

Test. Whether the j-th largest value is a spike is tested with the j − 1 larger ones set aside,
against the values below it only: ``F_j = D'_1 / mean(D'_2 … D'_k')`` on the sample ``Y_(j) … Y_(k+1)``
is exactly F(2, 2(k'−1)) under its model (``P(F > f) = (1 + f/(k'−1))^−(k'−1)``; the unknown scale
or index cancels) and smaller for lighter tails. The spikes are the ĵ largest values, ĵ the largest
j ≤ J with J · p_j ≤ the level (Bonferroni over the J candidates). A spike is never measured
against a larger one — two ×50 corruptions are both found, the second against the healthy tail —
and at most J extremes are set aside, so a few others cannot raise the reference ("more
corruption, less detection" cannot happen). The p-value of the i-th largest value is
``min_{j ≥ i} J·p_j``; the verdict puts the test in its Holm family.

Error rate (measured: ``tests/test_verdict.py``, ``benchmarks/verdict_calibration.py``,
``docs/diagnosis.md``): the model is chosen from the data, so the test is exact only under its
model; the stated false-alarm rates of the full verdict on healthy runs with normal, Student-t(3)
and Cauchy noise are measured (t3 is the hardest: its tail can read as light). A healthy run whose
values do have rare huge excursions (the "spiky" streams: 1 % of values at 20σ) is, by design,
indistinguishable from corruption. The values of one step share its median and spread, so
"independent" is an approximation, covered by the same measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from testbed.diagnose.attribution import comparable, rank_z

LIGHT_INDEX = 4.0  # a tail whose Hill index is at least this is read as light
MIN_VALUES = 12  # fewer values: no tail to judge a spike by (spikes are reported, not confirmed)
TAIL_SHARE, MIN_TAIL, MAX_TAIL = 0.05, 10, 200  # k: the top 5 % of the values, 10 … 200 of them
MAX_SPIKES = 5  # J: spikes tested for at most


@dataclass(frozen=True)
class Spike:
    """A rank's spikes in one metric: the peak z and its step, the first and last step, how many
    steps, whether confirmed (p ≤ the level), its p-value (the test's, None when the value is not
    among the candidates or the run too short to judge) and the reference: the largest |z| below
    the declared spikes."""

    rank: int
    metric: str
    peak_z: float
    peak_step: int
    first_step: int
    last_step: int
    steps: int
    of: int
    confirmed: bool
    p_value: float | None
    reference: float


def tail_p_values(y: np.ndarray, max_spikes: int = MAX_SPIKES) -> np.ndarray:
    """``p [J]``: p_j of "the j-th largest of ``y`` is a spike" (module doc). Values ≤ 0 are not
    part of the tail; too few values: an empty array."""
    top = np.sort(y[y > 0])[::-1]
    if top.size < MIN_VALUES:
        return np.zeros(0)
    k = int(min(MAX_TAIL, max(MIN_TAIL, math.ceil(TAIL_SHARE * y.size)), top.size - 1))
    count = min(max_spikes, max(1, k // 3))
    logs = np.log(top[:k + 1])
    values = top[:k + 1] if hill_index(logs[count:]) >= LIGHT_INDEX else logs
    out = np.ones(count)
    for j in range(count):
        sample = values[j:]  # Y_(j+1) … Y_(k+1), the j larger ones set aside
        spacing = np.arange(1, sample.size) * (sample[:-1] - sample[1:])  # D'_1 … D'_k'
        rest = spacing[1:]
        mean = float(rest.mean())
        f = spacing[0] / mean if mean > 0 else (math.inf if spacing[0] > 0 else 0.0)
        out[j] = (1.0 + f / rest.size) ** (-rest.size) if math.isfinite(f) else 0.0
    return out


def hill_index(logs: np.ndarray) -> float:
    """Hill's estimate of the Pareto index from descending log-values (the last one the threshold)."""
    excess = float(np.mean(logs[:-1] - logs[-1])) if logs.size > 1 else 0.0
    return 1.0 / excess if excess > 0 else math.inf


def spike_p_values(p: np.ndarray) -> np.ndarray:
    """Per candidate i (the i-th largest value): ``min_{j ≥ i} J · p_j`` (capped at 1)."""
    if p.size == 0:
        return p
    return np.minimum.accumulate(np.minimum(1.0, p * p.size)[::-1])[::-1]


def z_tables(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], metrics: Sequence[str],
             named: dict[str, set[int]]) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """Per metric: (steps, |z| with named ranks and non-finite values at 0, signed z)."""
    out: dict[str, tuple[list[int], np.ndarray, np.ndarray]] = {}
    for metric in metrics:
        steps, values, nonfinite = tables[metric]
        if steps:
            signed = rank_z(comparable(values, metric), nonfinite)
            z = np.where(np.isfinite(signed), np.abs(signed), 0.0)  # non-finite values: their own evidence
            for r in named.get(metric, set()):
                if r < z.shape[1]:
                    z[:, r] = 0.0
            out[metric] = (steps, z, signed)
    return out


@dataclass(frozen=True)
class SpikeTest:
    """The run's |z| per metric, and the tail test's p-value per candidate (the largest values)."""

    by_metric: dict[str, tuple[list[int], np.ndarray, np.ndarray]]
    keys: list[tuple[str, int, int]]  # (metric, step index, rank) of each value of y
    y: np.ndarray
    p: np.ndarray  # per candidate, largest first (``spike_p_values``)

    @property
    def run_p(self) -> float | None:
        """The test's p-value for the run (None: too few values to judge)."""
        return float(self.p[0]) if self.p.size else None

    def spikes(self, threshold: float, level: float) -> list[Spike]:
        """Spikes (|z| > ``threshold``), confirmed when their p ≤ ``level``."""
        order = np.argsort(-self.y, kind="stable")[:self.p.size]
        p_of = {self.keys[i]: float(self.p[c]) for c, i in enumerate(order)}
        declared = int(np.sum(self.p <= level))
        reference = float(np.sort(self.y)[::-1][declared]) if self.y.size > declared else 0.0
        out = []
        for metric, (steps, z, signed) in self.by_metric.items():
            for r in range(z.shape[1]):
                hit = np.flatnonzero(z[:, r] > threshold)
                if not hit.size:
                    continue
                known = [p_of[(metric, t, r)] for t in hit if (metric, t, r) in p_of]
                p_spike = min(known) if known else None
                peak = hit[np.argmax(z[hit, r])]
                out.append(Spike(r, metric, float(signed[peak, r]), steps[peak], steps[hit[0]], steps[hit[-1]],
                                 int(hit.size), len(steps), p_spike is not None and p_spike <= level, p_spike, reference))
        return out


def spike_test(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], metrics: Sequence[str],
               named: dict[str, set[int]] | None = None) -> SpikeTest:
    """The tail test on ``metrics`` (``attribution.metric_table`` per metric), leaving out ranks
    ``named`` persistent in a metric (module doc)."""
    by_metric = z_tables(tables, metrics, named or {})
    keys = [(metric, t, r) for metric, (_, z, _) in by_metric.items() for t in range(z.shape[0]) for r in range(z.shape[1])]
    y = np.concatenate([z.ravel() for _, z, _ in by_metric.values()]) if by_metric else np.zeros(0)
    return SpikeTest(by_metric, keys, y, spike_p_values(tail_p_values(y)))


def spikes(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], metrics: Sequence[str],
           named: dict[str, set[int]], threshold: float, level: float) -> tuple[list[Spike], float | None]:
    """Spikes (|z| > ``threshold``) of ``metrics``, confirmed when their p ≤ ``level``, and the test's
    p-value for the run (``spike_test``)."""
    test = spike_test(tables, metrics, named)
    return test.spikes(threshold, level), test.run_p
