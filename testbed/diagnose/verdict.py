"""The verdict: is this run's per-rank record consistent with healthy data parallelism?

``diagnose(rows)`` reads the recorded rows (``metrics.jsonl``, also a failed run's partial rows) and
returns a ``Verdict`` — ``consistent`` / ``inconsistent`` / ``diverged``, the suspect ranks or groups,
when the evidence starts (and ends), and the evidence, each with a p-value where one is stated
(``METRICS.md``, "The verdict"). The null hypothesis is what healthy synchronous DP guarantees: the
ranks are *exchangeable* at every step.

The α family (Holm's step-down over its members, so the chance that a healthy run is called
inconsistent by any of them is ≤ α; measured: ``tests/test_verdict.py``):

- per metric, a permutation test of the ranks' pooled standardized deviations
  (``exchangeability``: exact whatever the distributions and the drift);
- a permutation test of a two-group split (``groups``);
- the spike test (``transient``): the largest values against the run's own upper tail — valid under
  a stated tail assumption (no heavier than Pareto: Cauchy included), not distribution-free.

Who is named (``naming``): closed testing over every set of at least ⌈N/2⌉ ranks, with the α family
as the test of all ranks and betting e-processes (``betting``) for the others — a healthy rank is
named with probability ≤ α as long as at least half the ranks are healthy. Effects are measured
against the ranks not named; ``since_step`` / ``until_step`` come from a change-point estimate
with support intervals (``changepoint``). A significant metric whose difference nobody can be
named for is reported as not attributable (``effect.attributable: false``, ``ranks`` empty).

Exact evidence (no p-value to state, or p = 0): bit-identical ranks that differ (``replicas``:
impossible for replicas; such a metric leaves the α family), ``nonfinite`` flags, weight
``divergence``. Two ranks: a persistent difference is detected (the exact sign-flip test) but not
attributed — both ranks are named, and the text says so. World size 1: nothing to compare.

Status: ``diverged`` when a weight check failed; else ``inconsistent`` when any evidence counts
(``evidence.counts``: all but unconfirmed spikes); else ``consistent``. ``ranks`` and
``since_step`` / ``until_step`` come from the evidence that counts (for a split: the smaller
group, or all of its ranks when the groups are the same size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.attribution import DEFAULT_THRESHOLD, LOG_METRICS, METRICS, comparable, metric_table
from testbed.diagnose import exchangeability as ex
from testbed.diagnose import replicas
from testbed.diagnose.evidence import EXACT_KINDS, Evidence, counts
from testbed.diagnose.exact import exact_evidence, settle
from testbed.diagnose.findings import (divergence_evidence, nonfinite_evidence, persistent_evidence, select_rank_evidence,
                                      transient_evidence)
from testbed.diagnose.groups import GroupResult, deviation_features, group_test, pairwise_features
from testbed.diagnose.naming import Names, name_ranks
from testbed.diagnose.text import headline
from testbed.diagnose.transient import spike_test

Row = dict[str, Any]
MIN_DRAWS = 4999  # Monte-Carlo relabelings for a significant test: p resolution 1/5000
SPIKES = "transient"  # the spike test's name in the family


@dataclass(frozen=True)
class Verdict:
    """``to_json()`` is the ``run.json["verdict"]`` contract; ``headline()`` the one-line reading.
    ``notes`` and ``tests`` (every test of the α family: raw and adjusted p, draws) are for humans
    and debugging, not part of the JSON."""

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
    until_step: int | None = None  # the evidence that counts ended here (exclusive); None: it lasts

    def to_json(self) -> Row:
        return {"status": self.status, "ranks": list(self.ranks), "groups": self.groups,
                "since_step": self.since_step, "until_step": self.until_step, "alpha": self.alpha,
                "evidence": [e.to_json() for e in self.evidence], "steps": self.steps}

    def headline(self) -> str:
        return headline(self)

    def to_record(self) -> Row:
        """What ``run.json["verdict"]`` holds: the contract (``to_json``) plus the one-line reading
        and the notes, so readers of a record need not recompute anything."""
        return {**self.to_json(), "headline": self.headline(), "notes": list(self.notes)}

    @property
    def min_p(self) -> float:
        """Smallest Holm-adjusted p of the α family (1.0 if no test ran)."""
        return min((t["p_adjusted"] for t in self.tests), default=1.0)


def diagnose(rows: Sequence[Row], *, alpha: float = 0.01, world_size: int | None = None, seed: int = 0,
             transient_threshold: float | None = DEFAULT_THRESHOLD, replicas_intended: bool | None = None,
             intended: Sequence[str] = (), exact_items: Sequence[Evidence] | None = None) -> Verdict:
    """The verdict on recorded rows (module doc). Deterministic for a given ``seed``.
    ``transient_threshold``: the smallest |z| reported as a spike (None: no spike test).
    ``intended``: the exact data causes the run declares on purpose (``"replicated"``: a
    ``replicate_batch`` baseline; ``"epoch_repeat"``: a loader that repeats its order): found, marked
    intended, not counted. ``replicas_intended``: whether bit-identical ranks are meant (the ranks
    apart from them are the fault) or not (they are the fault); None: from ``intended`` - and when the
    rows carry the data ledger, replication not declared is not intended - else unknown (``replicas``).
    ``exact_items``: the data / state / config evidence computed over every row of the record
    (``exact.ExactEvidence``) when ``rows`` is only a sample of it (``record/sample.py``); None:
    computed from ``rows``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    replicas_intended, intended = _intent(rows, replicas_intended, intended)
    tables = {m: metric_table(rows, m) for m in METRICS}
    n = world_size or max([t[1].shape[1] for t in tables.values()]
                          + [len(r["weight_checksum"]) for r in rows if isinstance(r.get("weight_checksum"), list)]
                          + [len(r["data_samples"]) for r in rows if isinstance(r.get("data_samples"), list)])
    steps = sum(1 for r in rows if any(isinstance(r.get(m), list) for m in METRICS))
    if n < 2:
        note = "world size 1: nothing to compare" if n == 1 else "no per-rank values recorded"
        return Verdict("consistent", [], None, None, alpha, [], steps, n, [note])
    family, evidence, exact_groups, replicated = _sort_metrics(tables, n, replicas_intended)
    notes = [f"bit-identical ranks in {', '.join(replicated)}: any difference between them is an anomaly"] \
        if replicated else []

    # --- the α family: one permutation test per metric, the group split, the spike test
    standardized = {metric: ex.standardize(x) for metric, (_, x, _) in family.items()}
    deviations = deviation_features([(steps_m, ex.standardize(x, recenter=False)) for steps_m, x, _ in family.values()])
    deviation_steps = sorted({s for steps_m, _, _ in family.values() for s in steps_m})
    pairwise = pairwise_features(rows, n)
    group_possible = n >= 4 and (pairwise[0].shape[0] >= 3 or deviations.shape[0] >= 3)
    spike_run = None if transient_threshold is None else spike_test(tables, [m for m in METRICS if m in family])
    max_draws = max(MIN_DRAWS, math.ceil(4 * (len(family) + int(group_possible) + 1) / alpha))
    raw_p, draws, split = _family_tests(standardized, (deviations, deviation_steps), pairwise, group_possible,
                                        spike_run.run_p if spike_run else None, seed, max_draws)
    adjusted, multiplier = holm(raw_p)
    tests = [{"test": name, "p_raw": raw_p[name], "p_adjusted": adjusted[name], "draws": draws[name],
              "exact": name in family} for name in raw_p]

    # --- who: closed testing; groups; the evidence of each significant metric
    persistent_p = min((adjusted[name] for name in raw_p if name != SPIKES), default=1.0)
    names = name_ranks(family, n, alpha, persistent_p) if persistent_p <= alpha else Names([], {}, 0, [])
    groups, split_evidence = _resolve_groups(split, adjusted.get("groups", 1.0), multiplier.get("groups", 1), names.ranks,
                                             n, deviations, deviation_steps, pairwise, seed, max_draws, alpha)
    evidence += split_evidence
    if exact_groups is not None:
        groups = exact_groups  # bit-identical classes: exact, they take precedence
    if groups is None:
        groups = _offset_groups(family, [m for m in family if adjusted[m] <= alpha], names.ranks, n) or names.split(n)
    items = [item for metric, (kept_steps, x, log_scale) in family.items() if adjusted[metric] <= alpha
             for item in persistent_evidence(metric, kept_steps, x, standardized[metric], log_scale, adjusted[metric],
                                             names.ranks, names.p_values, groups, n)]
    evidence += select_rank_evidence(items, alpha)
    if names.ranks:
        notes.append(f"named by closed testing over {names.sets} sets of ≥ {math.ceil(n / 2)} ranks "
                     "(a healthy rank is named with probability ≤ α while at least half the ranks are healthy)")
    level = alpha / multiplier[SPIKES] if adjusted.get(SPIKES, 1.0) <= alpha else -1.0  # Holm's level for the spikes
    found_spikes = [] if spike_run is None else spike_run.spikes(transient_threshold or 0.0, level)
    reported = [s for s in found_spikes if s.rank not in names.ranks]
    evidence += transient_evidence(reported, transient_threshold or 0.0, adjusted.get(SPIKES),
                                   multiplier.get(SPIKES, 1), alpha)
    causes = list(exact_items) if exact_items is not None else exact_evidence(rows, n, intended)
    evidence, groups = _with_causes(causes, evidence, groups, notes, n)
    evidence += nonfinite_evidence(rows)
    divergence, div_groups = divergence_evidence(rows, n)
    evidence += divergence
    return _conclude(evidence, divergence, div_groups, groups, n, alpha, steps, notes, tests)


