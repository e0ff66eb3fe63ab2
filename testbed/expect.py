"""Expectations: the ``[expect]`` table of a scenario, validated, and checked against a run.

A scenario states what a healthy (or a deliberately broken) job must show, so that the gate and
the pytest plugin can fail a build when a change to the training stack moves it. Keys:

- ``max_<metric>`` / ``min_<metric>``: a bound on one per-step metric (``loss_cv``,
  ``grad_norm_cv``, ``cos_mean``, ... see ``BOUNDED_METRICS``). The value is a number, or a table
  ``{ limit = 0.05, statistic = "peak" }``.
- ``statistic``: what a bound is compared with — ``"mean"`` (default: the mean over measured steps
  at or after ``warmup_steps``, robust to a single noisy step), ``"peak"`` (the worst value after
  the warm-up in the bound's direction: the largest for ``max_``, the smallest for ``min_``) or
  ``"final"`` (the last measured step).
- ``warmup_steps`` (default 0): steps before this are ignored by bounds and sweep checks.
- ``weights_in_sync``: true → every weight check must agree; false → a divergence must be seen.
- ``no_nonfinite`` (default **true**): a NaN/Inf flag or event on any rank is a failure.
- ``run_status`` (default ``"ok"``): ``"failed"`` for fault scenarios whose run must fail, with
  optionally ``failed_rank``, the rank the failure report must name. Otherwise a failed run fails.
- ``metrics_equal_to``: another scenario file (relative to this one) whose ``metrics.jsonl``
  must be identical row for row (invariance scenarios, e.g. a straggler changes timing only).
- ``dispersion_increases`` (sweeps only): a metric name or list; its statistic must not fall
  (cosines: not rise) from one level to the next by more than ``dispersion_slack`` (absolute,
  default 0), and must be strictly more dispersed at the last level than at the first.

A failed run is always a failed finding; evaluation never raises on odd data (nulls, NaN flags,
missing files) because a gate that crashes tells the reader less than one that says why.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from testbed.record import EVENTS_FILE, RUN_FILE, read_jsonl, read_metrics
from testbed.spec import ScenarioError

#: metrics a bound may name → True when a higher value means *more* dispersion
BOUNDED_METRICS: dict[str, bool] = {
    "loss_cv": True, "loss_std": True, "grad_norm_cv": True, "grad_norm_std": True,
    "cos_mean": False, "cos_min": False, "pairwise_cos_mean": False,
    "global_loss": True, "mean_grad_norm": True, "noise_scale": True,
}
DISPERSION_METRICS = ("loss_cv", "loss_std", "grad_norm_cv", "grad_norm_std", "cos_mean", "cos_min",
                      "pairwise_cos_mean")
STATISTICS = ("mean", "peak", "final")
_PLAIN_KEYS = {"statistic", "warmup_steps", "weights_in_sync", "no_nonfinite", "metrics_equal_to",
               "dispersion_increases", "dispersion_slack", "run_status", "failed_rank"}
Row = dict[str, Any]


@dataclass(frozen=True)
class Bound:
    metric: str
    kind: str  # "max" | "min"
    limit: float
    statistic: str

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.metric}"


@dataclass(frozen=True)
class Expectations:
    bounds: tuple[Bound, ...] = ()
    warmup_steps: int = 0
    statistic: str = "mean"
    weights_in_sync: bool | None = None
    no_nonfinite: bool = True
    metrics_equal_to: Path | None = None
    dispersion_increases: tuple[str, ...] = ()
    dispersion_slack: float = 0.0
    run_status: str = "ok"
    failed_rank: int | None = None


@dataclass(frozen=True)
class Finding:
    """One checked expectation; ``step``/``rank``/``level`` say where, when known."""

    check: str
    passed: bool
    message: str
    metric: str | None = None
    actual: Any = None
    limit: Any = None
    step: int | None = None
    rank: int | None = None
    level: str | None = None


@dataclass(frozen=True)
class RunData:
    """What evaluation reads from a run directory."""

    rows: list[Row]
    events: list[Row] = field(default_factory=list)
    ok: bool = True
    reason: str = ""
    failed_rank: int | None = None
    failed_step: int | None = None

    @staticmethod
    def load(run_dir: Path) -> "RunData":
        run_dir = Path(run_dir)
        try:
            run = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            run = {"status": "failed", "reason": f"no readable {RUN_FILE} in {run_dir} ({e})"}
        return RunData(read_metrics(run_dir), read_jsonl(run_dir / EVENTS_FILE), run.get("status") == "ok",
                       run.get("reason") or "", run.get("failed_rank"), run.get("failed_step"))


# --------------------------------------------------------------------------- validation

def parse_expect(raw: Any, source: str, *, steps: int, pairwise_every: int = 0, weight_check_every: int = 1,
                 has_sweep: bool = False) -> Expectations:
    """Validate an ``[expect]`` table; every problem is a ScenarioError naming ``expect.<key>``."""
    if not isinstance(raw, Mapping):
        raise ScenarioError(source, "expect", "a table", raw)

    def where(key: str) -> str:
        return f"expect.{key}"

    statistic = _choice(raw.get("statistic", "mean"), source, where("statistic"))
    warmup = raw.get("warmup_steps", 0)
    if not _is_int(warmup) or not 0 <= warmup < steps:
        raise ScenarioError(source, where("warmup_steps"), f"an integer in 0..{steps - 1} (steps = {steps})", warmup)
    bounds = []
    for key, value in raw.items():
        if key in _PLAIN_KEYS:
            continue
        kind, _, metric = str(key).partition("_")
        if kind not in ("max", "min") or metric not in BOUNDED_METRICS:
            raise ScenarioError(source, where(str(key)), "no such expectation; known: max_<metric> / min_<metric> "
                                f"with metric in {', '.join(BOUNDED_METRICS)}, or {', '.join(sorted(_PLAIN_KEYS))}")
        if metric == "pairwise_cos_mean" and pairwise_every <= 0:
            raise ScenarioError(source, where(str(key)), "metrics.pairwise_every > 0 (the matrix is off)", value)
        bounds.append(_bound(kind, metric, value, statistic, source, where(str(key))))
    flags = {}
    for key in ("weights_in_sync", "no_nonfinite"):
        if key in raw and not isinstance(raw[key], bool):
            raise ScenarioError(source, where(key), "a boolean (true/false)", raw[key])
        flags[key] = raw.get(key)
    if flags["weights_in_sync"] is not None and weight_check_every <= 0:
        raise ScenarioError(source, where("weights_in_sync"), "metrics.weight_check_every > 0 (weight checks are off)",
                            flags["weights_in_sync"])
    reference = _reference(raw.get("metrics_equal_to"), source, where("metrics_equal_to"), has_sweep)
    increases = _dispersion(raw.get("dispersion_increases", []), source, where("dispersion_increases"),
                            pairwise_every)
    slack = raw.get("dispersion_slack", 0.0)
    if not _is_number(slack) or not math.isfinite(slack) or slack < 0:
        raise ScenarioError(source, where("dispersion_slack"), "a number >= 0", slack)
    status = raw.get("run_status", "ok")
    if status not in ("ok", "failed"):
        raise ScenarioError(source, where("run_status"), "'ok' or 'failed'", status)
    failed_rank = raw.get("failed_rank")
    if failed_rank is not None and (status != "failed" or not _is_int(failed_rank) or failed_rank < 0):
        raise ScenarioError(source, where("failed_rank"), "a rank (integer >= 0), with run_status = 'failed'",
                            failed_rank)
    return Expectations(tuple(bounds), warmup, statistic, flags["weights_in_sync"],
                        True if flags["no_nonfinite"] is None else flags["no_nonfinite"],
                        reference, increases, float(slack), status, failed_rank)


def validate_expect(raw: Any, source: str, *, steps: int, pairwise_every: int, weight_check_every: int,
                    has_sweep: bool) -> dict[str, Any]:
    """For ``spec.parse_scenario``: raise on a bad table, return it unchanged (it stays plain data)."""
    parse_expect(raw, source, steps=steps, pairwise_every=pairwise_every, weight_check_every=weight_check_every,
                 has_sweep=has_sweep)
    return dict(raw)


def expectations_of(scenario: Any) -> Expectations:
    """The parsed expectations of a validated ``Scenario``."""
    return parse_expect(scenario.expect, scenario.source, steps=scenario.steps,
                        pairwise_every=scenario.metrics.pairwise_every,
                        weight_check_every=scenario.metrics.weight_check_every, has_sweep=bool(scenario.sweep))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _choice(value: Any, source: str, where: str) -> str:
    if value not in STATISTICS:
        raise ScenarioError(source, where, "one of " + ", ".join(map(repr, STATISTICS)), value)
    return value


def _bound(kind: str, metric: str, value: Any, statistic: str, source: str, where: str) -> Bound:
    if isinstance(value, Mapping):
        unknown = set(value) - {"limit", "statistic"}
        if unknown or "limit" not in value:
            raise ScenarioError(source, where, "a number or a table { limit = N, statistic = \"mean\" }", value)
        statistic = _choice(value.get("statistic", statistic), source, where + ".statistic")
        value = value["limit"]
    if not _is_number(value) or not math.isfinite(value):
        raise ScenarioError(source, where, "a finite number", value)
    return Bound(metric, kind, float(value), statistic)


def _reference(value: Any, source: str, where: str, has_sweep: bool) -> Path | None:
    if value is None:
        return None
    if has_sweep:
        raise ScenarioError(source, where, "no metrics_equal_to in a sweep scenario", value)
    if not isinstance(value, str) or not value.endswith(".toml"):
        raise ScenarioError(source, where, "a path to another scenario file (*.toml), relative to this one", value)
    path = resolve_relative(value, source)
    if not path.is_file():
        raise ScenarioError(source, where, f"an existing scenario file (looked for {path})", value)
    return path


def resolve_relative(value: str, source: str) -> Path:
    """A path named in a scenario file is relative to that file (or to the cwd for in-memory ones)."""
    base = Path(source).parent if Path(source).is_file() else Path.cwd()
    return (base / value).resolve()


def _dispersion(value: Any, source: str, where: str, pairwise_every: int) -> tuple[str, ...]:
    """Names only: a sweep's levels are parsed as plain scenarios that keep this key, so whether
    there are levels to compare is checked when the gate evaluates the file (``evaluate``)."""
    names = [value] if isinstance(value, str) else value
    expected = "a metric name or a list of them: " + ", ".join(DISPERSION_METRICS)
    if not isinstance(names, list) or not all(isinstance(n, str) and n in DISPERSION_METRICS for n in names):
        raise ScenarioError(source, where, expected, value)
    if "pairwise_cos_mean" in names and pairwise_every <= 0:
        raise ScenarioError(source, where, "metrics.pairwise_every > 0 for pairwise_cos_mean", value)
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- evaluation

def series(rows: Sequence[Row], metric: str, warmup_steps: int = 0) -> list[tuple[int, float]]:
    """``(step, value)`` of the finite values of ``metric`` at steps >= ``warmup_steps``."""
    out = []
    for r in rows:
        v, step = r.get(metric), r.get("step", -1)
        if _is_number(v) and math.isfinite(v) and _is_int(step) and step >= warmup_steps:
            out.append((step, float(v)))
    return out


def statistic(points: Sequence[tuple[int, float]], stat: str, worst: str) -> tuple[float, int]:
    """The statistic of a non-empty series and the step of its worst value (``worst``: max | min)."""
    pick = max if worst == "max" else min
    worst_step, worst_value = pick(points, key=lambda p: p[1])
    if stat == "mean":
        return sum(v for _, v in points) / len(points), worst_step
    if stat == "peak":
        return worst_value, worst_step
    return points[-1][1], points[-1][0]


def outlier_rank(row: Row, metric: str) -> int | None:
    """The rank furthest from the others at this step, for the metric's family (None if n/a)."""
    family = {"loss": "loss", "grad": "grad_norm", "cos": "cos_to_mean"}.get(metric.split("_")[0])
    if metric.startswith("pairwise"):
        family = "cos_to_mean"
    values = row.get(family) if family else None
    if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
        return None
    if family == "cos_to_mean":
        score = [-v for v in values]
    else:
        mean = sum(values) / len(values)
        score = [abs(v - mean) for v in values]
    order = sorted(range(len(values)), key=lambda r: score[r], reverse=True)
    if len(order) > 1 and math.isclose(score[order[0]], score[order[1]], rel_tol=1e-9, abs_tol=1e-15):
        return None  # a tie (always so for loss and norm with two ranks): no rank stands out
    return order[0]


