"""Outlier-rank attribution: which rank stood out, in which metric, and from which step.

Dispersion metrics say *that* ranks disagree; this module says *who*. For every recorded step and
each per-rank metric (``loss``, ``grad_norm``, ``cos_to_mean``) every rank gets a robust z-score,
and a rank "stands out" at a step when ``|z| > threshold`` in any metric. Post-hoc analysis of the
recorded rows (pure: no torch, no processes), so it may look at the whole run.

N ≥ 3 — distance from the cross-rank median, in units of a robust spread::

    z_i(t) = (x_i(t) − median_j x_j(t)) / max(S(t), floor)
    S(t)   = 1.4826 · median of |x_j(t') − median_{k≠j} x_k(t')| over all ranks j, steps t−5 … t+5

S is the MAD of the leave-one-out deviations, pooled over the steps around t. Not the step's own
MAD: with 3–8 ranks that is a statistic of a handful of numbers (with 3 ranks, the gap between
the two that are not the outlier) and swings widely, so it sometimes hides a ×1000 corruption and
sometimes inflates ordinary disagreement. Leave-one-out, because deviations from a median that
includes the rank itself are biased low for small N. Measured on Gaussian ranks (11-step windows,
a 10σ spike on one rank): largest null |z| / median spike z = 7.6 / 6.8 (N = 3), 9.1 / 7.7 (4),
6.0 / 8.8 (8); with the step's own MAD instead: 42 / 16, 17.5 / 13.6, 7.7 / 11.4. A window, not
the whole run, because the spread drifts (loss CV rose 10× over 20 steps on the transformer
shuffle ladder). ``floor`` (1e-12 × max(1, |median|)) matters only for bit-identical ranks (spread
0): then any difference is an anomaly and its z is huge. Limit: with exactly 3 ranks, a rank that
is off at *every* step also shifts the other two's leave-one-out medians, S grows with it, and a
persistent outlier is not attributed (transient ones are); from 4 ranks on it is.

N = 2 — the cross-rank MAD is degenerate: the median is the midpoint, both ranks sit exactly the
same distance from it, and neither can be singled out at one step. So two things are combined:
(1) *when*: the pair difference ``Δ(t) = x_1(t) − x_0(t)`` as a robust z over its own history,
``z_Δ(t) = (Δ(t) − median Δ) / max(1.4826·MAD Δ, floor)``, median and MAD over steps t−15 … t+15
(a window for the reason above; wider, as a step gives one number, not N — with ±5 Gaussian
noise exceeded |z| = 8 at 5e-4 of steps, with ±15 at none of 30k); (2) *who*: each rank's move
against its own neighbouring steps, ``e_i(t) = x_i(t) − median(x_i over t±3, t excluded)``. The
disagreement is given to the ranks in proportion to how far each moved:
``z_1 = z_Δ·|e_1|/max|e|``, ``z_0 = −z_Δ·|e_0|/max|e|`` (both get ``±z_Δ`` when neither moved:
ambiguous). Consequence: with two ranks only *transient* anomalies are attributable; a constant
offset between the two (e.g. label noise on one rank from step 0) is, by construction, the
run's normal and is not flagged — a control run is needed to call it.

N = 1 — nothing to compare: no attribution (``method`` says so).

Loss and gradient norm are compared as ``log(x)`` when all their values in the run are positive:
their scale drifts over training (the mean grad norm of a 4-rank shuffle_desync_1 run grew 2.9×
in 40 steps) and in log space a deviation is a ratio, so spreads from neighbouring steps compare.
Cosines stay linear.

Non-finite values: a rank flagged ``nonfinite_loss`` / ``nonfinite_grad`` at a step while some
peer was finite stands out there with ``z = inf`` (``nonfinite: true``; JSON ``z: null``). Once
every rank is non-finite (the averaged gradient spread it) nobody stands out: the first rank
to go non-finite is the one named. Ties in peak |z| go to the rank that stood out first.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

Row = dict[str, Any]
METRICS: tuple[str, ...] = ("loss", "grad_norm", "cos_to_mean")
LOG_METRICS = frozenset({"loss", "grad_norm"})  # compared as log(x) when all values are > 0
# Threshold, in units of the robust spread (≈ σ). Largest |z| measured where no rank is anomalous
# by construction: 4.85 (loss, control on 2 ranks, 40 steps); 4.74 over 9 runs on 4 ranks
# (control_4rank; shuffle_desync_1 twice; 3 more levels of an MLP shuffle ladder; the 2of4, 3of4,
# 4of4 levels of the transformer shuffle_ladder, 20 steps).
# Gaussian per-rank values, 100k steps: P(|z| > 8) = 0 for N = 2, 3, 4, 8;
# Student-t(3) on 4 ranks: 1.5e-3. A ×10 one-step gradient corruption on 1 of 4 ranks scored 13.
# A pointer for where to look, not a verdict.
DEFAULT_THRESHOLD = 8.0
MAD_TO_SIGMA = 1.4826  # MAD × this estimates σ for normal data
# |z| at or above this was measured against (nearly) no spread: the other ranks were bit-identical and
# the scale was the floor (a relative difference of 1e-8 reaches it; a spread-based z stays far below:
# a ×1000 corrupted gradient scores ~140). Printed as such, not as z=-4.75e+10.
NO_SPREAD_Z = 1e4
NEIGHBOURS = 3  # N = 2: steps on each side that define a rank's own recent values
LOCAL_STEPS = 5  # N ≥ 3: steps on each side whose spread sets a step's scale
PAIR_STEPS = 15  # N = 2: the same, wider: one number (Δ) per step instead of N
_NONFINITE_FLAG = {"loss": "nonfinite_loss", "grad_norm": "nonfinite_grad", "cos_to_mean": "nonfinite_grad"}


def metric_table(rows: Sequence[Row], metric: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(steps, values [T, N] with NaN where undefined, non-finite mask [T, N]) of one metric."""
    measured = [r for r in rows if isinstance(r.get(metric), list)]
    steps = [int(r["step"]) for r in measured]
    n = max((len(r[metric]) for r in measured), default=0)
    values = np.full((len(measured), n), np.nan)
    nonfinite = np.zeros((len(measured), n), dtype=bool)
    for t, row in enumerate(measured):
        for i, v in enumerate(row[metric]):
            if v is not None and math.isfinite(v):
                values[t, i] = v
        for flag in row.get("flags", []):
            if flag.get("kind") == _NONFINITE_FLAG[metric] and flag.get("rank") is not None:
                nonfinite[t, flag["rank"]] = True
    return steps, values, nonfinite


