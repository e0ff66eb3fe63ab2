"""Online verdict: an anytime-valid test of rank exchangeability, fed one row at a time.

``SequentialTest(world_size, alpha).update(row)`` returns an ``Alarm`` the first time the evidence
against healthy DP is strong enough, and the probability that a healthy run *ever* raises the
statistical alarm — however long it runs, however often it is checked — is at most α.

Method: testing by betting (Shafer & Vovk, "Game-Theoretic Foundations for Probability and
Finance", 2019; Ramdas, Grünwald, Vovk & Shafer 2023, "Game-theoretic statistics and safe
anytime-valid inference", Statistical Science 38; Waudby-Smith & Ramdas 2024, "Estimating means of
bounded random variables by betting", JRSS-B 86). Under the null the ranks are exchangeable at
every step given the past: conditionally on the step's multiset of values, the labels are a
uniform random permutation. For each metric (loss, grad norm — in log space while positive —,
cosine to the mean) and rank i, the step's score is

    v(t, i) = (x(t, i) − mean_j x(t, j)) / s(t),     g(t, i) = v(t, i) / max(C, max_j |v(t, j)|)

with s(t) the median of the per-step spreads (rms deviation from the mean) of steps t−5 … t. s(t)
and the normaliser are symmetric functions of the past and of the step's multiset, so under the
null ``E[g(t, i) | past] = mean_j g(t, j) = 0`` and ``|g| ≤ 1``. For every bet λ in a fixed grid
(|λ| < 1) the wealth ``K_λ(t) = Π_{s ≤ t} (1 + λ g(s, i))`` is then a non-negative martingale with
``K(0) = 1`` — a test martingale. The average of test martingales on one filtration is one, so

    E(t) = mean over metrics m, ranks i, bets λ of K_{m,i,λ}(t)

is a test martingale (a mixture over λ: no tuning of the bet size, the best one in the grid
dominates once evidence accrues). Ville's inequality gives ``P(sup_t E(t) ≥ 1/α) ≤ α``: alarm when
``E ≥ 1/α``. The alarm names the (metric, rank) whose own wealth is largest (with two ranks the
two wealths mirror each other: both ranks are named, not attributable). Skipped steps (a
non-finite value, a metric not recorded) bet nothing — a factor 1.

Besides this statistical alarm, exact rules raise alarms (outside the α budget, they are not
random under the null): weights out of sync (``divergence``), a non-finite value on a rank
(``nonfinite``), and bit-identical ranks (replicated batches, ``replicas``) that differ — ranks set
apart from a majority of replicas from the start (``persistent``), or a rank leaving its replicas
later (``transient``). Spikes of one step (the batch verdict's ``transient`` rule) need the steps
around them and are not judged online.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.attribution import LOG_METRICS, METRICS
from testbed.diagnose.replicas import breaks, classes, outside_majority, partition
from testbed.diagnose.summary import diverging_ranks

Row = dict[str, Any]
BETS = np.array([-0.75, -0.5, -0.25, -0.125, -0.0625, 0.0625, 0.125, 0.25, 0.5, 0.75])
SCALE = 2.0  # C: v beyond ±C shrinks the whole step (a spike cannot bet more than |g| = 1)
WINDOW = 5  # past steps whose spreads are pooled with the current one
MIN_TIED = 2  # steps of bit-identical ranks before a difference is an exact alarm
_SEVERITY = {"divergence": 0, "nonfinite": 1, "transient": 2, "persistent": 3}


@dataclass(frozen=True)
class Alarm:
    """What fired: ``rank`` (None when not attributable; ``ranks`` lists those involved), ``metric``,
    ``step``, ``e_value`` (the combined e-value that crossed 1/α; ``inf`` for the exact rules)."""

    kind: str  # persistent | transient | nonfinite | divergence
    step: int
    metric: str
    rank: int | None
    ranks: tuple[int, ...]
    e_value: float

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "ranks " + ", ".join(map(str, self.ranks))
        ev = "exact rule" if math.isinf(self.e_value) else f"e-value {self.e_value:.3g}"
        return f"{self.kind} alarm at step {self.step}: {who}, {self.metric} ({ev})"


def step_scores(x: np.ndarray, spreads: Sequence[float], scale: float = SCALE) -> np.ndarray | None:
    """``g [N]`` for one step's finite values ``x`` given the pooled window's past ``spreads``
    (module doc); None when there is no spread to standardize by."""
    dev = x - x.mean()
    spread = float(np.sqrt(np.mean(dev ** 2)))
    s = float(np.median([*spreads, spread]))
    if not s > 0:
        return None
    v = dev / s
    return v / max(scale, float(np.max(np.abs(v))))


def scores(x: np.ndarray, window: int = WINDOW, scale: float = SCALE) -> np.ndarray:
    """``g [T, N]`` for a whole series ``x [T, N]`` (rows with a non-finite value score 0 and leave
    the spread window alone) — the vectorized form of ``update``, for simulation."""
    x = np.asarray(x, dtype=float)
    keep = np.isfinite(x).all(axis=1)
    xs = x[keep]
    out = np.zeros_like(x)
    if not xs.size:
        return out
    dev = xs - xs.mean(axis=1, keepdims=True)
    spread = np.sqrt(np.mean(dev ** 2, axis=1))
    padded = np.concatenate([np.full(window, np.nan), spread])
    pooled = np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, window + 1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(pooled[:, None] > 0, dev / pooled[:, None], 0.0)
    g = v / np.maximum(scale, np.max(np.abs(v), axis=1, keepdims=True))
    out[keep] = g
    return out


def log_e_process(score_series: Sequence[np.ndarray], bets: np.ndarray = BETS) -> np.ndarray:
    """``log E(t)`` [T] of the combined test martingale for metrics' scores ``[T, N]`` (equal T)."""
    logs = [np.cumsum(np.log1p(g[:, :, None] * bets), axis=0) for g in score_series]  # [T, N, L]
    stacked = np.concatenate([lw.reshape(lw.shape[0], -1) for lw in logs], axis=1)
    top = stacked.max(axis=1, keepdims=True)
    return (top + np.log(np.mean(np.exp(stacked - top), axis=1, keepdims=True)))[:, 0]