def evaluate(exp: Expectations, run: RunData, reference: RunData | None = None,
             reference_name: str = "") -> list[Finding]:
    """Every expectation against one run; a failed run is always a failed finding."""
    findings = _check_status(exp, run)
    by_step = {r.get("step"): r for r in run.rows}
    for b in exp.bounds:
        findings.append(_check_bound(b, run.rows, by_step, exp.warmup_steps))
    if exp.no_nonfinite:
        findings.append(_check_nonfinite(run))
    if exp.weights_in_sync is not None:
        findings.append(_check_weights(run.rows, exp.weights_in_sync))
    if exp.metrics_equal_to is not None:
        findings.append(_check_equal(run, reference, reference_name or str(exp.metrics_equal_to)))
    if exp.dispersion_increases:
        findings.append(Finding("dispersion_increases", False, "dispersion_increases compares the levels of a "
                                "sweep; this scenario has no [sweep] table"))
    return findings


def _check_status(exp: Expectations, run: RunData) -> list[Finding]:
    where = {"step": run.failed_step, "rank": run.failed_rank}
    if exp.run_status == "ok":
        return [] if run.ok else [Finding("run", False, f"run failed: {run.reason}", **where)]
    if run.ok:
        return [Finding("run_status", False, "the run succeeded; run_status = 'failed' expects it to fail")]
    out = [Finding("run_status", True, f"failed as expected: {run.reason}", **where)]
    if exp.failed_rank is not None:
        ok = run.failed_rank == exp.failed_rank
        out.append(Finding("failed_rank", ok, f"the failure names rank {run.failed_rank}"
                           + ("" if ok else f", expected rank {exp.failed_rank}"), actual=run.failed_rank,
                           limit=exp.failed_rank, **where))
    return out


