"""Expectations: the ``[expect]`` table of a scenario and its validation (checking a run: ``testbed.gate.checks``).

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
- ``verdict``: the run's verdict status must be this (``"consistent"``, ``"inconsistent"``,
  ``"diverged"``; see docs/diagnosis.md); ``suspects``: the verdict must name exactly these ranks;
  ``causes``: the verdict's exact causes must be exactly these - data causes (``"replicated"``,
  ``"overlap"``, ``"epoch_repeat"``, ``"uncovered"``), ``"state"``, ``"config"`` ([]: none at all).
- ``metrics_equal_to``: another scenario file (relative to this one) whose ``metrics.jsonl``
  must be identical row for row (invariance scenarios, e.g. a straggler changes timing only).
- ``dispersion_increases`` (sweeps only): a metric name or list; its statistic must not fall
  (cosines: not rise) from one level to the next by more than ``dispersion_slack`` (absolute,
  default 0), and must be strictly more dispersed at the last level than at the first.

A failed run is always a failed finding; evaluation never raises on odd data (nulls, NaN flags,
missing files) because a gate that crashes tells the reader less than one that says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from testbed.scenario.errors import ScenarioError

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
               "dispersion_increases", "dispersion_slack", "run_status", "failed_rank", "verdict", "suspects", "causes"}
CAUSES = ("replicated", "overlap", "epoch_repeat", "uncovered", "state", "config")
VERDICTS = ("consistent", "inconsistent", "diverged")
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
    verdict: str | None = None
    suspects: tuple[int, ...] | None = None
    causes: tuple[str, ...] | None = None


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
    if not is_int(warmup) or not 0 <= warmup < steps:
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
    if not is_number(slack) or not math.isfinite(slack) or slack < 0:
        raise ScenarioError(source, where("dispersion_slack"), "a number >= 0", slack)
    status = raw.get("run_status", "ok")
    if status not in ("ok", "failed"):
        raise ScenarioError(source, where("run_status"), "'ok' or 'failed'", status)
    failed_rank = raw.get("failed_rank")
    if failed_rank is not None and (status != "failed" or not is_int(failed_rank) or failed_rank < 0):
        raise ScenarioError(source, where("failed_rank"), "a rank (integer >= 0), with run_status = 'failed'",
                            failed_rank)
    verdict = raw.get("verdict")
    if verdict is not None and verdict not in VERDICTS:
        raise ScenarioError(source, where("verdict"), " | ".join(repr(v) for v in VERDICTS), verdict)
    suspects = raw.get("suspects")
    if suspects is not None and (not isinstance(suspects, list) or not all(is_int(r) and r >= 0 for r in suspects)
                                 or len(set(suspects)) != len(suspects)):
        raise ScenarioError(source, where("suspects"), "a list of distinct ranks (integers >= 0), e.g. [3]", suspects)
    causes = raw.get("causes")
    if causes is not None and (not isinstance(causes, list) or not all(c in CAUSES for c in causes)):
        raise ScenarioError(source, where("causes"), "a list of exact causes from " + ", ".join(map(repr, CAUSES)),
                            causes)
    return Expectations(tuple(bounds), warmup, statistic, flags["weights_in_sync"],
                        True if flags["no_nonfinite"] is None else flags["no_nonfinite"],
                        reference, increases, float(slack), status, failed_rank,
                        verdict, tuple(sorted(suspects)) if suspects is not None else None,
                        tuple(sorted(set(causes))) if causes is not None else None)


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


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
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
    if not is_number(value) or not math.isfinite(value):
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
