"""The verdict: is this run's per-rank record consistent with healthy data parallelism?

``diagnose(rows)`` reads the recorded rows (``metrics.jsonl``, also a failed run's partial rows) and
returns a ``Verdict`` — ``consistent`` / ``inconsistent`` / ``diverged``, the suspect ranks or groups,
the first step, and the evidence, each with a p-value where one is exact (``METRICS.md``, "The
verdict"). The null hypothesis is what healthy synchronous DP guarantees: the ranks are
*exchangeable* at every step.

Evidence, and how sure each kind is:

- ``persistent`` — a rank (or a group) differs over the run: per-metric permutation tests of
  the ranks' pooled standardized deviations (``exchangeability``), and a permutation test of a
  two-group split (``groups``); Holm's step-down correction across these tests, so the chance that
  a healthy run is called inconsistent by them is ≤ α **whatever the distributions and the drift**
  (measured: ``tests/test_verdict.py``). ``p_value`` is Holm-adjusted.
- ``transient`` — a spike: the attribution rule (``testbed.diagnose.attribution``: robust z > 8 at a step).
  A relabeling test cannot judge one step of one rank (it gives p ≥ 1/N), so ``p_value`` is
  ``None``, and the spike counts against the run only when it is ``confirmed``: at least 5× the
  largest |z| at the run's other steps (``transient``; a rule with a stated assumption, not a test
  at α — its measured false-alarm rates are in ``docs/diagnosis.md``). Unconfirmed spikes stay in
  the evidence and do not change the status. ``transient_threshold=None`` turns spikes off.
- bit-identical ranks (replicated batches, ``replicas``) are their own case: a difference between
  replicas is impossible under the null — ``persistent`` or ``transient`` evidence with
  ``p_value`` 0; classes of replicas with no majority are exact ``groups`` (they take precedence
  over the statistical split). Such a metric leaves the α family and the spike rule.
- ``nonfinite`` — a NaN/Inf flag on a rank (the contract: consistent means none); ``p_value`` None.
- ``divergence`` — weight checksums differ: the job is no longer data parallel; ``p_value`` 0.

Two ranks: a persistent difference is detected (the exact sign-flip test) but not attributed —
both ranks are named, and the text says so. World size 1: nothing to compare, consistent.
Status: ``diverged`` when a weight check failed; else ``inconsistent`` when any evidence counts
(``evidence.counts``: all but unconfirmed spikes); else ``consistent``. ``ranks`` and ``since_step``
come from the evidence that counts (for a split: the smaller group, or all of its ranks when the
groups are the same size — which half is wrong is not decidable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.attribution import DEFAULT_THRESHOLD, LOG_METRICS, METRICS, comparable, metric_table
from testbed.diagnose import exchangeability as ex
from testbed.diagnose import replicas
from testbed.diagnose.evidence import Evidence, counts
from testbed.diagnose.groups import GroupResult, deviation_features, group_test, pairwise_features
from testbed.diagnose.text import headline
from testbed.diagnose.transient import spikes
from testbed.diagnose.summary import diverging_ranks

Row = dict[str, Any]
MIN_DRAWS = 4999  # Monte-Carlo relabelings for a significant test: p resolution 1/5000


@dataclass(frozen=True)
class Verdict:
    """``to_json()`` is the ``run.json["verdict"]`` contract; ``headline()`` the one-line reading.
    ``notes`` and ``tests`` (every permutation test: raw and adjusted p, draws) are for humans and
    debugging, not part of the JSON."""

    status: str  # consistent | inconsistent | diverged
    ranks: list[int]
    groups: list[list[int]] | None
    since_step: int | None
    alpha: float
    evidence: list[Evidence]
    steps: int
    world_size: int
    notes: list[str] = field(default_factory=list)
    tests: list[Row] = field(default_factory=list)

    def to_json(self) -> Row:
        return {"status": self.status, "ranks": list(self.ranks), "groups": self.groups,
                "since_step": self.since_step, "alpha": self.alpha,
                "evidence": [e.to_json() for e in self.evidence], "steps": self.steps}

    def headline(self) -> str:
        return headline(self)

    def to_record(self) -> Row:
        """What ``run.json["verdict"]`` holds: the contract (``to_json``) plus the one-line reading
        and the notes, so readers of a record need not recompute anything."""
        return {**self.to_json(), "headline": self.headline(), "notes": list(self.notes)}

    @property
    def min_p(self) -> float:
        """Smallest Holm-adjusted p of the permutation tests (1.0 if none ran)."""
        return min((t["p_adjusted"] for t in self.tests), default=1.0)


def diagnose(rows: Sequence[Row], *, alpha: float = 0.01, world_size: int | None = None, seed: int = 0,
             transient_threshold: float | None = DEFAULT_THRESHOLD) -> Verdict:
    """The verdict on recorded rows (module doc). Deterministic for a given ``seed``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    tables = {m: metric_table(rows, m) for m in METRICS}
    n = world_size or max([t[1].shape[1] for t in tables.values()]
                          + [len(r["weight_checksum"]) for r in rows if isinstance(r.get("weight_checksum"), list)])
    steps = sum(1 for r in rows if any(isinstance(r.get(m), list) for m in METRICS))
    if n < 2:
        note = "world size 1: nothing to compare" if n == 1 else "no per-rank values recorded"
        return Verdict("consistent", [], None, None, alpha, [], steps, n, [note])
    family, evidence, exact_groups, replicated = _sort_metrics(tables, n)
    notes = [f"bit-identical ranks in {', '.join(replicated)}: any difference between them is an anomaly"] \
        if replicated else []

    # --- the α-controlled family: one test per metric, plus the group split
    standardized = {metric: ex.standardize(x) for metric, (_, x, _) in family.items()}
    deviations = deviation_features([(steps_m, ex.standardize(x, recenter=False)) for steps_m, x, _ in family.values()])
    deviation_steps = sorted({s for steps_m, _, _ in family.values() for s in steps_m})
    pairwise = pairwise_features(rows, n)
    group_possible = n >= 4 and (pairwise[0].shape[0] >= 3 or deviations.shape[0] >= 3)
    m = len(family) + int(group_possible)
    max_draws = max(MIN_DRAWS, math.ceil(4 * m / alpha))
    first: dict[str, ex.PermutationResult] = {}
    raw_p: dict[str, float] = {}
    for k, (metric, (_, x, _)) in enumerate(family.items()):
        first[metric] = ex.rank_sum_test(standardized[metric], rng=_rng(seed, k, 0), max_draws=max_draws)
        raw_p[metric] = first[metric].p_value
    split: GroupResult | None = None
    if group_possible:
        split = group_test(deviations=(deviations, deviation_steps), pairwise=pairwise, rng=_rng(seed, 99, 0),
                           max_draws=max_draws)
        if split is not None:
            raw_p["groups"] = split.p_value
    adjusted, multiplier = holm(raw_p)
    tests = [{"test": name, "p_raw": raw_p[name], "p_adjusted": adjusted[name],
              "draws": (split.draws if name == "groups" else first[name].draws),
              "exact": name != "groups" and first[name].exact} for name in raw_p]

    named: dict[str, tuple[list[int], list[float]]] = {}  # metric -> (ranks named, their p-values)
    for k, (metric, (kept_steps, x, log_scale)) in enumerate(family.items()):
        if adjusted[metric] > alpha:
            continue
        stages = ex.name_ranks(x, level=alpha / multiplier[metric], rng_for=lambda s, k=k: _rng(seed, k, s),
                               max_draws=max_draws, first=first[metric])
        ranks_m, p_m = [], []
        running = adjusted[metric]  # a rank named at stage s: p = max over stages ≤ s (step-down)
        for stage in stages:
            running = max(running, min(1.0, stage.result.p_value * multiplier[metric]))
            ranks_m += stage.named
            p_m += [running] * len(stage.named)
        named[metric] = (ranks_m, p_m)
    groups, split_evidence = _resolve_groups(split, adjusted.get("groups", 1.0), multiplier.get("groups", 1), named,
                                             n, deviations, deviation_steps, pairwise, seed, max_draws, alpha)
    evidence += split_evidence
    if exact_groups is not None:
        groups = exact_groups  # bit-identical classes: exact, they take precedence
    if groups is None:
        groups = _offset_groups(family, named, n)
    for metric, (ranks_m, p_m) in named.items():
        kept_steps, x, log_scale = family[metric]
        evidence += _persistent_evidence(metric, kept_steps, x, standardized[metric], log_scale, ranks_m, p_m,
                                         groups, n)
    named_by_metric = {metric: set(r) for metric, (r, _) in named.items()}

    evidence += _transient_evidence(tables, [m for m in METRICS if m in family], named_by_metric,
                                    transient_threshold)
    evidence += _nonfinite_evidence(rows)
    divergence, div_groups = _divergence_evidence(rows, n)
    evidence += divergence
    counted = [e for e in evidence if counts(e)]
    status = "diverged" if divergence else ("inconsistent" if counted else "consistent")
    if divergence:
        ranks = sorted({r for e in divergence for r in _suspects(e, n)})
        groups = div_groups
        since = min(e.since_step for e in divergence)
    else:
        ranks = sorted({r for e in counted for r in _suspects(e, n)})
        since = min((e.since_step for e in counted if e.since_step is not None), default=None)
    if n == 2 and any(e.group == [[0], [1]] and e.kind == "persistent" for e in evidence):
        notes.append("2 ranks: a persistent difference is detectable but not attributable to either "
                     "rank without a control run")
    return Verdict(status, ranks, groups, since, alpha, evidence, steps, n, notes, tests)


