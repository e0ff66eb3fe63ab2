"""The verdict's evidence items, built from the tests' results: persistent (per named rank, per
group, or not attributable), transient (spikes), non-finite values, weight divergence.

Kept apart from ``verdict`` (which runs the tests and decides the status) so that each kind of
finding has one builder; an exact, non-statistical kind of evidence (data fingerprints, state
checksums, config) is one more builder returning ``Evidence`` items — ``evidence.counts`` decides
whether it makes the run inconsistent.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from testbed.diagnose.evidence import Evidence
from testbed.diagnose.naming import chernoff_p, group_effect, rank_effect
from testbed.diagnose.summary import diverging_ranks
from testbed.diagnose.transient import Spike

Row = dict[str, Any]


def persistent_evidence(metric: str, steps: list[int], x: np.ndarray, u: np.ndarray, log_scale: bool,
                        p_metric: float, named: list[int], name_p: dict[int, float],
                        groups: list[list[int]] | None, n: int) -> list[tuple[Evidence, float]]:
    """Evidence of one significant metric (Holm-adjusted ``p_metric``), each item with the p-value of
    its own deviation (0 where that does not apply): two ranks → the pair; a split → the groups;
    named ranks → each against the healthy reference (the ranks not named; ``naming.chernoff_p``
    tests its own deviation there); nobody named → the metric differs between ranks, attributable to
    none (``effect.attributable`` false). ``select_rank_evidence`` keeps the items worth stating."""
    kind = "relative" if log_scale else "difference"
    if n == 2 or (groups is not None and (not named or set(named) in
                                           ({*groups[0]}, {*groups[1]}, {*groups[0], *groups[1]}))):
        a, b = [[0], [1]] if n == 2 else groups
        unit = f"{kind} (mean of ranks {_ranks(a)} vs ranks {_ranks(b)})"
        return [(Evidence(metric, "persistent", group_effect(x, steps, a, b, log_scale, unit), p_metric,
                          group=[a, b]), 0.0)]
    healthy = [r for r in range(n) if r not in named]
    if not named or not healthy:
        leader = int(np.argmax(np.abs(u.sum(axis=0))))
        rest = [r for r in range(n) if r != leader]
        effect = rank_effect(x, steps, leader, rest, log_scale, f"{kind} (largest rank vs the others)")
        effect.update(attributable=False, leading_rank=leader)
        return [(Evidence(metric, "persistent", effect, p_metric, group=[[r] for r in range(n)]), 0.0)]
    out = []
    for r in named:
        p_own = chernoff_p(u, r, healthy)
        effect = rank_effect(x, steps, r, healthy, log_scale, f"{kind} (rank vs the healthy ranks {_ranks(healthy)})")
        out.append((Evidence(metric, "persistent", effect, max(p_metric, name_p.get(r, p_metric)), rank=r), p_own))
    return out


def select_rank_evidence(items: list[tuple[Evidence, float]], alpha: float) -> list[Evidence]:
    """Every group item; per named rank, the metrics where its own deviation is significant (its
    p-value then includes that test), or — when none is on its own (an effect that lasted a few
    steps of a long run) — the metric where it is closest, with the rank's closed-testing p."""
    out = [e for e, _ in items if e.rank is None]
    by_rank: dict[int, list[tuple[Evidence, float]]] = {}
    for e, p_own in items:
        if e.rank is not None:
            by_rank.setdefault(e.rank, []).append((e, p_own))
    for rank_items in by_rank.values():
        strong = [(e, p) for e, p in rank_items if p <= alpha]
        if strong:
            out += [Evidence(e.metric, e.kind, e.effect, max(e.p_value or 0.0, p), rank=e.rank) for e, p in strong]
        else:
            out.append(min(rank_items, key=lambda item: item[1])[0])
    return out


def transient_evidence(spikes: Sequence[Spike], threshold: float, adjusted: float | None,
                       multiplier: int, alpha: float) -> list[Evidence]:
    """One item per (rank, metric) with a spike; its p-value Holm-adjusted (``adjusted``: the
    transient test's adjusted p, ``multiplier``: its Holm multiplier); counts when confirmed."""
    out = []
    for s in spikes:
        p = None if s.p_value is None or adjusted is None else min(1.0, max(adjusted, s.p_value * multiplier))
        out.append(Evidence(s.metric, "transient", {
            "value": round(s.peak_z, 3), "unit": "robust z (peak)", "peak_step": s.peak_step, "threshold": threshold,
            "confirmed": s.confirmed and p is not None and p <= alpha, "reference": round(s.reference, 3),
            "since_step": s.first_step, "until_step": s.last_step + 1, "steps": s.steps, "of": s.of}, p, rank=s.rank))
    return out


def nonfinite_evidence(rows: Sequence[Row]) -> list[Evidence]:
    """Ranks flagged non-finite at the first step any rank was (later ones follow from the all-reduce)."""
    hits: dict[tuple[int, str], list[int]] = {}
    for row in rows:
        for flag in row.get("flags") or []:
            kind, rank = (flag.get("kind"), flag.get("rank")) if isinstance(flag, dict) else (None, None)
            if kind in ("nonfinite_loss", "nonfinite_grad") and isinstance(rank, int):
                hits.setdefault((rank, "loss" if kind == "nonfinite_loss" else "grad_norm"), []).append(row["step"])
    if not hits:
        return []
    first = min(s[0] for s in hits.values())
    return [Evidence(metric, "nonfinite", {"value": len(s), "unit": "steps with a non-finite value",
                                           "since_step": s[0]}, None, rank=rank)
            for (rank, metric), s in sorted(hits.items()) if s[0] == first]


def divergence_evidence(rows: Sequence[Row], n: int) -> tuple[list[Evidence], list[list[int]] | None]:
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


def _ranks(group: list[int]) -> str:
    return ",".join(str(r) for r in group)
