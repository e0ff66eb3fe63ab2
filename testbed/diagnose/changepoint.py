"""When an effect starts and when it ends: a change-point estimate with its uncertainty.

Input: one series per finding — a named rank's standardized deviation from the healthy ranks at
every step (mean 0 where the rank is healthy). Model (the "epidemic" change-point model, Levin &
Kline 1985; Yao 1993): the mean is μ on steps ``[a, b)`` and 0 elsewhere, Gaussian noise of one
variance. The maximum-likelihood segment maximizes ``S(a, b)² / (b − a)`` with S the sum of the
series over the segment; the persistent model (the effect lasts to the end, b = T) is the special
case the estimate falls back on unless an end is supported: ending earlier must gain more
log-likelihood than ``log T`` (the BIC penalty of the extra parameter).

Uncertainty: the likelihood support interval — every start (end) whose profile log-likelihood is
within ``log 20`` of the best (relative likelihood ≥ 1/20, the interval that is ≈ 95 % for a
regular parameter; change points are not regular, so it is stated as a support interval). An
effect that switched on sharply has a narrow interval; a weak one, a wide one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUPPORT = math.log(20.0)
MAX_POINTS = 600  # longer series are estimated on block means (the ends are then block-accurate)


@dataclass(frozen=True)
class Segment:
    """Indices into the series: the effect holds on ``[start, end)``; ``end`` is None when it lasts
    to the end; ``*_range`` are the support intervals (inclusive, indices; the end's upper bound
    may be T: "to the end")."""

    start: int
    end: int | None
    start_range: tuple[int, int]
    end_range: tuple[int, int] | None


def segment(series: np.ndarray) -> Segment:
    """The effect's segment in ``series`` (module doc)."""
    d = np.asarray(series, dtype=float)
    t_count = d.size
    if t_count < 2:
        return Segment(0, None, (0, 0), None)
    block = max(1, math.ceil(t_count / MAX_POINTS))
    if block > 1:
        pad = (-t_count) % block
        d = np.concatenate([d, np.full(pad, np.nan)]).reshape(-1, block)
        d = np.nanmean(d, axis=1) * block  # block sums: S over blocks is S over steps
    n = d.size
    c = np.concatenate([[0.0], np.cumsum(d)])
    a, b = np.triu_indices(n + 1, k=1)  # all segments [a, b)
    gain = (c[b] - c[a]) ** 2 / ((b - a) * block)  # S² / length
    sigma2 = max(float(np.sum(d ** 2) / block - gain.max()) / max(1, t_count - 2), 1e-12)
    loglik = np.full((n + 1, n + 1), -np.inf)
    loglik[a, b] = gain / (2 * sigma2)
    best_a, best_b = np.unravel_index(int(np.argmax(loglik)), loglik.shape)
    to_end = loglik[:, n]
    if loglik[best_a, best_b] - to_end.max() <= math.log(t_count) or best_b == n:
        start = int(np.argmax(to_end))
        starts = np.flatnonzero(to_end >= to_end[start] - SUPPORT)
        return Segment(start * block, None, (int(starts.min()) * block, int(starts.max()) * block), None)
    profile_a, profile_b = loglik.max(axis=1), loglik.max(axis=0)
    top = loglik[best_a, best_b]
    starts = np.flatnonzero(profile_a >= top - SUPPORT)
    ends = np.flatnonzero(profile_b >= top - SUPPORT)
    return Segment(int(best_a) * block, min(t_count, int(best_b) * block),
                   (int(starts.min()) * block, int(starts.max()) * block),
                   (min(t_count, int(ends.min()) * block), min(t_count, int(ends.max()) * block)))


def effect_span(series: np.ndarray, steps: list[int]) -> dict[str, object]:
    """``since_step``, ``since_range``, and — when the effect ended before the record did —
    ``until_step`` (the first step without it, like a perturbation's ``end_step``) and
    ``until_range``; steps, not indices."""
    seg = segment(series)

    def at(i: int) -> int:
        return steps[i] if i < len(steps) else steps[-1] + 1

    out: dict[str, object] = {"since_step": at(seg.start), "since_range": [at(seg.start_range[0]), at(seg.start_range[1])],
                              "until_step": None}
    if seg.end is not None and seg.end_range is not None:
        out.update(until_step=at(seg.end), until_range=[at(seg.end_range[0]), at(seg.end_range[1])])
    return out