def _intent(rows: Sequence[Row], replicas_intended: bool | None,
            intended: Sequence[str]) -> tuple[bool | None, tuple[str, ...]]:
    """The declared intent both ways: ``replicas_intended=True`` (the older declaration) implies
    "replicated"; without a word, rows carrying the data ledger mean replication is not intended."""
    intended = tuple(intended)
    if replicas_intended is True and "replicated" not in intended:
        intended = (*intended, "replicated")
    if replicas_intended is None and ("replicated" in intended or any("data_digest" in r for r in rows)):
        replicas_intended = "replicated" in intended
    return replicas_intended, intended


def _with_causes(causes: list[Evidence], statistical: list[Evidence], groups: list[list[int]] | None,
                 notes: list[str], n: int) -> tuple[list[Evidence], list[list[int]] | None]:
    """The exact causes first, then the statistical evidence that does not contradict them
    (``exact.settle``: the rest goes to ``notes``; no split is kept when nothing statistical is)."""
    kept, settled = settle(statistical, causes, lambda e: _suspects(e, n))
    if settled:
        notes += settled
        groups = groups if any(counts(e) for e in kept) else None
    return causes + kept, groups


def _family_tests(standardized: dict[str, np.ndarray], deviations: tuple[np.ndarray, list[int]],
                  pairwise: tuple[np.ndarray, np.ndarray, list[int]], group_possible: bool, spike_p: float | None,
                  seed: int, max_draws: int) -> tuple[dict[str, float], dict[str, int], GroupResult | None]:
    """The α family's raw p-values (and relabelings drawn): one permutation test per metric, the
    group split, the spike test."""
    raw_p: dict[str, float] = {}
    draws: dict[str, int] = {}
    for k, (metric, u) in enumerate(standardized.items()):
        result = ex.rank_sum_test(u, rng=_rng(seed, k, 0), max_draws=max_draws)
        raw_p[metric], draws[metric] = result.p_value, result.draws
    split = group_test(deviations=deviations, pairwise=pairwise, rng=_rng(seed, 99, 0), max_draws=max_draws) \
        if group_possible else None
    if split is not None:
        raw_p["groups"], draws["groups"] = split.p_value, split.draws
    if spike_p is not None:
        raw_p[SPIKES], draws[SPIKES] = spike_p, 0
    return raw_p, draws, split


