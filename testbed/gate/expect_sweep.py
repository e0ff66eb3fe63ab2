"""Expectations over a sweep (``testbed sweep``): every level's own checks, and whether
dispersion grows along the ladder (``dispersion_increases``).

Reads the sweep record contract: ``SWEEP_DIR/sweep.json`` =
``{"scenario", "source", "parameter", "levels": [{"index", "label", "value", "run_dir", "status"}]}``
with ``run_dir`` relative to ``SWEEP_DIR``; levels are compared in ``index`` order.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from testbed.scenario.expect import BOUNDED_METRICS, Expectations
from testbed.gate.checks import Finding, RunData, evaluate, series, statistic
from testbed.record.files import read_sweep


def load_sweep(sweep_dir: Path) -> list[tuple[str, RunData | None, str]]:
    """``(label, run or None, status)`` per level of a ``sweep.json`` (validated: each ``run_dir``
    stays inside the sweep directory), in level-index order."""
    record = read_sweep(Path(sweep_dir))
    out = []
    for level in sorted(record["levels"], key=lambda lv: lv["index"]):
        run_dir = Path(sweep_dir) / level["run_dir"]
        out.append((level["label"], RunData.load(run_dir) if run_dir.is_dir() else None, level["status"]))
    return out


def evaluate_sweep(exp: Expectations, sweep_dir: Path) -> list[Finding]:
    """Per-level expectations (prefixed with the level) and the across-level dispersion order."""
    try:
        levels = load_sweep(sweep_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Finding("sweep", False, f"unreadable sweep record in {sweep_dir}: {type(e).__name__}: {e}")]
    findings: list[Finding] = []
    per_level = replace(exp, dispersion_increases=(), metrics_equal_to=None)
    usable: list[tuple[str, RunData]] = []
    for label, run, status in levels:
        if run is None or status != "ok":
            findings.append(Finding("sweep", False, f"level {label}: status {status}"
                                    + ("" if run is not None else ", no run directory"), level=label))
        if run is not None:
            findings += [replace(f, level=label, message=f"level {label}: {f.message}")
                         for f in evaluate(per_level, run)]
            if status == "ok" and run.ok:
                usable.append((label, run))
    for metric in exp.dispersion_increases:
        findings.append(_check_increasing(metric, usable, exp))
    return findings


def _check_increasing(metric: str, levels: Sequence[tuple[str, RunData]], exp: Expectations) -> Finding:
    check = f"dispersion_increases.{metric}"
    higher = BOUNDED_METRICS[metric]
    values = []
    for label, run in levels:
        points = series(run.rows, metric, exp.warmup_steps)
        if points:
            values.append((label, statistic(points, exp.statistic, "max" if higher else "min")[0]))
    if len(values) < 2:
        return Finding(check, False, f"fewer than two levels with finite {metric} values", metric)
    sign = 1.0 if higher else -1.0
    text = ", ".join(f"{lab}: {v:.4g}" for lab, v in values)
    for (la, va), (lb, vb) in zip(values, values[1:]):
        if sign * (vb - va) < -exp.dispersion_slack:
            moved = "falls" if higher else "rises"
            return Finding(check, False, f"{metric} {exp.statistic} {moved} from level {la} to "
                           f"{lb} beyond slack {exp.dispersion_slack:g} ({text})", metric, vb, va, level=lb)
    if sign * (values[-1][1] - values[0][1]) <= 0:
        return Finding(check, False, f"{metric} is no more dispersed at the last level than the first ({text})",
                       metric, values[-1][1], values[0][1], level=values[-1][0])
    return Finding(check, True, f"{metric} {exp.statistic} more dispersed level by level ({text})", metric)
