"""Per-step bets against rank exchangeability: the e-values behind the online test and the verdict's
attribution.

Null hypothesis. Healthy synchronous DP: given everything recorded before step t and the step's
multiset of per-rank vectors ``x(t, j)`` (loss, grad norm, cosine to the mean), the rank labels are
a uniformly random permutation. For a set A of ranks, ``H_A`` says this of A alone: permuting the
labels of the ranks in A leaves the law of the record unchanged, whatever the other ranks do.

Bet. Each step turns every rank's values into standardized deviations ``V_j`` (per metric: minus
the median of all N ranks, over a spread known before the step, clipped to ±``CLIP``). For a set
A ∋ r an expert k fixes, before the step, a score function ``s`` and a fraction λ; the step pays

    e_{A,r,k}(t) = 1 − λ + λ · |A| · exp(s(V_r)) / Σ_{j∈A} exp(s(V_j)).

Validity (the proof). V is computed by a rule that treats every rank alike (the median is a
symmetric function of the step's values, the spread a function of earlier steps), so relabeling
the ranks of A permutes their V_j and changes nothing else. Under H_A, conditionally on the past
and on the step's multiset, rank r holds each of A's vectors with probability 1/|A|; hence
``E[|A| · softmax_A(s)_r | past] = Σ_{j∈A} softmax_A(s)_j = 1`` and ``E[e | past] = 1``, while
``e ≥ 1 − λ > 0``. With s and λ fixed before the step (predictable: they depend on earlier steps
only), ``Π_{u≤t} e_{A,r,k}(u)`` is a non-negative martingale from 1 — a test martingale — and so
is an average of test martingales on one filtration with weights fixed in advance. So
``E_A(t) = Σ_k w_k · mean_{r∈A} Π_{u≤t} e_{A,r,k}(u)`` is a test martingale under H_A, and Ville's
inequality gives ``P(sup_t E_A(t) ≥ 1/α) ≤ α`` — however long the run, however often it is looked
at, whatever the metrics' distributions, drift or tails. (Shafer & Vovk 2019; Ramdas, Grünwald,
Vovk & Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference", Statistical
Science 38. The softmax is the exact likelihood ratio, given the step's multiset, of an
exponential-tilt alternative for rank r.) One step multiplies E_A by at most |A| (everything on
the right rank), so no test of H_A rejects in fewer than ``⌈ln(1/α)/ln|A|⌉`` steps: the floor.

Experts. A rank's metrics enter one joint score per step (a step's metrics are not independent,
so they are not bet on separately):

- ``hold``: bets nothing (λ = 0): a share of the wealth kept aside, so that a long healthy stretch
  cannot wear E_A down before a late fault starts;
- ``extreme``: ``s = β·max(0, Σ_m V_m² − c)`` — "r is far beyond the others" in any direction;
  nothing is bet at a step where no rank passes c, so a healthy run rarely pays for it;
- ``extreme again``: the same, but only for a rank that was beyond c at one of the two previous
  steps (a blatant fault pays ≈ |A| per step from its second step, a healthy run rarely bets);
- ``same direction``: ``s = θ·V`` with θ half of r's previous deviations when one was beyond
  ±``GATE`` (a shift that persists);
- ``recent`` / ``cumulative``: ``s = θ·V`` with θ = mean / variance of r's past deviations
  (discounted, half-life ``HALF_LIFE`` steps / the whole run; shrunk to 0) — weak shifts, learned
  as they accrue.

c is ``EXTREME`` or, with heavier tails, the median over ranks of each rank's recent 90th
percentile of Σ V² (a median over ranks: one faulty rank cannot raise it).
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

CLIP = 6.0  # standardized deviations are clipped to ±CLIP (spread units ≈ σ of one rank)
SPREAD_STEPS = 8  # past steps whose spreads are pooled (median)
LAMBDA = 0.95  # fraction of the wealth bet: a step lost costs at most ×0.05
BETA = 0.5
EXTREME = 9.0  # c ≥ 9: beyond 3σ in one metric
EXTREME_QUANTILE, EXTREME_STEPS = 0.9, 50
GATE, LOOKBACK_SCALE = 2.5, 0.5
HALF_LIFE = 4.0
PRIOR_STEPS = (2.0, 4.0)  # pseudo-steps of mean 0, variance 1 (recent, cumulative)
MIN_VARIANCE, THETA_MAX = 0.25, 3.0
EXPERTS = ("hold", "extreme", "extreme again", "same direction", "recent", "cumulative")
WEIGHTS = np.array([0.15, 0.15, 0.25, 0.2, 0.125, 0.125])  # fixed in advance, sum 1
PAIR_WEIGHTS = np.array([0.3, 0.0, 0.0, 0.35, 0.175, 0.175])  # two ranks: Σ V² is the same for both
MAX_SETS = 300
_SEED = 20240531


@lru_cache(maxsize=None)
def spread_factors(n: int) -> tuple[float, float]:
    """σ-consistency factors for n standard normal ranks of (a) the step's median absolute
    deviation from the median, (b) the median absolute deviation of the ranks' changes from one
    step to the next (seeded Monte-Carlo constants; (b) is pooled by a median, so calibrated so)."""
    x = np.random.default_rng([_SEED, n]).standard_normal((20001, n))
    within = np.mean(np.median(np.abs(x - np.median(x, axis=1, keepdims=True)), axis=1))
    change = np.diff(x, axis=0)
    across = np.median(np.median(np.abs(change - np.median(change, axis=1, keepdims=True)), axis=1))
    return float(1.0 / within), float(1.0 / across)


def subsets(n: int, max_sets: int = MAX_SETS) -> np.ndarray:
    """``[S, n]`` membership of the sets tested; row 0 is all ranks. Every set of at least ⌈n/2⌉
    ranks ("at least half the ranks are healthy"); when those are more than ``max_sets``, the sets
    missing at most k ranks for the largest k that fits (then the guarantee assumes at most k
    faulty ranks). Two ranks: the pair only (attribution is impossible)."""
    smallest = max(2, math.ceil(n / 2)) if n > 2 else n
    while smallest < n and sum(math.comb(n, s) for s in range(smallest, n + 1)) > max_sets:
        smallest += 1
    rows = [np.ones(n, dtype=bool)]
    for size in range(n - 1, smallest - 1, -1):
        for members in itertools.combinations(range(n), size):
            row = np.zeros(n, dtype=bool)
            row[list(members)] = True
            rows.append(row)
    return np.array(rows)


def closed_names(members: np.ndarray, rejected: np.ndarray) -> list[int]:
    """Closed testing: rank r is named when every tested set containing it is rejected. When the
    healthy ranks form a tested set H, naming any healthy rank needs H rejected — probability ≤ α."""
    return [r for r in range(members.shape[1]) if bool(np.all(rejected[members[:, r]]))]


class RankBets:
    """The e-processes ``E_A`` of every tested set A, for B independent streams at once (the
    online test uses B = 1), fed one step at a time.

    ``step(x)``: the step's comparable values ``[B, K, N]`` (NaN where undefined: that metric sits
    the step out). ``log_e [B, S]`` is ``log E_A`` now, ``sup_log_e`` its running maximum."""

    def __init__(self, n: int, metrics: int, members: np.ndarray | None = None, batch: int = 1) -> None:
        self.n, self.k, self.b = n, metrics, batch
        self.members = subsets(n) if members is None else np.asarray(members, dtype=bool)
        self.size = self.members.sum(axis=1)
        sets = self.members.shape[0]
        self.log_w = np.zeros((batch, sets, n, len(EXPERTS)))  # log wealth (stream, set, rank, expert)
        self.log_e = np.zeros((batch, sets))
        self.sup_log_e = np.zeros((batch, sets))
        self.steps = 0
        with np.errstate(divide="ignore"):
            prior = np.log(PAIR_WEIGHTS if n == 2 else WEIGHTS)
        self._offset = np.where(self.members[:, :, None], prior, -np.inf)
        self._within, self._across = spread_factors(max(n, 2))
        self._spreads = np.full((batch, SPREAD_STEPS, metrics), np.nan)  # ring of past spreads
        self._last = np.full((batch, metrics, n), np.nan)
        self._energies = np.zeros((batch, EXTREME_STEPS, n))
        self.previous = np.zeros((batch, metrics, n))
        self._before = np.zeros((batch, n))  # Σ V² of each rank two steps back
        self._recent = _Moments(0.5 ** (1 / HALF_LIFE), PRIOR_STEPS[0], (batch, metrics, n))
        self.total = _Moments(1.0, PRIOR_STEPS[1], (batch, metrics, n))

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """``V [B, K, N]``: deviations from the median of all ranks over the pooled spread of the
        last ``SPREAD_STEPS`` steps — the median absolute deviation of the ranks' changes from one
        step to the next. That spread is known before the step (any choice is then valid) and
        blind to a rank's persistent offset, which cancels in the change (with two ranks the
        step's own spread would grow with the very offset it should measure). Until three changes
        are known, the step's own median absolute deviation (a symmetric function of its values)
        stands in. A metric with a non-finite value, or no spread, gives zeros."""
        finite = np.isfinite(x).all(axis=2)  # [B, K]
        xs = np.where(finite[:, :, None], x, 0.0)
        dev = xs - np.median(xs, axis=2, keepdims=True)
        known = np.sum(np.isfinite(self._spreads), axis=1)  # [B, K]
        with np.errstate(all="ignore"):
            pooled = (np.median(self._spreads, axis=1) if bool(np.all(known == SPREAD_STEPS))
                      else np.nanmedian(np.where(known[:, None, :] > 0, self._spreads, 0.0), axis=1))
            own = np.median(np.abs(dev), axis=2) * self._within
            scale = np.where(known >= 3, pooled, own)
            v = np.where((scale > 0)[:, :, None] & finite[:, :, None], dev / scale[:, :, None], 0.0)
        change = xs - self._last  # NaN until known
        spread = np.median(np.abs(change - np.median(change, axis=2, keepdims=True)), axis=2) * self._across
        slot = self.steps % SPREAD_STEPS
        self._spreads[:, slot] = np.where(finite, spread, self._spreads[:, slot])
        self._last = np.where(finite[:, :, None], xs, self._last)
        return np.clip(np.nan_to_num(v), -CLIP, CLIP)

    def forget_spread(self, metric: int) -> None:
        """Start a metric's spread afresh (its values changed scale, e.g. left log space)."""
        self._spreads[:, :, metric] = np.nan
        self._last[:, metric] = np.nan

    def step(self, x: np.ndarray) -> np.ndarray:
        """Bet on one step (``x [B, K, N]``); returns its standardized deviations ``V``."""
        v = self.standardize(np.asarray(x, dtype=float).reshape(self.b, self.k, self.n))
        self.log_w += self._log_factors(v)
        self.log_e = _logsumexp(self.log_w + self._offset, axis=(2, 3)) - np.log(self.size)
        self.sup_log_e = np.maximum(self.sup_log_e, self.log_e)
        self._energies[:, self.steps % EXTREME_STEPS] = np.sum(v ** 2, axis=1)
        self._before = np.sum(self.previous ** 2, axis=1)
        self.previous = v
        self._recent.add(v)
        self.total.add(v)
        self.steps += 1
        return v

    def extreme(self) -> np.ndarray:
        """``c [B]``: ``EXTREME``, or the median over ranks of each rank's 90th percentile of Σ V²
        over the last steps when that is higher (heavy tails: bet only beyond them)."""
        filled = min(self.steps, EXTREME_STEPS)
        if filled < 20:
            return np.full(self.b, EXTREME)
        k = int(EXTREME_QUANTILE * (filled - 1))
        per_rank = np.partition(self._energies[:, :filled], k, axis=1)[:, k]  # [B, N]
        return np.maximum(EXTREME, np.median(per_rank, axis=1))

    def _log_factors(self, v: np.ndarray) -> np.ndarray:
        """``log e [B, S, N, E]`` of this step for every stream, set, rank and expert."""
        c = self.extreme()[:, None]
        excess = BETA * np.maximum(0.0, np.sum(v ** 2, axis=1) - c)  # [B, N]
        extreme_before = np.maximum(np.sum(self.previous ** 2, axis=1), self._before) > c
        flat = np.broadcast_to(excess[:, None, :], (self.b, self.n, self.n))  # scores[b, r, j]
        big = np.max(np.abs(self.previous), axis=1, keepdims=True) >= GATE
        thetas = np.stack([np.where(big, LOOKBACK_SCALE * self.previous, 0.0), self._recent.theta(), self.total.theta()])
        directional = np.einsum("ebkr,bkj->ebrj", np.clip(thetas, -THETA_MAX, THETA_MAX), v)  # one direction per rank
        scores = np.concatenate([np.stack([flat, flat]), directional])  # [E − 1, B, N(r), N(j)]: all but "hold"
        lam = np.full((scores.shape[0], self.b, self.n), LAMBDA)
        lam[1] *= extreme_before  # "extreme again" bets only on a rank extreme just before
        out = np.zeros((self.b, self.members.shape[0], self.n, len(EXPERTS)))  # "hold" stays 0
        out[..., 1:] = np.moveaxis(self._share_log(scores, lam), 0, -1)
        return out

    def _share_log(self, scores: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """``log(1 − λ + λ |A| softmax_A(scores[r])_r)`` ``[E, B, S, N(r)]``; ``scores[e, b, r, j]`` is
        rank r's score function applied to rank j (a span of < 2·3·3·6 + β·3·36: no underflow)."""
        weights = np.exp(scores - scores.max(axis=3, keepdims=True))
        own = np.diagonal(weights, axis1=2, axis2=3)[:, :, None, :]  # [E, B, 1, N]
        denominator = np.einsum("sj,ebrj->ebsr", self.members, weights)  # Σ_{j∈A} exp(s_r(V_j))
        with np.errstate(all="ignore"):
            share = np.where(self.members, own / denominator, 0.0)
            return np.where(self.members, np.log1p(lam[:, :, None, :] * (self.size[:, None] * share - 1.0)), 0.0)

    def leading(self, stream: int = 0) -> tuple[int, int]:
        """(rank, metric) carrying the most evidence in the set of all ranks: the rank with the
        largest wealth, and the metric of its largest mean deviation so far."""
        r = int(np.argmax(_logsumexp(self.log_w[stream, 0] + self._offset[0], axis=1)))
        return r, int(np.argmax(np.abs(self.total.mean()[stream, :, r])))


class _Moments:
    """Discounted first and second moments of the ranks' deviations, shrunk to mean 0 and variance
    1 by ``prior`` pseudo-steps; ``theta`` = mean / variance (the log-optimal tilt for a Gaussian
    shift), the variance floored at ``MIN_VARIANCE``."""

    def __init__(self, decay: float, prior: float, shape: tuple[int, ...]) -> None:
        self.decay, self.prior = decay, prior
        self.s1, self.s2, self.w = np.zeros(shape), np.zeros(shape), 0.0

    def add(self, v: np.ndarray) -> None:
        self.s1 = self.decay * self.s1 + v
        self.s2 = self.decay * self.s2 + v ** 2
        self.w = self.decay * self.w + 1.0

    def mean(self) -> np.ndarray:
        return self.s1 / (self.w + self.prior)

    def theta(self) -> np.ndarray:
        mean = self.mean()
        var = (self.s2 + self.prior) / (self.w + self.prior) - mean ** 2
        return mean / np.maximum(var, MIN_VARIANCE)


def _logsumexp(a: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def run(x: np.ndarray, members: np.ndarray | None = None) -> tuple[RankBets, np.ndarray]:
    """Feed ``x [T, K, N]`` (one stream) or ``[T, B, K, N]`` (B streams) step by step; returns the
    final state and ``log E_A(t)``: ``[T, S]`` or ``[T, B, S]``."""
    x = np.asarray(x, dtype=float)
    single = x.ndim == 3
    xb = x[:, None] if single else x
    bets = RankBets(xb.shape[3], xb.shape[2], members, batch=xb.shape[1])
    trace = np.empty((xb.shape[0], xb.shape[1], bets.members.shape[0]))
    for t in range(xb.shape[0]):
        bets.step(xb[t])
        trace[t] = bets.log_e
    return bets, (trace[:, 0] if single else trace)
