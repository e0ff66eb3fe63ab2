"""Baselines: summary values of past good runs, committed as JSON, compared with tolerances.

The file pins behaviour: a value that moves beyond its tolerance — either way, unless the metric's
tolerance says ``"fail_if": "higher"`` or ``"lower"`` — fails the gate, because in a CI gate an
unexplained change in worker disagreement is the signal, and a wanted change is re-recorded with
``testbed gate --update-baseline`` and reviewed in the diff. Format::

    {"format": "testbed-baseline/1",
     "tolerances": {"default": {"abs": 1e-6, "rel": 0.05}, "loss_cv": {"abs": 0.005, "rel": 0.25}, ...},
     "scenarios": {"control": {"source": "scenarios/control.toml",
                               "values": {"loss_cv.mean": 0.0194, "weights_in_sync": true, ...},
                               "tolerances": {"loss_cv.peak": {"abs": 0.02}}}}}

A tolerance is looked up by the full key (``loss_cv.peak``), then the metric (``loss_cv``), then
``default``; a scenario's own ``tolerances`` win over the file-wide ones. A value is within
tolerance when ``|current - baseline| <= abs + rel * |baseline|``; booleans must be equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from testbed.scenario.expect import BOUNDED_METRICS
from testbed.gate.checks import RunData, series, statistic
from testbed.record.files import read_json, write_json_atomic
from testbed.schema.records import BASELINE_FORMAT, FAIL_IF, FieldProblem, check_baseline

FORMAT = BASELINE_FORMAT
#: metrics whose mean and peak (after the warm-up) are recorded
BASELINE_METRICS = ("loss_cv", "grad_norm_cv", "cos_mean", "pairwise_cos_mean")
DEFAULT_TOLERANCES: dict[str, dict[str, Any]] = {
    "default": {"abs": 1e-6, "rel": 0.05},
    "loss_cv": {"abs": 0.005, "rel": 0.25},
    "grad_norm_cv": {"abs": 0.01, "rel": 0.25},
    "cos_mean": {"abs": 0.03, "rel": 0.0},
    "pairwise_cos_mean": {"abs": 0.03, "rel": 0.0},
    "global_loss": {"abs": 0.01, "rel": 0.02},
    "nonfinite": {"abs": 0, "rel": 0, "fail_if": "higher"},
}


class BaselineError(ValueError):
    """The baseline file is missing or malformed (a usage error, exit 2)."""


@dataclass(frozen=True)
class Tolerance:
    abs: float = 0.0
    rel: float = 0.0
    fail_if: str = "either"

    def allowed(self, base: float) -> float:
        return self.abs + self.rel * abs(base)


@dataclass(frozen=True)
class Deviation:
    """One baseline comparison; ``passed`` False = a regression."""

    key: str
    passed: bool
    baseline: Any
    current: Any
    allowed: float | None = None
    message: str = ""

    @property
    def change(self) -> str:
        if isinstance(self.baseline, bool) or isinstance(self.current, bool) or self.current is None \
                or self.baseline is None:
            return f"{self.baseline} -> {self.current}"
        delta = self.current - self.baseline
        rel = f" ({delta / abs(self.baseline):+.0%})" if self.baseline else ""
        return f"{delta:+.4g}{rel}"


def run_values(run: RunData, warmup_steps: int = 0) -> dict[str, Any]:
    """The values a baseline records for one run (statistics after the warm-up, as expectations use)."""
    out: dict[str, Any] = {}
    for metric in BASELINE_METRICS:
        points = series(run.rows, metric, warmup_steps)
        if points:
            worse = "max" if BOUNDED_METRICS[metric] else "min"
            out[f"{metric}.mean"] = statistic(points, "mean", worse)[0]
            out[f"{metric}.peak"] = statistic(points, "peak", worse)[0]
    final = series(run.rows, "global_loss", 0)
    if final:
        out["global_loss.final"] = final[-1][1]
    checks = [r["weights_in_sync"] for r in run.rows if isinstance(r.get("weights_in_sync"), bool)]
    if checks:
        out["weights_in_sync"] = all(checks)
    out["nonfinite"] = sum(1 for r in run.rows for f in r.get("flags") or []
                           if str(f.get("kind", "")).startswith("nonfinite"))
    return out


def load(path: Path) -> dict[str, Any]:
    """The baseline file, validated (``schema.records.check_baseline``) before any scenario runs:
    a regular file, strict JSON (no NaN / Infinity: an ``"abs": Infinity`` tolerance passed
    anything), finite values and tolerances. BaselineError (one line) otherwise."""
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file (create it with --update-baseline)") from None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BaselineError(f"{path}: not a readable JSON baseline ({why})") from None
    try:
        return check_baseline(data)
    except FieldProblem as e:
        raise BaselineError(f"{path}: {e.field}: expected {e.expected}"
                            + (f", got {_shown(e.got)}" if e.got is not ... else "")) from None


def _shown(value: Any) -> str:
    from testbed.record.files import dumps
    from testbed.schema.records import printable

    try:
        text = dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = printable(text)
    return text[:80] + "..." if len(text) > 80 else text


def tolerance(data: Mapping[str, Any], scenario: str, key: str) -> Tolerance:
    """The most specific tolerance for ``key`` (e.g. ``"3/loss_cv.mean"`` in a sweep) of a scenario."""
    metric = key.rsplit("/", 1)[-1].split(".")[0]
    local = data.get("scenarios", {}).get(scenario, {}).get("tolerances", {})
    file_wide = data.get("tolerances", DEFAULT_TOLERANCES)
    for table in (local, file_wide):
        for k in (key, key.rsplit("/", 1)[-1], metric):
            if k in table:
                return Tolerance(**table[k])
    return Tolerance(**file_wide.get("default", DEFAULT_TOLERANCES["default"]))


def compare(data: Mapping[str, Any], scenario: str, current: Mapping[str, Any]) -> list[Deviation]:
    """Every recorded value of ``scenario`` against ``current``; a key missing now is a regression."""
    entry = data["scenarios"].get(scenario)
    if entry is None:
        return [Deviation("<baseline>", False, None, None,
                          message=f"no baseline entry for {scenario!r} (record one with --update-baseline)")]
    out = []
    for key, base in sorted(entry["values"].items()):
        cur = current.get(key)
        if isinstance(base, bool) or isinstance(cur, bool):
            ok = base == cur
            out.append(Deviation(key, ok, base, cur, None, "" if ok else f"{key} was {base}, now {cur}"))
            continue
        if cur is None or not isinstance(cur, (int, float)) or not math.isfinite(cur):
            out.append(Deviation(key, False, base, cur, None, f"{key} missing or non-finite now (was {base:.6g})"))
            continue
        tol = tolerance(data, scenario, key)
        delta, allowed = cur - base, tol.allowed(base)
        bad = (abs(delta) > allowed and (tol.fail_if == "either" or (tol.fail_if == "higher") == (delta > 0)))
        msg = (f"{key} {base:.6g} -> {cur:.6g} ({delta:+.3g}; allowed ±{allowed:.3g}"
               + (f", fails if {tol.fail_if})" if tol.fail_if != "either" else ")"))
        out.append(Deviation(key, not bad, base, cur, allowed, msg))
    return out


def updated(data: Mapping[str, Any] | None, records: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """A new baseline: ``records`` (name → (source, values)) replace those entries, others stay;
    tolerances already in the file (file-wide and per scenario) are kept."""
    out: dict[str, Any] = {"format": FORMAT, "tolerances": dict(DEFAULT_TOLERANCES), "scenarios": {}}
    if data:
        out["tolerances"] = dict(data.get("tolerances", DEFAULT_TOLERANCES))
        out["scenarios"] = {k: dict(v) for k, v in data.get("scenarios", {}).items()}
    for name, (source, values) in records.items():
        entry = out["scenarios"].setdefault(name, {})
        entry["source"], entry["values"] = source, dict(sorted(values.items()))
    out["scenarios"] = dict(sorted(out["scenarios"].items()))
    return out


def save(path: Path, data: Mapping[str, Any]) -> None:
    write_json_atomic(Path(path), data)
