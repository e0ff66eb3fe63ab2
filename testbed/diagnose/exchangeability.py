"""Per-step rank-label permutation tests: does one rank's metric series differ from the others'?

Null hypothesis (healthy synchronous DP): at every step the rank labels are exchangeable — with a
shared shuffle and shared seeds, which rank received which samples is random, so the joint law of
a step's per-rank values is unchanged by permuting the ranks, independently at each step. A test
that compares the observed statistic with its distribution over *per-step* relabelings is then
exact for any per-rank distribution (heavy tails included) and any drift over training: the drift
is common to the ranks at a step, and a relabeling never mixes steps.

Statistic, per metric (loss and gradient norm as ``log x`` when all positive, so that a deviation
is a ratio; cosines linear)::

    dev(t, i) = x(t, i) − median_j x(t, j)
    s(t)      = median over steps t−5 … t+5 of  c_N · median_j |dev(t', j)|   (pooled robust spread)
    u(t, i)   = clip(dev(t, i) / s(t), −3, 3),  then re-centred so that Σ_i u(t, i) = 0
    Z_i       = Σ_t u(t, i),     T = max_i |Z_i|

``s(t)`` is a symmetric function of each step's values, so it is unchanged by any relabeling and
the standardization keeps the test exact; it removes the drift of scale (loss CV grew 10× over
20 steps on the transformer ladder), and the clip keeps one spike from owning the sum (spikes are
the transient rule's business, ``testbed.diagnose.attribution``). With two ranks the relabelings are sign
flips of the pair difference: the test is the exact sign-flip test.

p-values: Monte-Carlo relabelings with a fixed seed (deterministic): each step gets an independent
random element of the dihedral group ``j → (±j + c) mod N`` (a group of relabelings under which the
null is invariant, so the test is exact; every rank still receives a uniformly random rank's value
at every step), ``p = (1 + #{T* ≥ T}) / (1 + B)``,
stopped early once ``MIN_EXCEED`` draws have reached T (Besag & Clifford 1991, "Sequential Monte
Carlo p-values", Biometrika 78: p = h / L, still a valid p-value) — a healthy run costs a few dozen
draws, a significant one the full B. Where every relabeling can be listed (``(N!)^T ≤ EXACT_LIMIT``)
the p-value is exact: the share of relabelings with ``T* ≥ T``.

Who is named is not decided here: ``testbed.diagnose.naming`` (closed testing, so that a healthy
rank is named with probability ≤ α).

Bit-identical ranks (replicated batches) leave nothing random to permute: ``replicas``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from testbed.diagnose.betting import spread_factors

CLIP = 3.0  # in units of the pooled spread (≈ σ for normal data)
SPREAD_STEPS = 5  # steps on each side whose spreads are pooled
MIN_EXCEED = 10  # Besag–Clifford: stop once this many draws reached the observed statistic
BATCH = 512  # at most this many relabelings per numpy call (the first batches are smaller)
EXACT_LIMIT = 4096  # enumerate every relabeling when there are at most this many
_REL_TIE = 1e-9  # T* ≥ T within float round-off counts as reaching T (conservative)


def standardize(x: np.ndarray, window: int = SPREAD_STEPS, clip: float = CLIP, recenter: bool = True) -> np.ndarray:
    """``u [T, N]`` for finite ``x [T, N]`` (module doc): centred on the step's median, divided by the
    pooled spread, clipped, re-centred (``recenter``; without it one outlier leaves the others
    centred on 0, which the group test needs). Steps whose pooled spread is 0 fall back on their
    own spread; a step with no spread at all gives zeros."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.zeros_like(x)
    dev = x - np.median(x, axis=1, keepdims=True)
    spread = np.median(np.abs(dev), axis=1) * spread_factors(max(2, x.shape[1]))[0]  # robust: one rank far off
    pooled = windowed_median(spread, window)  # does not inflate it, so it cannot shrink its own deviations
    rms = np.sqrt(np.mean(dev ** 2, axis=1))
    scale = np.where(pooled > 0, pooled, np.where(spread > 0, spread, rms))
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(scale[:, None] > 0, dev / scale[:, None], 0.0)
    u = np.clip(u, -clip, clip)
    return u - u.mean(axis=1, keepdims=True) if recenter else u