def _conclude(evidence: list[Evidence], divergence: list[Evidence], div_groups: list[list[int]] | None,
              groups: list[list[int]] | None, n: int, alpha: float, steps: int, notes: list[str],
              tests: list[Row]) -> Verdict:
    """Status, suspects and span from the evidence that counts."""
    counted = [e for e in evidence if counts(e)]
    status = "diverged" if divergence else ("inconsistent" if counted else "consistent")
    basis = divergence or counted
    if divergence:
        groups = div_groups
    ranks = sorted({r for e in basis for r in _suspects(e, n)})
    since = _since(basis)
    ends = [e.effect.get("until_step") for e in basis]
    until = max(ends) if basis and all(isinstance(t, int) for t in ends) else None
    if n == 2 and any(e.group == [[0], [1]] and e.kind == "persistent" for e in evidence):
        notes.append("2 ranks: a persistent difference is detectable but not attributable to either "
                     "rank without a control run")
    if any(e.effect.get("attributable") is False for e in counted):
        notes.append("a metric differs between ranks, but closed testing names no rank at α")
    return Verdict(status, ranks, groups, since, alpha, evidence, steps, n, notes, tests, until)


def _since(evidence: list[Evidence]) -> int | None:
    """The first step the evidence holds from: per subject (a rank, a group), the onset of its most
    precise item (the narrowest support interval: a strong metric's onset, not a weak one's), then
    the earliest over subjects."""
    best: dict[Any, tuple[int, int]] = {}
    for e in evidence:
        if e.since_step is None:
            continue
        lo, hi = e.effect.get("since_range") or (e.since_step, e.since_step)
        key = e.rank if e.rank is not None else str(e.group)
        if key not in best or hi - lo < best[key][0]:
            best[key] = (hi - lo, e.since_step)
    return min((since for _, since in best.values()), default=None)