def _sort_metrics(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], n: int) -> tuple[
        dict[str, tuple[list[int], np.ndarray, bool]], list[Evidence], list[list[int]] | None, list[str]]:
    """Per metric, its steps where every rank is finite, in comparable form: replicated metrics
    (``replicas``) give their exact evidence; the others form the α family ``{metric: (steps, x,
    log scale)}``. Returns (family, evidence, exact groups, replicated metrics)."""
    family: dict[str, tuple[list[int], np.ndarray, bool]] = {}
    evidence: list[Evidence] = []
    exact_groups: list[list[int]] | None = None
    replicated: list[str] = []
    for metric, (steps_m, values, _) in tables.items():
        values = values[:, :n]
        if values.shape[1] < n:
            values = np.pad(values, ((0, 0), (0, n - values.shape[1])), constant_values=np.nan)
        x = comparable(values, metric)
        keep = np.isfinite(x).all(axis=1)
        kept_steps, xs = [s for s, k in zip(steps_m, keep) if k], x[keep]
        if not kept_steps:
            continue
        log_scale = bool(metric in LOG_METRICS and x is not values)
        labels = replicas.structure(values[keep])
        if labels is not None:
            replicated.append(metric)
            found, split_classes = replicas.replica_evidence(metric, kept_steps, values[keep], xs, log_scale, labels)
            evidence += found
            exact_groups = exact_groups or split_classes
        else:
            family[metric] = (kept_steps, xs, log_scale)
    return family, evidence, exact_groups, replicated


