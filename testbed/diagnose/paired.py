"""Paired comparison of a run with its control, and a trend test over the levels of a sweep.

Why paired: a perturbed run and the same scenario with its perturbations removed share seeds, so
at every step the unperturbed ranks see identical data and most of a dispersion metric's
step-to-step variation (the batch, the phase of training) is common to both. The per-step
difference d_t = perturbed_t − control_t removes it; what is left is the perturbation's effect.

- CI of the mean difference: a moving-block bootstrap over steps (percentile interval; blocks of
  ≈ √T steps keep the serial correlation of training), stated as ``method`` in the result.
- p-value: a sign-flip test of mean(d) = 0 (each step's difference flipped independently; exact
  when the differences are symmetric about 0 and independent across steps, approximate under
  serial correlation — the bootstrap CI is the number to read then).
- Trend over sweep levels: Spearman's ρ between the level index and each level's mean, with an
  exact permutation p-value (all orderings for ≤ 8 levels, Monte-Carlo beyond), tested in the
  direction the metric is expected to move as ranks disagree more (``EXPECTED``): loss and
  grad-norm dispersion rise (ρ > 0), cosines fall (ρ < 0); a metric without an expected direction
  is tested two-sided. (Testing a falling ``cos_mean`` for a rise gave "ρ = −1.00, p(rises) = 1".)

Pure numpy; the inputs are recorded rows (``metrics.jsonl``) or plain arrays.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

#: dispersion metrics compared (step rows' scalar fields; METRICS.md)
DISPERSION = ("loss_cv", "grad_norm_cv", "cos_mean", "cos_min", "loss_std", "grad_norm_std")
#: the direction each metric moves as the ranks disagree more (trend tests are one-sided that way)
EXPECTED = {"loss_cv": "increasing", "grad_norm_cv": "increasing", "loss_std": "increasing",
            "grad_norm_std": "increasing", "cos_mean": "decreasing", "cos_min": "decreasing",
            "pairwise_cos_mean": "decreasing"}
DIRECTIONS = ("increasing", "decreasing", "two-sided")
METHOD = "moving-block bootstrap over steps (percentile), sign-flip p-value"


def series(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """step → finite value of ``metric`` (rows without it, or non-finite, are left out)."""
    out: dict[int, float] = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
            out[int(row["step"])] = float(value)
    return out


def paired_difference(diff: Sequence[float] | np.ndarray, *, confidence: float = 0.95, draws: int = 4000,
                      seed: int = 0) -> dict[str, Any]:
    """Mean of per-step paired differences, its block-bootstrap CI and a sign-flip p-value.

    Returns ``{"n", "mean", "ci": [lo, hi], "confidence", "p_value", "method"}``; with fewer than
    two steps the CI and p-value are ``None`` (nothing to resample).
    """
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else None, "ci": None,
                           "confidence": confidence, "p_value": None, "method": METHOD}
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    block = max(1, int(round(math.sqrt(n))))
    starts = rng.integers(0, n - block + 1, size=(draws, -(-n // block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(draws, -1)[:, :n]
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    out["ci"] = [float(lo), float(hi)]
    observed = abs(d.mean())
    if np.all(d == 0):
        out["p_value"] = 1.0
    elif n <= 16:  # exact: all 2^n sign patterns
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
        out["p_value"] = float(np.mean(np.abs(signs @ d) / n >= observed - 1e-12 * max(1.0, observed)))
    else:
        signs = rng.choice((-1.0, 1.0), size=(draws, n))
        hits = np.sum(np.abs(signs @ d) / n >= observed - 1e-12 * max(1.0, observed))
        out["p_value"] = float((hits + 1) / (draws + 1))
    return out


def compare_rows(perturbed: Sequence[Mapping[str, Any]], control: Sequence[Mapping[str, Any]],
                 metrics: Sequence[str] = DISPERSION, **kw: Any) -> dict[str, dict[str, Any]]:
    """metric → ``paired_difference`` over the steps both records have (perturbed − control)."""
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        a, b = series(perturbed, metric), series(control, metric)
        steps = sorted(set(a) & set(b))
        if steps:
            out[metric] = paired_difference([a[s] - b[s] for s in steps], **kw)
            out[metric].update(perturbed_mean=float(np.mean([a[s] for s in steps])),
                               control_mean=float(np.mean([b[s] for s in steps])))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties: mean rank
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (ties get mean ranks); 0 when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def trend_test(values: Sequence[float], *, metric: str | None = None, direction: str | None = None,
               draws: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Does ``values`` (one per level, in level order) move with the level? Spearman ρ, permutation p.

    ``direction``: ``increasing`` / ``decreasing`` (one-sided) or ``two-sided``; by default the
    ``metric``'s expected direction (``EXPECTED``), two-sided for a metric without one. ``p`` is the
    p-value in that direction; ``p_increasing``, ``p_decreasing`` and ``p_two_sided`` are all given.
    Exact enumeration for ≤ 8 levels. Fewer than 3 levels: the p-values are None.
    """
    direction = direction or EXPECTED.get(metric or "", "two-sided")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    v = np.asarray(values, dtype=float)
    k = len(v)
    levels = np.arange(k, dtype=float)
    rho = spearman(levels, v) if k >= 2 else 0.0
    out: dict[str, Any] = {"levels": k, "rho": rho, "direction": direction, "p": None, "p_increasing": None,
                           "p_decreasing": None, "p_two_sided": None,
                           "method": "Spearman rank correlation with the level index, permutation p-value"}
    if k < 3 or not np.all(np.isfinite(v)):
        return out
    rx = _ranks(levels) - (k - 1) / 2
    ry = _ranks(v)
    ry = ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    if denom == 0:
        out.update(p=1.0, p_increasing=1.0, p_decreasing=1.0, p_two_sided=1.0)
        return out
    if k <= 8:  # exact: every ordering of the levels' ranks
        orders = np.array(list(itertools.permutations(range(k))))
        null, extra, total = ry[orders] @ rx / denom, 0, math.factorial(k)
    else:
        rng = np.random.default_rng(seed)
        orders = np.argsort(rng.random((draws, k)), axis=1)
        null, extra, total = ry[orders] @ rx / denom, 1, draws + 1
    eps = 1e-12
    out["p_increasing"] = float((np.sum(null >= rho - eps) + extra) / total)
    out["p_decreasing"] = float((np.sum(null <= rho + eps) + extra) / total)
    out["p_two_sided"] = float((np.sum(np.abs(null) >= abs(rho) - eps) + extra) / total)
    out["p"] = out[{"increasing": "p_increasing", "decreasing": "p_decreasing", "two-sided": "p_two_sided"}[direction]]
    return out