def windowed_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of ``values[t − window : t + window + 1]`` for every t (shorter at the ends)."""
    n = values.size
    out = np.empty(n)
    width = 2 * window + 1
    if n >= width:
        out[window:n - window] = np.median(np.lib.stride_tricks.sliding_window_view(values, width), axis=1)
    edges = sorted({*range(min(window, n)), *range(max(window, n - window), n)})
    if edges:
        short = np.full((len(edges), width), np.nan)
        for i, t in enumerate(edges):
            segment = values[max(0, t - window):t + window + 1]
            short[i, :segment.size] = segment
        out[edges] = np.nanmedian(short, axis=1)
    return out


@dataclass(frozen=True)
class PermutationResult:
    """One test: ``sums`` = Z_i, ``statistic`` = max |Z_i|, its p-value, relabelings used, exact or not."""

    sums: np.ndarray
    statistic: float
    p_value: float
    draws: int
    exact: bool


def relabeling_count(steps: int, ranks: int) -> float:
    """``(N!)^T`` — how many per-step relabelings there are (a float: it overflows quickly)."""
    return math.exp(steps * math.lgamma(ranks + 1)) if steps * math.lgamma(ranks + 1) < 700 else math.inf


def rank_sum_test(u: np.ndarray, *, rng: np.random.Generator, max_draws: int,
                  min_exceed: int = MIN_EXCEED) -> PermutationResult:
    """Permutation test of ``T = max_i |Σ_t u(t, i)|`` over independent per-step relabelings."""
    t_count, n = u.shape
    sums = u.sum(axis=0)
    observed = float(np.max(np.abs(sums))) if u.size else 0.0
    if t_count == 0 or n < 2:
        return PermutationResult(sums, observed, 1.0, 0, True)
    threshold = observed * (1 - _REL_TIE) - 1e-300
    if relabeling_count(t_count, n) <= EXACT_LIMIT:
        stats = _all_relabelings(u)
        return PermutationResult(sums, observed, float(np.mean(stats >= threshold)), int(stats.size), True)
    p, draws = monte_carlo_p(lambda k: _draw_stats(u, k, rng), threshold, max_draws, min_exceed)
    return PermutationResult(sums, observed, p, draws, False)


def monte_carlo_p(draw: Callable[[int], np.ndarray], threshold: float, max_draws: int,
                  min_exceed: int = MIN_EXCEED) -> tuple[float, int]:
    """Besag–Clifford sequential Monte-Carlo p-value of ``T* ≥ threshold``; ``draw(k)`` returns k
    null statistics. Returns (p, draws used)."""
    exceed, used, batch = 0, 0, 2 * min_exceed
    while used < max_draws:
        k = min(batch, max_draws - used)
        batch = min(2 * batch, BATCH)
        hits = np.flatnonzero(draw(k) >= threshold)
        if exceed + hits.size >= min_exceed:  # the h-th exceedance is at draw L: p = h / L
            position = used + int(hits[min_exceed - exceed - 1]) + 1
            return min_exceed / position, position
        exceed += hits.size
        used += k
    return (1 + exceed) / (1 + used), used


def _draw_stats(u: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k null statistics. Each step is relabeled by a random element of the dihedral group
    ``j → (±j + c) mod N``: a group of relabelings, so the test stays exact (any group under which
    the null law is invariant will do), and no sort is needed. Each rank's relabeled series still
    takes a uniformly random rank's value at every step, independently across steps."""
    t_count, n = u.shape
    if n == 2:  # a relabeling of two ranks is a sign flip of the (antisymmetric) pair
        signs = rng.integers(0, 2, size=(k, t_count)) * 2.0 - 1.0
        return np.abs(signs @ u[:, 1])
    shift = rng.integers(0, n, size=(k, t_count, 1))
    mirror = rng.integers(0, 2, size=(k, t_count, 1)) * (n - 2) + 1  # 1 or n − 1 ≡ −1
    perm = (mirror * np.arange(n) + shift) % n
    permuted = np.take_along_axis(np.broadcast_to(u, (k, t_count, n)), perm, axis=2)
    return np.max(np.abs(permuted.sum(axis=1)), axis=1)


def _all_relabelings(u: np.ndarray) -> np.ndarray:
    """The statistic under every per-step relabeling (identity included), vectorized."""
    t_count, n = u.shape
    perms = np.asarray(list(itertools.permutations(range(n))))  # [n!, n]
    choice = np.indices((len(perms),) * t_count).reshape(t_count, -1).T  # [K, T]
    permuted = u[np.arange(t_count)[None, :, None], perms[choice]]  # [K, T, n]
    return np.max(np.abs(permuted.sum(axis=1)), axis=1)


def onset(series: np.ndarray) -> int:
    """Index from which a shift in ``series`` (a rank's standardized deviations, mean 0 under the
    null) holds: the maximum-likelihood change point for a mean that is 0 before and constant
    after, ``argmax_τ max(S_τ, 0)² / (T − τ)`` with ``S_τ`` the sum from τ on, in the direction of the
    overall shift (the Gaussian likelihood ratio; Page 1954 / Hinkley 1970). A shift present from
    the first step gives 0."""
    if series.size == 0:
        return 0
    s = series * (1.0 if series.sum() >= 0 else -1.0)
    tail = np.cumsum(s[::-1])[::-1]  # S_τ
    score = np.maximum(tail, 0) ** 2 / np.arange(series.size, 0, -1)
    return int(np.argmax(score))