class SequentialTest:
    """Anytime-valid online test (module doc). ``update(row)`` → the most severe new ``Alarm`` of that
    row, or None; ``alarms`` keeps every alarm raised; ``e_value`` is the current combined e-value."""

    def __init__(self, world_size: int, alpha: float = 0.01, metrics: Sequence[str] = METRICS) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.world_size, self.alpha, self.metrics = world_size, alpha, tuple(metrics)
        self.log_wealth = np.zeros((len(self.metrics), world_size, BETS.size))
        self.alarms: list[Alarm] = []
        self._spreads = {m: deque(maxlen=WINDOW) for m in self.metrics}
        self._log_scale = {m: m in LOG_METRICS for m in self.metrics}
        self._structure: dict[str, tuple[int, ...] | None] = {m: None for m in self.metrics}
        self._run = {m: 0 for m in self.metrics}  # steps from the start with that partition; -1: broken
        self._seen: set[tuple[str, Any]] = set()
        self._persistent_raised = False

    @property
    def e_value(self) -> float:
        lw = self.log_wealth.reshape(-1)
        top = float(lw.max())
        return math.exp(top) * float(np.mean(np.exp(lw - top)))

    def update(self, row: Row) -> Alarm | None:
        step = int(row.get("step", -1))
        new = self._exact_rules(row, step)
        for k, metric in enumerate(self.metrics):
            x = self._values(row, metric)
            if x is None:
                continue
            new += self._replica_rule(metric, x, step)
            g = step_scores(x, self._spreads[metric])
            self._spreads[metric].append(float(np.sqrt(np.mean((x - x.mean()) ** 2))))
            if g is not None:
                self.log_wealth[k] += np.log1p(g[:, None] * BETS)
        if not self._persistent_raised and self.e_value >= 1 / self.alpha:
            self._persistent_raised = True
            new.append(self._persistent_alarm(step))
        self.alarms += new
        return min(new, key=lambda a: _SEVERITY[a.kind]) if new else None

    def _values(self, row: Row, metric: str) -> np.ndarray | None:
        values = row.get(metric)
        if not isinstance(values, list) or len(values) != self.world_size:
            return None
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        x = np.asarray(values, dtype=float)
        if self._log_scale[metric] and not (x > 0).all():  # leave log space for good (module doc)
            self._log_scale[metric] = False
            self._spreads[metric].clear()
        return np.log(x) if self._log_scale[metric] else x

    def _replica_rule(self, metric: str, x: np.ndarray, step: int) -> list[Alarm]:
        """Bit-identical ranks (``replicas``): the partition of the first steps into classes of
        identical values, once it has held for ``MIN_TIED`` steps, is the structure. Ranks it sets
        apart from a majority of replicas raise a ``persistent`` alarm then; a rank that later
        leaves its class raises a ``transient`` one (both exact: impossible for replicas)."""
        labels = partition(x)
        run = self._run[metric]
        if run == 0:
            self._structure[metric] = labels
        structure = self._structure[metric]
        if run < 0 or structure is None or len(set(structure)) == len(structure):
            return []  # broken, or no class of two or more identical ranks: not replicas
        if labels == structure:
            self._run[metric] = run + 1
            if run + 1 == MIN_TIED and len(classes(structure)) > 1:
                who = outside_majority(structure)
                return [Alarm("persistent", step, metric, who[0] if len(who) == 1 else None, who, math.inf)]
            return []
        if run < MIN_TIED:
            self._run[metric] = -1  # the partition changed before it was established
            return []
        self._run[metric] = -1
        keys = breaks(x, structure)
        who = tuple(sorted({r for key in keys for r in key}))
        if not who:
            return []
        return [Alarm("transient", step, metric, who[0] if len(who) == 1 else None, who, math.inf)]

    def _exact_rules(self, row: Row, step: int) -> list[Alarm]:
        out = []
        if row.get("weights_in_sync") is False and ("divergence", None) not in self._seen:
            self._seen.add(("divergence", None))
            sums = row.get("weight_checksum")
            ranks, _ = diverging_ranks(sums if isinstance(sums, list) else [])
            out.append(Alarm("divergence", step, "weight_checksum", ranks[0] if len(ranks) == 1 else None,
                             tuple(ranks), math.inf))
        for flag in row.get("flags") or []:
            kind, rank = (flag.get("kind"), flag.get("rank")) if isinstance(flag, dict) else (None, None)
            if kind in ("nonfinite_loss", "nonfinite_grad") and isinstance(rank, int) and (kind, rank) not in self._seen:
                self._seen.add((kind, rank))
                metric = "loss" if kind == "nonfinite_loss" else "grad_norm"
                out.append(Alarm("nonfinite", step, metric, rank, (rank,), math.inf))
        return out

    def _persistent_alarm(self, step: int) -> Alarm:
        per = np.log(np.mean(np.exp(self.log_wealth - self.log_wealth.max()), axis=2)) + self.log_wealth.max()
        m, r = np.unravel_index(int(np.argmax(per)), per.shape)
        if self.world_size == 2:
            return Alarm("persistent", step, self.metrics[m], None, (0, 1), self.e_value)
        return Alarm("persistent", step, self.metrics[m], int(r), (int(r),), self.e_value)