def comparable(values: np.ndarray, metric: str) -> np.ndarray:
    """Loss and gradient norm in log space when every value is positive (module doc)."""
    finite = values[np.isfinite(values)]
    if metric in LOG_METRICS and finite.size and (finite > 0).all():
        return np.log(values)
    return values


def _floor(center: np.ndarray | float) -> np.ndarray:
    return 1e-12 * np.maximum(1.0, np.abs(center))


def cross_rank_z(values: np.ndarray, width: int = LOCAL_STEPS) -> np.ndarray:
    """N ≥ 3: distance from the step's cross-rank median, in units of the leave-one-out spread
    typical of the steps around it (module doc)."""
    with warnings.catch_warnings():  # an all-undefined step (e.g. every cosine None) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(values, axis=1, keepdims=True)
        loo = np.abs(values - leave_one_out_median(values))
        spread = MAD_TO_SIGMA * np.nanmedian(_windows(loo, width).reshape(len(values), -1), axis=1)
    scale = np.maximum(np.nan_to_num(spread, nan=0.0)[:, None], _floor(np.nan_to_num(center)))
    return (values - center) / scale


def leave_one_out_median(values: np.ndarray) -> np.ndarray:
    """[T, N]: for each rank, the median of the *other* ranks at the same step."""
    out = np.empty_like(values)
    for i in range(values.shape[1]):
        out[:, i] = np.nanmedian(np.delete(values, i, axis=1), axis=1)
    return out


def _windows(values: np.ndarray, width: int) -> np.ndarray:
    """``[T, ..., 2·width+1]``: the values of steps t−width … t+width (NaN beyond the ends)."""
    pad = [(width, width)] + [(0, 0)] * (values.ndim - 1)
    return np.lib.stride_tricks.sliding_window_view(np.pad(values, pad, constant_values=np.nan), 2 * width + 1, axis=0)


