"""Who is named, and against what: the verdict's attribution.

Closed testing (Marcus, Peritz & Gabriel 1976). For every set A of at least ⌈N/2⌉ ranks, H_A says
the ranks of A are exchangeable among themselves. A rank is named only when every such H_A with
A ∋ r is rejected at α: by the verdict's own permutation family for A = all ranks (Holm; at least
one persistent test significant), and for the others by the smaller of two valid tests, doubled
(Bonferroni): the betting e-process of A (``testbed.diagnose.betting``: ``p = 1 / sup_t E_A(t)``,
valid by Ville's inequality; it sees an effect that starts late), and the Chernoff bound of each
member's summed standardized deviation within A (``set_chernoff``; it sees a weak effect that
lasts), Bonferroni over the members and metrics. If at least half the ranks are
healthy, the healthy ranks H are one of the sets, and naming any healthy rank needs H_H rejected:
the chance that the verdict names a healthy rank is ≤ α, however many ranks are faulty and
however they are (beyond half, no test can tell which side is healthy: nothing is named then,
unless a split is found). A rank's p-value is the largest local p over its sets.

Effects are measured against the healthy reference only — the ranks not named — so a faulty rank
cannot make the others look faulty ("50 % below the other ranks"). Whether a named rank is off in
a given metric is a test against that reference too: the Chernoff bound of the rank's summed
standardized deviation under relabelings within the reference plus the rank (a valid p-value,
``chernoff_p``). The effect's start and end come from a change-point estimate
(``testbed.diagnose.changepoint``) with support intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.diagnose.betting import closed_names, run, subsets
from testbed.diagnose.changepoint import effect_span
from testbed.diagnose.exchangeability import standardize

THETAS = np.linspace(-2.0, 2.0, 41)  # Chernoff: the bound is taken at the best of these tilts


@dataclass(frozen=True)
class Names:
    """Ranks named (closed testing), each rank's adjusted p-value, the number of sets tested, and
    the maximal sets not rejected (each could be the healthy ranks)."""

    ranks: list[int]
    p_values: dict[int, float]
    sets: int
    kept: list[list[int]]

    def split(self, n: int) -> list[list[int]] | None:
        """Two groups when nobody is named but the sets not rejected are two disjoint groups that
        cover all ranks: each is internally exchangeable, and no set mixing them is (a split of
        the ranks into two halves that differ — which half is wrong is not decidable)."""
        if self.ranks or len(self.kept) != 2:
            return None
        a, b = self.kept
        if set(a) & set(b) or len(a) + len(b) != n:
            return None
        return sorted([sorted(a), sorted(b)], key=lambda g: g[0])


def name_ranks(family: dict[str, tuple[list[int], np.ndarray, bool]], n: int, alpha: float,
               all_ranks_p: float) -> Names:
    """Closed testing on the record (module doc). ``family``: metric → (steps, comparable values
    [T, N], log scale); ``all_ranks_p``: the verdict's smallest Holm-adjusted persistent p (the
    local test of all ranks)."""
    members = subsets(n)
    if all_ranks_p > alpha or n < 2:
        return Names([], {}, members.shape[0], [])
    if members.shape[0] == 1:  # two ranks: the pair alone, judged by the permutation family
        return Names(list(range(n)), {r: all_ranks_p for r in range(n)}, 1, [])
    steps = sorted({s for steps_m, _, _ in family.values() for s in steps_m})
    where = {s: i for i, s in enumerate(steps)}
    x = np.full((len(steps), len(family), n), np.nan)
    for k, (steps_m, values, _) in enumerate(family.values()):
        x[[where[s] for s in steps_m], k] = values
    us = [standardize(values) for _, values, _ in family.values()]
    member_p = member_chernoff(us, members)  # [S, N]
    local_p = np.minimum(1.0, 2 * member_p.min(axis=1) * members.sum(axis=1) * len(us))
    # The e-process (the test is the min of both) is computed only where it can still name a rank:
    # on the open sets of the ranks with the largest share of their sets already rejected. Leaving
    # other sets unrejected can only name fewer ranks, never a healthy one.
    rejected_share = np.array([np.mean(local_p[members[:, r]] <= alpha) for r in range(n)])
    standout = rejected_share == rejected_share.max()
    open_sets = np.flatnonzero((local_p > alpha) & members[:, standout].any(axis=1))
    open_sets = open_sets[open_sets > 0]
    if open_sets.size:
        bets, _ = run(x, members[open_sets])
        local_p[open_sets] = np.minimum(local_p[open_sets], np.minimum(1.0, 2 * np.exp(-bets.sup_log_e[0])))
    local_p[0] = all_ranks_p  # row 0: all ranks, judged by the permutation family
    named = closed_names(members, local_p <= alpha)
    kept = [set(np.flatnonzero(row)) for row in members[local_p > alpha]]
    maximal = [sorted(int(r) for r in a) for a in kept if not any(a < b for b in kept)]
    return Names(named, {r: float(local_p[members[:, r]].max()) for r in named}, members.shape[0], maximal)


def member_chernoff(us: list[np.ndarray], members: np.ndarray) -> np.ndarray:
    """``p [S, N]`` (1 for non-members): for every set A and member r, the smallest over metrics of a
    valid p-value that r's summed deviations ``Σ_t (u_r − mean_A u)`` are those of a rank exchangeable
    with A — the Chernoff bound under per-step relabelings within A, at the tilt θ = s / V (s the
    observed sum, V the summed per-step variances within A: functions of the multisets, so the
    bound holds at that θ), two-sided. A set's test is ``|A| · K · min`` over members and metrics."""
    sizes = members.sum(axis=1)
    best = np.ones(members.shape)
    for u in us:
        mean = (members @ u.T) / sizes[:, None]  # [S, T]
        var = (members @ (u ** 2).T) / sizes[:, None] - mean ** 2
        total_var = np.maximum(var.sum(axis=1), 1e-12)  # [S]
        for r in range(u.shape[1]):
            inside = members[:, r]
            if not inside.any():
                continue
            s = np.sum(u[:, r][None, :] - mean[inside], axis=1)  # [S_r]
            theta = np.clip(s / total_var[inside], -THETAS[-1], THETAS[-1])
            tilt = theta[:, None, None] * (u[None, :, :] - u[None, :, [r]])  # [S_r, T, N]
            mgf = np.sum(np.exp(tilt) * members[inside][:, None, :], axis=2) / sizes[inside][:, None]
            log_bound = np.sum(np.log(mgf), axis=1)  # log E[e^{θ(S* − s)}]: small when s is extreme
            best[inside, r] = np.minimum(best[inside, r], 2.0 * np.exp(np.minimum(0.0, log_bound)))
    return np.minimum(1.0, best)