def _sort_metrics(tables: dict[str, tuple[list[int], np.ndarray, np.ndarray]], n: int, intended: bool | None) -> tuple[
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
            found, split_classes = replicas.replica_evidence(metric, kept_steps, values[keep], xs, log_scale, labels,
                                                                      intended)
            evidence += found
            exact_groups = exact_groups or split_classes
        else:
            family[metric] = (kept_steps, xs, log_scale)
    return family, evidence, exact_groups, replicated


def _resolve_groups(split: GroupResult | None, split_p: float, multiplier: int, named: list[int], n: int,
                    deviations: np.ndarray, deviation_steps: list[int], pairwise: tuple[np.ndarray, np.ndarray, list[int]],
                    seed: int, max_draws: int, alpha: float) -> tuple[list[list[int]] | None, list[Evidence]]:
    """The statistical split, if it passed Holm — and, when closed testing named ranks that are not
    one of its groups, again without them (``_split_without``)."""
    if split is None or split_p > alpha:
        return None, []
    if named and not any(set(named) == set(g) for g in split.groups):
        split, split_p = _split_without(named, n, deviations, deviation_steps, pairwise, seed, max_draws,
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
    """Ranks an evidence item points at: its rank; for a split the smaller group (both when equal);
    none for a difference closed testing could not attribute; an exact cause's culprits."""
    if e.kind in EXACT_KINDS:
        return e.culprits
    if e.rank is not None:
        return [e.rank]
    if e.effect.get("attributable") is False:
        return []
    sizes = sorted({len(g) for g in e.group or []})
    if len(sizes) > 1:
        return [r for g in e.group for r in g if len(g) == sizes[0]]
    return [r for g in e.group or [] for r in g]


def _split_without(outliers: list[int], n: int, deviations: np.ndarray, steps: list[int],
                   pairwise: tuple[np.ndarray, np.ndarray, list[int]], seed: int, max_draws: int,
                   multiplier: int, p_before: float) -> tuple[GroupResult | None, float]:
    """The group test again without the ranks closed testing named, so that one strong outlier (the
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


def _offset_groups(family: dict[str, tuple[list[int], np.ndarray, bool]], significant: list[str], named: list[int],
                   n: int) -> list[list[int]] | None:
    """A split from closed testing's names: 2 … N−2 ranks named, all off the same way in a
    significant metric (a data pipeline or node type of their own) — the first metric that has one."""
    if not 2 <= len(named) <= n - 2:
        return None
    rest = [r for r in range(n) if r not in named]
    for metric in significant:
        x = family[metric][1]
        signs = {bool(np.mean(x[:, r] - x[:, rest].mean(axis=1)) > 0) for r in named}
        if len(signs) == 1:
            return sorted([sorted(named), rest], key=lambda g: g[0])
    return None


def verdict_record(rows: Sequence[Row], *, world_size: int | None = None, alpha: float = 0.01,
                   replicas_intended: bool | None = None, intended: Sequence[str] = (),
                   exact_items: Sequence[Evidence] | None = None) -> Row:
    """``diagnose(rows).to_record()``, never raising: a verdict that cannot be computed says why
    (``status: "unknown"``) instead of costing the run its record."""
    try:
        return diagnose(rows, alpha=alpha, world_size=world_size, replicas_intended=replicas_intended,
                        intended=intended, exact_items=exact_items).to_record()
    except Exception as e:  # noqa: BLE001 - the record matters more than the judgement
        return {"status": "unknown", "ranks": [], "groups": None, "since_step": None, "until_step": None,
                "alpha": alpha, "evidence": [], "steps": len(rows), "headline": f"no verdict: {type(e).__name__}: {e}",
                "notes": []}