def pair_z(values: np.ndarray, width: int = PAIR_STEPS) -> np.ndarray:
    """N = 2: windowed z of the pair difference, shared out by each rank's own move (module doc)."""
    delta = values[:, 1] - values[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        window = _windows(delta, width)  # [T, 2w+1]
        center = np.nanmedian(window, axis=1)
        mad = np.nanmedian(np.abs(window - center[:, None]), axis=1)
    scale = np.maximum(np.nan_to_num(MAD_TO_SIGMA * mad, nan=0.0), _floor(np.nan_to_num(center)))
    z_delta = (delta - center) / scale
    moves = np.abs(own_history_moves(values))
    biggest = np.nanmax(moves, axis=1)
    with np.errstate(all="ignore"):
        share = np.where(biggest[:, None] > 0, moves / biggest[:, None], 1.0)
    return np.stack([-z_delta * share[:, 0], z_delta * share[:, 1]], axis=1)


def own_history_moves(values: np.ndarray, width: int = NEIGHBOURS) -> np.ndarray:
    """``x_i(t) −`` the median of rank i's values at the ``width`` steps either side of t."""
    window = _windows(values, width)  # [T, N, 2w+1]
    others = np.delete(window, width, axis=2)  # step t itself left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(values - np.nanmedian(others, axis=2), nan=0.0)


def rank_z(values: np.ndarray, nonfinite: np.ndarray) -> np.ndarray:
    """Robust z [T, N] for one metric: +inf where a rank was non-finite while a peer was not,
    NaN where undefined (including steps where every rank was non-finite: nobody stands out)."""
    n = values.shape[1]
    if n < 2:
        return np.full(values.shape, np.nan)
    z = cross_rank_z(values) if n >= 3 else pair_z(values)
    alone = nonfinite & ~nonfinite.all(axis=1, keepdims=True)
    return np.where(alone, np.inf, z)


def method_for(world_size: int) -> str:
    if world_size >= 3:
        return f"cross-rank median; scale: leave-one-out MAD over steps t±{LOCAL_STEPS}"
    if world_size == 2:
        return f"N=2: pair-difference z over steps t±{PAIR_STEPS}, given to the rank that moved"
    return "none: world size 1"


def _event(step: int, metric: str, z: float) -> Row:
    finite = math.isfinite(z)
    return {"step": step, "metric": metric, "z": z if finite else None, "nonfinite": not finite}


def attribute(rows: Sequence[Row], threshold: float = DEFAULT_THRESHOLD) -> Row:
    """Per-rank first step / peak above ``threshold`` and the most anomalous rank (or None).

    Returns ``{"method", "threshold", "ranks": [...], "outlier"}``: ``ranks[r]`` holds ``first``
    (the first step rank r stood out, with the metric and z that made it) and ``peak`` (its
    largest |z| over the run); ``outlier`` is the rank with the largest peak |z|, reported with
    its first step — or None when no rank ever exceeds the threshold.
    """
    tables = {m: metric_table(rows, m) for m in METRICS}
    world_size = max((t[1].shape[1] for t in tables.values()), default=0)
    per_rank: list[Row] = [{"rank": r, "first": None, "peak": None, "steps_flagged": 0} for r in range(world_size)]
    flagged: list[set[int]] = [set() for _ in range(world_size)]
    events: list[tuple[int, int, str, float]] = []  # (step, rank, metric, z) above threshold
    for metric, (steps, values, nonfinite) in tables.items():
        if not steps:
            continue
        z = rank_z(comparable(values, metric), nonfinite)
        for t, step in enumerate(steps):
            for r in range(z.shape[1]):
                zr = float(z[t, r])
                if math.isnan(zr):
                    continue
                peak = per_rank[r]["peak"]
                if peak is None or abs(zr) > _abs_z(peak):
                    per_rank[r]["peak"] = _event(step, metric, zr)
                if abs(zr) > threshold:
                    events.append((step, r, metric, zr))
    for step, r, metric, zr in sorted(events, key=lambda e: (e[0], -abs(e[3]))):
        flagged[r].add(step)
        if per_rank[r]["first"] is None:
            per_rank[r]["first"] = _event(step, metric, zr)
    for r in range(world_size):
        per_rank[r]["steps_flagged"] = len(flagged[r])
    candidates = [p for p in per_rank if p["first"] is not None]
    outlier = None
    if candidates:
        worst = max(candidates, key=lambda p: (_abs_z(p["peak"]), -p["first"]["step"]))
        outlier = {"rank": worst["rank"], **worst["first"], "peak": worst["peak"],
                   "steps_flagged": worst["steps_flagged"]}
    return {"method": method_for(world_size), "threshold": threshold, "ranks": per_rank, "outlier": outlier}


def _abs_z(event: Row) -> float:
    return math.inf if event["nonfinite"] else abs(event["z"])


def describe(attribution: Row) -> str:
    """One line for the terminal, e.g. ``rank 2 at step 12 (grad_norm, z=+512)``."""
    o = attribution.get("outlier")
    if o is None:
        return f"none above |z|={attribution['threshold']:g} ({attribution['method']})"
    text = f"rank {o['rank']} at step {o['step']} ({o['metric']}, {_z_text(o)})"
    peak = o["peak"]
    if (peak["step"], peak["metric"]) != (o["step"], o["metric"]):
        text += f"; peak {peak['metric']} {_z_text(peak)} at step {peak['step']}"
    if o["steps_flagged"] > 1:
        text += f"; stood out at {o['steps_flagged']} steps"
    return text


def _z_text(event: Row) -> str:
    if event["nonfinite"]:
        return "non-finite"
    if abs(event["z"]) >= NO_SPREAD_Z:
        return "differs from bit-identical ranks: no spread to compare against"
    return f"z={event['z']:+.3g}"
