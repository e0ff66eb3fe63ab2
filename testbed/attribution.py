"""Outlier-rank attribution: which rank stood out, in which metric, and from which step.

Dispersion metrics say *that* ranks disagree; this module says *who*. For every recorded step and
each per-rank metric (``loss``, ``grad_norm``, ``cos_to_mean``) every rank gets a robust z-score,
and a rank "stands out" at a step when ``|z| > threshold`` in any metric. Post-hoc analysis of the
recorded rows (pure: no torch, no processes), so it may look at the whole run.

N ≥ 3 — cross-rank median / MAD per step::

    z_i(t) = (x_i(t) − median_j x_j(t)) / max(1.4826·MAD_j x_j(t),  typical,  floor)

``typical`` is the median over the run of the per-step ``1.4826·MAD``. With 3–8 ranks a step's
MAD can be tiny by chance, and the MAD alone would then turn ordinary worker disagreement into
large z; the run's typical spread is the floor under it. ``floor`` (1e-12 × max(1, |median|))
only matters when ranks are bit-identical (MAD 0 throughout): then any difference is an anomaly
and its z is correspondingly huge.

N = 2 — the cross-rank MAD is degenerate: the median is the midpoint, both ranks sit exactly the
same distance from it, and neither can be singled out at one step. So two things are combined:
(1) *when*: the pair difference ``Δ(t) = x_1(t) − x_0(t)`` as a robust z over the run's own
history, ``z_Δ(t) = (Δ(t) − median_t Δ) / max(1.4826·MAD_t Δ, floor)``; (2) *who*: each rank's
move against its own neighbouring steps, ``e_i(t) = x_i(t) − median(x_i over t±3, t excluded)``.
The disagreement is given to the ranks in proportion to how far each moved:
``z_1 = z_Δ·|e_1|/max|e|``, ``z_0 = −z_Δ·|e_0|/max|e|`` (both get ``±z_Δ`` when neither moved:
ambiguous). Consequence: with two ranks only *transient* anomalies are attributable; a constant
offset between the two (e.g. label noise on one rank from step 0) is, by construction, the
run's normal and is not flagged — a control run is needed to call it.

N = 1 — nothing to compare: no attribution (``method`` says so).

Loss and gradient norm are compared as ``log(x)`` when all their values in the run are positive:
their scale drifts over training (the mean grad norm of a 4-rank shuffle_desync_1 run grew 2.9×
in 40 steps), so an absolute "typical MAD" from the early steps would turn ordinary late-run
spread into large z; in log space a deviation is a ratio and one typical spread serves the whole
run. Cosines stay linear.

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
# Why 10 and not the usual 3.5: with few ranks the null distribution has heavy tails. Largest |z|
# measured on 7 runs of 40 steps where no rank is anomalous by construction (control on 2 ranks,
# control_4rank, shuffle_desync_1, 4 levels of a shuffle-desync ladder on 4 ranks): 8.16 (a
# cosine; 7.97 for loss on 2 ranks). Gaussian per-rank values, 100k simulated steps:
# P(|z| > 10) = 3e-6 per rank-step for N = 3, none seen for N = 2, 4, 8; Student-t(3) values on
# 4 ranks: 1.3e-3. A ×10 gradient corruption on 1 of 4 ranks scores 26 (log grad norm).
# A pointer for where to look, not a verdict.
DEFAULT_THRESHOLD = 10.0
MAD_TO_SIGMA = 1.4826  # MAD × this estimates σ for normal data
NEIGHBOURS = 3  # N = 2: steps on each side that define a rank's own recent values
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


def cross_rank_z(values: np.ndarray) -> np.ndarray:
    """N ≥ 3: per-step median / MAD z, with the run's typical MAD as the floor (module doc)."""
    with warnings.catch_warnings():  # an all-undefined step (e.g. every cosine None) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(values, axis=1, keepdims=True)
        mad = MAD_TO_SIGMA * np.nanmedian(np.abs(values - center), axis=1, keepdims=True)
    defined = mad[np.isfinite(mad)]
    typical = float(np.median(defined)) if defined.size else 0.0
    scale = np.maximum(np.maximum(np.nan_to_num(mad, nan=0.0), typical), _floor(np.nan_to_num(center)))
    return (values - center) / scale


def pair_z(values: np.ndarray) -> np.ndarray:
    """N = 2: history z of the pair difference, shared out by each rank's own move (module doc)."""
    delta = values[:, 1] - values[:, 0]
    ok = np.isfinite(delta)
    z = np.full(values.shape, np.nan)
    if not ok.any():
        return z
    center = float(np.median(delta[ok]))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(delta[ok] - center))), float(_floor(center)))
    z_delta = (delta - center) / scale
    moves = np.abs(own_history_moves(values))
    biggest = np.nanmax(moves, axis=1)
    with np.errstate(all="ignore"):
        share = np.where(biggest[:, None] > 0, moves / biggest[:, None], 1.0)
    z[:, 1] = z_delta * share[:, 1]
    z[:, 0] = -z_delta * share[:, 0]
    return z


def own_history_moves(values: np.ndarray, width: int = NEIGHBOURS) -> np.ndarray:
    """``x_i(t) −`` the median of rank i's values at the ``width`` steps either side of t."""
    t_count = values.shape[0]
    out = np.zeros_like(values)
    for t in range(t_count):
        window = np.r_[max(0, t - width):t, t + 1:min(t_count, t + width + 1)]
        if window.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[t] = values[t] - np.nanmedian(values[window], axis=0)
    return np.nan_to_num(out, nan=0.0)


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
        return "cross-rank median/MAD per step (floor: the run's typical MAD)"
    if world_size == 2:
        return "N=2: pair-difference z over the run, attributed by each rank's own move"
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
    return "non-finite" if event["nonfinite"] else f"z={event['z']:+.3g}"
