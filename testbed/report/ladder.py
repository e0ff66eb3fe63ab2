"""A sweep's ladder: every level against level 0, paired per step, with 95 % CIs, and the trend test.

The numbers are the sweep's own (``sweep.json["comparison"]``, written by ``engine/control.py`` with
``diagnose/paired.py``): per level and metric the mean of the per-step differences from level 0
and its 95 % CI (moving-block bootstrap over steps); per metric Spearman's ρ of the level with the
level's mean and its permutation p-value, one-sided in the direction the metric moves as ranks
disagree more (dispersion rises, cosines fall: ``paired.EXPECTED``). A sweep recorded without a
comparison (an older one) gets it computed here, from the rows the report holds (every row of a
short record; bucket means of a long one: the figure says which).

A recorded comparison is user data: a value that is not a finite number, or a CI that is not two of
them, is left out (drawn as missing), never trusted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from testbed.diagnose.paired import EXPECTED, compare_rows, series, trend_test
from testbed.report.load import SweepData
from testbed.report.plotting import plain_text, save, shorten, wrap

PANELS: tuple[tuple[str, str], ...] = (
    ("loss_cv", "loss CV over ranks"),
    ("grad_norm_cv", "grad-norm CV over ranks"),
    ("cos_mean", "mean cos(g_i, mean g)"),
)
WORDS = {"increasing": "rises", "decreasing": "falls"}


@dataclass(frozen=True)
class Paired:
    mean: float
    ci: tuple[float, float] | None
    p_value: float | None

    @property
    def clear_of_zero(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


@dataclass
class Ladder:
    """The comparison of one sweep, by metric; ``paired[metric][k]`` for the k-th level with a record
    (None for level 0 and for levels the comparison lacks)."""

    against: str
    labels: list[str]
    paired: dict[str, list[Paired | None]] = field(default_factory=dict)
    trend: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "recorded by the sweep"


def ladder_of(sweep: SweepData) -> Ladder | None:
    """The sweep's comparison (recorded, else computed from the report's rows); None with < 2 levels."""
    if len(sweep.runs) < 2:
        return None
    raw = [str(r.level.get("label", r.label)) for r in sweep.runs]
    labels = [r.label for r in sweep.runs]
    recorded = sweep.comparison if isinstance(sweep.comparison, Mapping) else None
    if recorded is None or not isinstance(recorded.get("per_level"), Mapping):
        return _computed(sweep, labels)
    ladder = Ladder(labels[0], labels)
    per_level = recorded["per_level"]
    for metric, _ in PANELS:
        ladder.paired[metric] = [None] + [_paired((per_level.get(key) or {}).get(metric)
                                                  if isinstance(per_level.get(key), Mapping) else None)
                                          for key in raw[1:]]
    trends = recorded.get("trend") if isinstance(recorded.get("trend"), Mapping) else {}
    ladder.trend = {m: dict(t) for m, t in trends.items() if isinstance(t, Mapping)}
    return ladder


def _computed(sweep: SweepData, labels: list[str]) -> Ladder:
    sampled = any(r.sampling.get("plot_stride", 1) > 1 for r in sweep.runs)
    ladder = Ladder(labels[0], labels, source="computed by the report from " + (
        "bucket means of the drawn rows (a long record)" if sampled else "every recorded row"))
    metrics = [m for m, _ in PANELS]
    base = sweep.runs[0].rows
    compared = [compare_rows(run.rows, base, metrics) for run in sweep.runs[1:]]
    for metric in metrics:
        ladder.paired[metric] = [None] + [_paired(c.get(metric)) for c in compared]
        means = [float(np.mean(list(s.values()))) for run in sweep.runs if (s := series(run.rows, metric))]
        if len(means) >= 2:
            ladder.trend[metric] = trend_test(means, metric=metric)
    return ladder


def _paired(entry: Any) -> Paired | None:
    if not isinstance(entry, Mapping) or _finite(entry.get("mean")) is None:
        return None
    ci = entry.get("ci")
    bounds = tuple(_finite(v) for v in ci) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    return Paired(float(entry["mean"]), bounds if None not in bounds else None, _finite(entry.get("p_value")))


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def trend_text(metric: str, trend: Mapping[str, Any] | None) -> str:
    """``trend: ρ = +1.00, p(rises) = 0.0083 (5 levels)`` in the direction the trend was tested."""
    if not trend:
        return "trend: not tested"
    direction = str(trend.get("direction") or EXPECTED.get(metric, "two-sided"))
    word = WORDS.get(direction, "changes")
    rho, p = _finite(trend.get("rho")), _finite(trend.get("p"))
    levels = trend.get("levels")
    if p is None:
        return f"trend: ρ = {rho:+.2f}, too few levels for a p-value" if rho is not None else "trend: not tested"
    return f"trend: ρ = {rho:+.2f}, p({word}) = {p:.2g}" + (f" ({levels} levels)" if isinstance(levels, int) else "")


def level_axis(sweep: SweepData) -> tuple[list[float], list[str], str]:
    """x positions, tick labels and axis label of the levels: numeric values as they are; rank
    lists (a ladder over which ranks are perturbed) by their length; otherwise the level index."""
    values = [run.level.get("value") for run in sweep.runs]
    labels = [shorten(run.label, 24) for run in sweep.runs]
    name = sweep.parameter or "level"
    sizes = [len(v) for v in values if isinstance(v, list)]
    if len(sizes) == len(values) and len(set(sizes)) == len(sizes):
        return [float(n) for n in sizes], [f"{n}\n({lab})" for n, lab in zip(sizes, labels)], \
            f"number of ranks in {name}"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) == len(values):
        return [float(v) for v in values], labels, name
    return [float(run.level["index"]) for run in sweep.runs], labels, f"{name} (level)"


@plain_text
def ladder_figure(ladder: Ladder, positions: Sequence[float], ticks: Sequence[str], xlabel: str, path: Path,
                  title: str) -> Path:
    """One panel per dispersion metric: each level's mean paired difference from level 0 with its
    95 % CI (filled: the CI excludes 0), level 0 at 0, the trend test in the panel's title."""
    fig = Figure(figsize=(13.0, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    x = np.asarray(positions, dtype=float)
    for ax, (metric, label) in zip(axes, PANELS):
        ax.axhline(0.0, color="0.5", lw=1.0)
        ax.plot([x[0]], [0.0], marker="s", ms=7, color="0.3", ls="none")
        for k, paired in enumerate(ladder.paired.get(metric, [])):
            if paired is None:
                continue
            err = None if paired.ci is None else [[max(paired.mean - paired.ci[0], 0.0)],
                                                   [max(paired.ci[1] - paired.mean, 0.0)]]
            ax.errorbar([x[k]], [paired.mean], yerr=err, marker="o", ms=7, capsize=5, lw=1.6, color="C0",
                        mfc="C0" if paired.clear_of_zero else "white")
        up = EXPECTED.get(metric) == "increasing"
        ax.set_ylabel(f"difference from level 0, paired per step\n({'↑' if up else '↓'} = ranks disagree more)",
                      fontsize=9)
        ax.set_title(f"{label}\n{trend_text(metric, ladder.trend.get(metric))}", fontsize=10)
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel(shorten(xlabel, 50), fontsize=9)
        ax.grid(alpha=0.3)
    note = (f"each level against level 0 ({ladder.against}): dot, the mean over steps of the per-step difference; "
            "bar, its 95 % CI (moving-block bootstrap); hollow, the CI holds 0; grey square: level 0. "
            f"Trend: Spearman ρ of the level with its mean, one-sided permutation p. Comparison {ladder.source}.")
    fig.suptitle(wrap(f"{title}\n{note}", fig.get_figwidth() - 0.4, 10), fontsize=10)
    return save(fig, path)
