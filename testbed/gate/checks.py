"""Checking a run against its scenario's ``[expect]`` table (the table itself: ``testbed.scenario.expect``).

A failed run is always a failed finding; evaluation never raises on odd data (nulls, NaN flags,
missing files) because a gate that crashes tells the reader less than one that says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from testbed.diagnose.verdict import verdict_record
from testbed.record.files import EVENTS_FILE, RUN_FILE, read_jsonl, read_metrics, read_run
from testbed.scenario.expect import Bound, Expectations, is_int, is_number

Row = dict[str, Any]


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
    recorded_verdict: Row | None = None  # run.json["verdict"]; computed from the rows when absent

    @property
    def verdict(self) -> Row:
        """The run's verdict (docs/diagnosis.md): the recorded one, else computed from the rows."""
        if self.recorded_verdict is None:
            object.__setattr__(self, "recorded_verdict", verdict_record(self.rows))
        return self.recorded_verdict  # type: ignore[return-value]

    @staticmethod
    def load(run_dir: Path) -> "RunData":
        run_dir = Path(run_dir)
        try:
            run = read_run(run_dir)
        except (OSError, ValueError) as e:
            run = {"status": "failed", "reason": f"no readable {RUN_FILE} in {run_dir} ({e})"}
        return RunData(read_metrics(run_dir), read_jsonl(run_dir / EVENTS_FILE), run.get("status") == "ok",
                       run.get("reason") or "", run.get("failed_rank"), run.get("failed_step"),
                       run.get("verdict") if isinstance(run.get("verdict"), dict) else None)



def series(rows: Sequence[Row], metric: str, warmup_steps: int = 0) -> list[tuple[int, float]]:
    """``(step, value)`` of the finite values of ``metric`` at steps >= ``warmup_steps``."""
    out = []
    for r in rows:
        v, step = r.get(metric), r.get("step", -1)
        if is_number(v) and math.isfinite(v) and is_int(step) and step >= warmup_steps:
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


def suspect_rank(run: RunData) -> int | None:
    """The one rank the run's verdict names, if it names exactly one (the single outlier rule:
    the verdict's; a failing bound's message points at it)."""
    ranks = run.verdict.get("ranks") or []
    return ranks[0] if len(ranks) == 1 else None


def evaluate(exp: Expectations, run: RunData, reference: RunData | None = None,
             reference_name: str = "") -> list[Finding]:
    """Every expectation against one run; a failed run is always a failed finding."""
    findings = _check_status(exp, run)
    for b in exp.bounds:
        findings.append(_check_bound(b, run, exp.warmup_steps))
    if exp.verdict is not None or exp.suspects is not None:
        findings.append(_check_verdict(exp, run))
    if exp.causes is not None:
        findings.append(_check_causes(exp.causes, run))
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


def _check_verdict(exp: Expectations, run: RunData) -> Finding:
    v = run.verdict
    status, ranks = v.get("status"), sorted(v.get("ranks") or [])
    ok = (exp.verdict is None or status == exp.verdict) and (exp.suspects is None or ranks == list(exp.suspects))
    want = " and ".join(x for x in (f"verdict {exp.verdict!r}" if exp.verdict else "",
                                    f"suspects {list(exp.suspects)}" if exp.suspects is not None else "") if x)
    msg = f"verdict {status!r}, suspects {ranks}" + ("" if ok else f"; expected {want}") + f" — {v.get('headline', '')}"
    rank = ranks[0] if len(ranks) == 1 else None
    return Finding("verdict", ok, msg, None, {"status": status, "ranks": ranks},
                   {"status": exp.verdict, "ranks": list(exp.suspects) if exp.suspects is not None else None},
                   None if ok else v.get("since_step"), None if ok else rank)


def verdict_causes(verdict: Row) -> list[str]:
    """The exact causes in a verdict: each data item's cause, ``state``, ``config`` (sorted, distinct);
    intended ones (declared by the run) are not causes."""
    found = set()
    for item in verdict.get("evidence") or []:
        if not isinstance(item, Mapping) or item.get("kind") not in ("data", "state", "config"):
            continue
        if isinstance(item.get("effect"), Mapping) and item["effect"].get("intended"):
            continue
        found.add(str(item.get("cause")) if item["kind"] == "data" else str(item["kind"]))
    return sorted(found)


def _check_causes(expected: tuple[str, ...], run: RunData) -> Finding:
    got = verdict_causes(run.verdict)
    ok = got == list(expected)
    msg = f"exact causes {got}" + ("" if ok else f"; expected {list(expected)}") + \
        f" — {run.verdict.get('headline', '')}"
    return Finding("causes", ok, msg, None, got, list(expected), None if ok else run.verdict.get("since_step"))


def _check_bound(b: Bound, run: RunData, warmup: int) -> Finding:
    points = series(run.rows, b.metric, warmup)
    if not points:
        return Finding(b.name, False, f"no finite {b.metric} value at steps >= {warmup}", b.metric, None, b.limit)
    value, step = statistic(points, b.statistic, b.kind)
    ok = value <= b.limit if b.kind == "max" else value >= b.limit
    rank = None if ok else suspect_rank(run)
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
    step, rank, kind = min(hits, key=lambda h: (h[0] if is_int(h[0]) else 1 << 62))
    return Finding("no_nonfinite", False, f"{kind} on rank {rank} at step {step} ({len(hits)} flag(s)/event(s))",
                   "nonfinite", len(hits), 0, step, rank)


def _check_weights(rows: Sequence[Row], expected: bool) -> Finding:
    from testbed.diagnose.summary import diverging_ranks

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