def trend_line(metric: str, trend: Mapping[str, Any]) -> str:
    """One line of a sweep's trend: ρ and the p-value in the direction tested."""
    p = "-" if trend.get("p") is None else f"{trend['p']:.3g}"
    word = {"increasing": "rises", "decreasing": "falls"}.get(trend.get("direction", ""), "changes")
    return f"  {metric:<14} ρ = {trend['rho']:+.2f}  p({word}) = {p}  ({trend['levels']} levels)"


def format_comparison(comparison: Mapping[str, Mapping[str, Any]], title: str = "vs control") -> str:
    """Plain lines: metric, perturbed and control means, mean paired difference [CI], p."""
    lines = [f"{title} (paired per step; {METHOD}):",
             f"  {'metric':<14}{'run':>11}{'control':>11}{'diff':>11}  {'95% CI':<24}{'p':>8}"]
    for metric, c in comparison.items():
        ci = "-" if c.get("ci") is None else f"[{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]"
        p = "-" if c.get("p_value") is None else f"{c['p_value']:.3g}"
        lines.append(f"  {metric:<14}{c.get('perturbed_mean', float('nan')):>11.4g}"
                     f"{c.get('control_mean', float('nan')):>11.4g}{c['mean']:>+11.3g}  {ci:<24}{p:>8}")
    return "\n".join(lines)
