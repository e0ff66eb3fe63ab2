"""Online verdict: an anytime-valid test of rank exchangeability, fed one row at a time.

``SequentialTest(world_size, alpha).update(row)`` returns an ``Alarm`` the first time the evidence
against healthy DP is strong enough (and again when it can name more ranks), and the probability
that a healthy run *ever* raises the statistical alarm — however long it runs, however often it is
checked — is at most α.

Method: testing by betting (``testbed.diagnose.betting``, where the validity proof is): every row
feeds one joint bet per step on "rank r is the odd one" for every rank and every set of ranks
tested; ``E(t)``, the e-process of the set of all ranks, is a test martingale under the null, and
Ville's inequality gives ``P(sup_t E(t) ≥ 1/α) ≤ α``. The alarm fires when ``E ≥ 1/α``. A blatant
fault (a rank ≥ 5σ off in one metric) alarms within about twice the floor ⌈ln(1/α)/ln N⌉ after it
starts (measured: ``docs/diagnosis.md``), weaker ones later.

Naming is closed testing: rank r is named once the e-process of every tested set of ⌈N/2⌉ or more
ranks that contains r has reached 1/α. If at least half the ranks are healthy, the healthy ones
form such a set, so the chance that a healthy rank is *ever* named is ≤ α (the alarm and the
names share this α: naming needs the alarm). An alarm that cannot name anybody yet says so
(``ranks`` empty, the leading suspect in ``suspect``); a later alarm names the ranks once closed
testing allows it. With two ranks both are named (a difference, not attributable).

Besides the statistical alarm, exact rules raise alarms (outside the α budget, they are not
random under the null): weights out of sync (``divergence``), a non-finite value on a rank
(``nonfinite``), and bit-identical ranks (replicated batches, ``replicas``) that differ — ranks set
apart from a majority of replicas from the start (``persistent``), or a rank leaving its replicas
later (``transient``). Spikes of one step (the batch verdict's ``transient`` test) need the run's
tail and are not judged online.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.attribution import LOG_METRICS, METRICS
from testbed.diagnose.betting import RankBets, closed_names
from testbed.diagnose.replicas import breaks, classes, outside_majority, partition, replicas_are_the_fault
from testbed.diagnose.summary import diverging_ranks

Row = dict[str, Any]
MIN_TIED = 2  # steps of bit-identical ranks before a difference is an exact alarm
_SEVERITY = {"divergence": 0, "nonfinite": 1, "transient": 2, "persistent": 3}


@dataclass(frozen=True)
class Alarm:
    """What fired: ``rank`` (None when not attributable; ``ranks`` lists the ranks named — empty
    for a statistical alarm that cannot name anybody yet), ``metric``, ``step``, ``e_value`` (the
    e-value of all ranks that crossed 1/α; ``inf`` for the exact rules), ``suspect`` (the rank
    carrying the most evidence when nobody can be named yet)."""

    kind: str  # persistent | transient | nonfinite | divergence
    step: int
    metric: str
    rank: int | None
    ranks: tuple[int, ...]
    e_value: float
    suspect: int | None = None

    def describe(self) -> str:
        if self.rank is not None:
            who = f"rank {self.rank}"
        elif self.ranks:
            who = "ranks " + ", ".join(map(str, self.ranks))
        else:
            who = "not attributable yet" + (f" (leading suspect: rank {self.suspect})" if self.suspect is not None else "")
        ev = "exact rule" if math.isinf(self.e_value) else f"e-value {self.e_value:.3g}"
        return f"{self.kind} alarm at step {self.step}: {who}, {self.metric} ({ev})"


class SequentialTest:
    """Anytime-valid online test (module doc). ``update(row)`` → the most severe new ``Alarm`` of that
    row, or None; ``alarms`` keeps every alarm raised; ``e_value`` is the e-value of all ranks;
    ``named`` the ranks closed testing has named so far."""

    def __init__(self, world_size: int, alpha: float = 0.01, metrics: Sequence[str] = METRICS) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.world_size, self.alpha, self.metrics = world_size, alpha, tuple(metrics)
        self.bets = RankBets(world_size, len(self.metrics)) if world_size >= 2 else None
        self.alarms: list[Alarm] = []
        self.named: list[int] = []
        self._log_scale = {m: m in LOG_METRICS for m in self.metrics}
        self._structure: dict[str, tuple[int, ...] | None] = {m: None for m in self.metrics}
        self._run = {m: 0 for m in self.metrics}  # steps from the start with that partition; -1: broken
        self._seen: set[tuple[str, Any]] = set()
        self._detected = False

    @property
    def e_value(self) -> float:
        return math.exp(float(self.bets.log_e[0, 0])) if self.bets is not None else 1.0

    def deviation(self, metric: str, rank: int) -> float:
        """Rank ``rank``'s mean standardized deviation in ``metric`` over the run so far (positive:
        above the other ranks) - which way the evidence points; 0.0 before any step."""
        if self.bets is None or metric not in self.metrics:
            return 0.0
        return float(self.bets.total.mean()[0, self.metrics.index(metric), rank])

    def update(self, row: Row) -> Alarm | None:
        step = int(row.get("step", -1))
        new = self._exact_rules(row, step)
        x = np.full((len(self.metrics), self.world_size), np.nan)
        for k, metric in enumerate(self.metrics):
            values = self._values(row, metric)
            if values is not None:
                new += self._replica_rule(metric, values, step)
                x[k] = values
        if self.bets is not None:
            self.bets.step(x)
            new += self._statistical_alarm(step)
        self.alarms += new
        return min(new, key=lambda a: _SEVERITY[a.kind]) if new else None

    def _statistical_alarm(self, step: int) -> list[Alarm]:
        """The alarm when the e-value of all ranks first reaches 1/α, and again whenever closed
        testing names more ranks."""
        bets, level = self.bets, math.log(1 / self.alpha)
        if not self._detected and bets.log_e[0, 0] < level:
            return []
        first = not self._detected
        self._detected = True
        named = closed_names(bets.members, bets.sup_log_e[0] >= level)
        if not first and len(named) <= len(self.named):
            return []
        self.named = named
        leader, metric = bets.leading()
        if named and leader not in named:
            metric = int(np.argmax(np.abs(bets.total.mean()[0][:, named]).max(axis=1)))
        rank = named[0] if len(named) == 1 else None
        return [Alarm("persistent", step, self.metrics[metric], rank, tuple(named), self.e_value,
                      None if named else leader)]

    def _values(self, row: Row, metric: str) -> np.ndarray | None:
        values = row.get(metric)
        if not isinstance(values, list) or len(values) != self.world_size:
            return None
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        x = np.asarray(values, dtype=float)
        if self._log_scale[metric] and not (x > 0).all():  # leave log space for good: the
            self._log_scale[metric] = False  # spreads learned in log space no longer apply
            if self.bets is not None:
                self.bets.forget_spread(self.metrics.index(metric))
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
                if replicas_are_the_fault(structure, None):  # ranks reading the same batches
                    g = next(g for g in classes(structure) if len(g) > 1)
                    who = tuple(g) if 2 * len(g) < len(structure) else ()
                else:
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