def _resolve_groups(split: GroupResult | None, split_p: float, multiplier: int,
                    named: dict[str, tuple[list[int], list[float]]], n: int, deviations: np.ndarray,
                    deviation_steps: list[int], pairwise: tuple[np.ndarray, np.ndarray, list[int]], seed: int,
                    max_draws: int, alpha: float) -> tuple[list[list[int]] | None, list[Evidence]]:
    """The statistical split, if it passed Holm — and, when the step-down named outliers that are not
    one of its groups, again without them (``_split_without``)."""
    if split is None or split_p > alpha:
        return None, []
    outliers = sorted({r for ranks_m, _ in named.values() for r in ranks_m})
    if outliers and not any(set(outliers) == set(g) for g in split.groups):
        split, split_p = _split_without(outliers, n, deviations, deviation_steps, pairwise, seed, max_draws,
                                        multiplier, split_p)
    if split is None or split_p > alpha:
        return None, []
    return split.groups, [Evidence(split.source, "persistent", {
        "value": round(split.within - split.between, 6), "unit": f"{split.unit}, within − between groups",
        "within": round(split.within, 6), "between": round(split.between, 6), "since_step": split.since_step},
        split_p, group=split.groups)]


def holm(p: dict[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """Holm's step-down (Holm 1979): adjusted p-values, and each hypothesis' multiplier (it is
    compared with α / multiplier once all smaller p-values were rejected)."""
    order = sorted(p, key=lambda k: p[k])
    m = len(order)
    adjusted, multiplier, running = {}, {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[name]))
        adjusted[name], multiplier[name] = running, m - i
    return adjusted, multiplier


def _rng(seed: int, test: int, stage: int) -> np.random.Generator:
    return np.random.default_rng([seed, test, stage])


def _suspects(e: Evidence, n: int) -> list[int]:
    """Ranks an evidence item points at: its rank; for a split the smaller group (both when equal)."""
    if e.rank is not None:
        return [e.rank]
    sizes = sorted({len(g) for g in e.group or []})
    if len(sizes) > 1:
        return [r for g in e.group for r in g if len(g) == sizes[0]]
    return [r for g in e.group or [] for r in g]


def _effect(diff: np.ndarray, u: np.ndarray, steps: list[int], log_scale: bool, unit: str) -> dict[str, Any]:
    start = ex.onset(u)
    post = diff[start:]
    mean = float(post.mean())
    value = math.expm1(mean) if log_scale else mean
    agree = int(np.sum(np.sign(post) == np.sign(mean))) if mean != 0 else 0
    return {"value": round(value, 6), "unit": unit, "since_step": steps[start], "steps": agree, "of": int(post.size)}


def _persistent_evidence(metric: str, steps: list[int], x: np.ndarray, u: np.ndarray, log_scale: bool,
                         named: list[int], p_named: list[float], groups: list[list[int]] | None,
                         n: int) -> list[Evidence]:
    if not named:
        return []
    kind = "relative" if log_scale else "difference"
    if n == 2 or (groups is not None and set(named) in ({*groups[0]}, {*groups[1]}, {*groups[0], *groups[1]})):
        split = [[0], [1]] if n == 2 else groups
        a, b = split
        diff = x[:, a].mean(axis=1) - x[:, b].mean(axis=1)
        unit = f"{kind} (mean of ranks {_ranks(a)} vs ranks {_ranks(b)})"
        effect = _effect(diff, u[:, a].mean(axis=1) - u[:, b].mean(axis=1), steps, log_scale, unit)
        return [Evidence(metric, "persistent", effect, min(p_named), group=split)]
    out = []
    healthy = [r for r in range(n) if r not in named]
    for r, p in zip(named, p_named):
        ref = healthy or [j for j in range(n) if j != r]
        diff = x[:, r] - x[:, ref].mean(axis=1)
        effect = _effect(diff, u[:, r], steps, log_scale, f"{kind} (rank mean vs other ranks)")
        out.append(Evidence(metric, "persistent", effect, p, rank=r))
    return out


def _split_without(outliers: list[int], n: int, deviations: np.ndarray, steps: list[int],
                   pairwise: tuple[np.ndarray, np.ndarray, list[int]], seed: int, max_draws: int,
                   multiplier: int, p_before: float) -> tuple[GroupResult | None, float]:
    """The group test again without the ranks the step-down named, so that one strong outlier (the
    null is false, so the omnibus split test may reject) is not reported as a split. Reported
    p: the larger of the two (both tests must reject)."""
    keep = [r for r in range(n) if r not in outliers]
    if len(keep) < 4:
        return None, 1.0
    sub_pairwise = (pairwise[0][:, keep][:, :, keep], pairwise[1][:, keep][:, :, keep], pairwise[2])
    split = group_test(deviations=(deviations[:, keep], steps), pairwise=sub_pairwise, rng=_rng(seed, 98, 0),
                       max_draws=max_draws)
    if split is None:
        return None, 1.0
    groups = [[keep[r] for r in g] for g in split.groups]
    p = max(p_before, min(1.0, split.p_value * multiplier))
    return GroupResult(groups, split.contrast, split.p_value, split.draws, split.source, split.within,
                       split.between, split.unit, split.since_step), p


def _offset_groups(family: dict[str, tuple[list[int], np.ndarray, bool]],
                   named: dict[str, tuple[list[int], list[float]]], n: int) -> list[list[int]] | None:
    """A split from the step-down names: 2 … N−2 ranks named in a metric, all off the same way
    (a data pipeline or node type of their own) — the first metric that has one."""
    for metric, (ranks_m, _) in named.items():
        if 2 <= len(ranks_m) <= n - 2:
            x = family[metric][1]
            rest = [r for r in range(n) if r not in ranks_m]
            signs = {bool(np.mean(x[:, r] - x[:, rest].mean(axis=1)) > 0) for r in ranks_m}
            if len(signs) == 1:
                return sorted([sorted(ranks_m), rest], key=lambda g: g[0])
    return None


def _ranks(group: list[int]) -> str:
    return ",".join(str(r) for r in group)


def _transient_evidence(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], metrics: list[str],
                        named: dict[str, set[int]], threshold: float | None) -> list[Evidence]:
    """The attribution rule's spikes, one item per (rank, metric) (``transient``: which count)."""
    if threshold is None:
        return []
    return [Evidence(s.metric, "transient", {
        "value": round(s.peak_z, 3), "unit": "robust z (peak; attribution rule)", "peak_step": s.peak_step,
        "threshold": threshold, "confirmed": s.confirmed, "reference": round(s.reference, 3),
        "since_step": s.first_step, "steps": s.steps, "of": s.of}, None, rank=s.rank)
        for s in spikes(tables, metrics, named, threshold)]