def _check_bound(b: Bound, rows: Sequence[Row], by_step: Mapping[Any, Row], warmup: int) -> Finding:
    points = series(rows, b.metric, warmup)
    if not points:
        return Finding(b.name, False, f"no finite {b.metric} value at steps >= {warmup}", b.metric, None, b.limit)
    value, step = statistic(points, b.statistic, b.kind)
    ok = value <= b.limit if b.kind == "max" else value >= b.limit
    rank = outlier_rank(by_step.get(step, {}), b.metric)
    span = f"steps {points[0][0]}..{points[-1][0]}" if b.statistic != "final" else f"step {step}"
    op = ("<=" if ok else ">") if b.kind == "max" else (">=" if ok else "<")
    where = "" if ok else f" (worst at step {step}" + (f", rank {rank})" if rank is not None else ")")
    msg = f"{b.metric} {b.statistic} over {span} = {value:.6g} {op} {b.limit:g}{where}"
    return Finding(b.name, ok, msg, b.metric, value, b.limit, None if ok else step, None if ok else rank)


def _check_nonfinite(run: RunData) -> Finding:
    hits = [(r.get("step"), f.get("rank"), f.get("kind")) for r in run.rows for f in r.get("flags") or []
            if isinstance(f, Mapping) and str(f.get("kind", "")).startswith("nonfinite")]
    hits += [(e.get("step"), e.get("rank"), e.get("event")) for e in run.events
             if str(e.get("event", "")).startswith("nonfinite")]
    if "non-finite" in run.reason and not hits:
        hits.append((run.failed_step, run.failed_rank, "nonfinite"))
    if not hits:
        return Finding("no_nonfinite", True, "no NaN/Inf on any rank", actual=0, limit=0)
    step, rank, kind = min(hits, key=lambda h: (h[0] if _is_int(h[0]) else 1 << 62))
    return Finding("no_nonfinite", False, f"{kind} on rank {rank} at step {step} ({len(hits)} flag(s)/event(s))",
                   "nonfinite", len(hits), 0, step, rank)