def set_chernoff(us: list[np.ndarray], members: np.ndarray) -> np.ndarray:
    """``p [S]``: every set's test from its members' summed deviations (``member_chernoff``;
    Bonferroni over members and metrics)."""
    return np.minimum(1.0, member_chernoff(us, members).min(axis=1) * members.sum(axis=1) * len(us))


def chernoff_p(u: np.ndarray, rank: int, reference: list[int]) -> float:
    """Two-sided p-value that ``rank``'s summed deviations ``u [T, N]`` (standardized, bounded) are
    those of a rank exchangeable with ``reference`` at every step: under per-step relabelings within
    ``reference + [rank]``, ``P(Σ_t u_r ≥ s) ≤ inf_θ E[e^{θ Σ u_r}] e^{−θ s}``, and the expectation is
    the product over steps of the mean of ``e^{θ u_j}`` over the set — a bound, hence a valid p."""
    pool = sorted(set(reference) | {rank})
    if len(pool) < 2 or u.shape[0] == 0:
        return 1.0
    diff = u[:, pool] - u[:, [rank]]  # [T, M]
    tilt = THETAS[:, None, None] * diff[None]  # [G, T, M]
    top = tilt.max(axis=2, keepdims=True)
    log_mgf = np.sum(np.log(np.mean(np.exp(tilt - top), axis=2)) + top[:, :, 0], axis=1)  # [G]
    return float(min(1.0, 2.0 * math.exp(min(0.0, float(log_mgf.min())))))


def rank_effect(x: np.ndarray, steps: list[int], rank: int, reference: list[int], log_scale: bool,
                unit: str) -> dict[str, Any]:
    """The effect of ``rank`` against ``reference`` over the segment where it holds: its mean
    difference (a ratio − 1 in log space), how many steps agree in sign, and the span."""
    return _effect(x[:, rank] - x[:, reference].mean(axis=1), steps, log_scale, unit)


def group_effect(x: np.ndarray, steps: list[int], a: list[int], b: list[int], log_scale: bool, unit: str) -> dict[str, Any]:
    return _effect(x[:, a].mean(axis=1) - x[:, b].mean(axis=1), steps, log_scale, unit)


def _effect(diff: np.ndarray, steps: list[int], log_scale: bool, unit: str) -> dict[str, Any]:
    """The span comes from the difference itself (change points on the comparable values: a
    clipped, standardized series would flatten a strong effect to the level of the chance
    excursions before it)."""
    span = effect_span(diff, steps)
    start = steps.index(span["since_step"]) if span["since_step"] in steps else 0
    end = steps.index(span["until_step"]) if span.get("until_step") in steps else len(steps)
    inside = diff[start:end] if end > start else diff
    mean = float(inside.mean())
    value = math.expm1(mean) if log_scale else mean
    agree = int(np.sum(np.sign(inside) == np.sign(mean))) if mean != 0 else 0
    return {"value": round(value, 6), "unit": unit, **span, "steps": agree, "of": int(inside.size)}