def _nonfinite_evidence(rows: Sequence[Row]) -> list[Evidence]:
    """Ranks flagged non-finite at the first step any rank was (later ones follow from the all-reduce)."""
    hits: dict[tuple[int, str], list[int]] = {}
    for row in rows:
        for flag in row.get("flags") or []:
            kind, rank = flag.get("kind") if isinstance(flag, dict) else None, flag.get("rank") if isinstance(flag, dict) else None
            if kind in ("nonfinite_loss", "nonfinite_grad") and isinstance(rank, int):
                hits.setdefault((rank, "loss" if kind == "nonfinite_loss" else "grad_norm"), []).append(row["step"])
    if not hits:
        return []
    first = min(s[0] for s in hits.values())
    return [Evidence(metric, "nonfinite", {"value": len(s), "unit": "steps with a non-finite value",
                                           "since_step": s[0]}, None, rank=rank)
            for (rank, metric), s in sorted(hits.items()) if s[0] == first]


def _divergence_evidence(rows: Sequence[Row], n: int) -> tuple[list[Evidence], list[list[int]] | None]:
    checks = [r for r in rows if isinstance(r.get("weights_in_sync"), bool)]
    bad = next((r for r in checks if not r["weights_in_sync"]), None)
    if bad is None:
        return [], None
    sums = bad.get("weight_checksum") if isinstance(bad.get("weight_checksum"), list) else []
    ranks, reference = diverging_ranks(sums)
    last_ok = max((r["step"] for r in checks if r["weights_in_sync"] and r["step"] < bad["step"]), default=None)
    classes: dict[Any, list[int]] = {}
    for r, v in enumerate(sums):
        classes.setdefault(v, []).append(r)
    split = sorted(classes.values(), key=lambda g: g[0])
    groups = split if len(split) >= 2 and (reference != "majority" or any(len(g) >= 2 for g in split[1:])) else None
    effect = {"value": bad["step"], "unit": "first checked step with differing weight checksums",
              "last_in_sync": last_ok, "since_step": bad["step"]}
    if reference != "majority" or not ranks:
        return [Evidence("weight_checksum", "divergence", effect, 0.0, group=split or [[r] for r in range(n)])], groups
    return [Evidence("weight_checksum", "divergence", effect, 0.0, rank=r) for r in ranks], groups


def verdict_record(rows: Sequence[Row], *, world_size: int | None = None, alpha: float = 0.01) -> Row:
    """``diagnose(rows).to_record()``, never raising: a verdict that cannot be computed says why
    (``status: "unknown"``) instead of costing the run its record."""
    try:
        return diagnose(rows, alpha=alpha, world_size=world_size).to_record()
    except Exception as e:  # noqa: BLE001 - the record matters more than the judgement
        return {"status": "unknown", "ranks": [], "groups": None, "since_step": None, "alpha": alpha,
                "evidence": [], "steps": len(rows), "headline": f"no verdict: {type(e).__name__}: {e}",
                "notes": []}