def _check_weights(rows: Sequence[Row], expected: bool) -> Finding:
    from testbed.summary import diverging_ranks

    checks = [r for r in rows if isinstance(r.get("weights_in_sync"), bool)]
    if not checks:
        return Finding("weights_in_sync", False, "no weight check was recorded", "weights_in_sync", None, expected)
    bad = [r for r in checks if not r["weights_in_sync"]]
    in_sync = not bad
    if in_sync == expected:
        what = "in sync at every check" if in_sync else f"diverged from step {bad[0].get('step')} (as expected)"
        return Finding("weights_in_sync", True, f"weights {what}", "weights_in_sync", in_sync, expected)
    if expected:
        sums = bad[0].get("weight_checksum")
        ranks, reference = diverging_ranks(sums if isinstance(sums, list) else [])
        rank = ranks[0] if len(ranks) == 1 else None
        msg = f"weights diverged at step {bad[0].get('step')}: rank(s) {ranks} differ from {reference}"
        return Finding("weights_in_sync", False, msg, "weights_in_sync", False, True, bad[0].get("step"), rank)
    return Finding("weights_in_sync", False, f"weights stayed in sync over {len(checks)} checks; a divergence was "
                   "expected", "weights_in_sync", True, False)


def _check_equal(run: RunData, reference: RunData | None, name: str) -> Finding:
    check = "metrics_equal_to"
    if reference is None:
        return Finding(check, False, f"reference {name} was not run")
    if not reference.ok:
        return Finding(check, False, f"reference {name} failed: {reference.reason}")
    for a, b in zip(run.rows, reference.rows):
        if a != b:
            differing = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            key = next((k for k in differing if isinstance(a.get(k), list)), differing[0])  # per-rank first
            va, vb = a.get(key), b.get(key)
            rank = None
            if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
                rank = next(i for i, (x, y) in enumerate(zip(va, vb)) if x != y)
                va, vb, key = va[rank], vb[rank], f"{key}[{rank}]"
            return Finding(check, False, f"differs from {name} at step {a.get('step')}, field {key}: {va!r} vs {vb!r}",
                           key, va, vb, a.get("step"), rank)
    if len(run.rows) != len(reference.rows):
        return Finding(check, False, f"{len(run.rows)} rows vs {len(reference.rows)} in {name}")
    return Finding(check, True, f"{len(run.rows)} rows identical to {name}")
