"""The built-in alarms, judged on every row on every rank (every rank holds the same row, so every
rank raises the same alarm at the same step). Each kind fires once per run, but ``inconsistent``
fires again when the online test names more ranks.

- ``weights_diverged`` (exact): a state check found the ranks' parameter checksums differ. The
  ranks outside the majority are named; with no majority (2 ranks, a 2-2 split) the alarm says the
  difference is not attributable and lists every rank, as the verdict does.
- ``nonfinite`` (exact): a NaN / Inf loss or gradient on a rank.
- ``lr_differs`` (exact): the ranks stepped with different learning rates (a scheduler stepped
  twice on one rank, a per-rank lr).
- ``inconsistent`` (statistical): the verdict's online test (``diagnose/sequential.py``) found the
  ranks not exchangeable; the chance that a healthy run ever raises it is <= ``alpha``.
- ``data`` (exact): the data ledger's rules (``diagnose/data.py``, the verdict's own) found a cause
  - ``replicated``, ``overlap``, ``epoch_repeat``, ``uncovered`` - at the row that first shows it;
  again when a cause names other ranks. A cause the run declares intended raises nothing.
- ``state_differs`` (exact): the buffers differ where DDP has just synchronised them (the first
  differing tensor and the ranks off the plurality; none named when no plurality agrees).
- ``config_differs`` (exact): the ranks' settings differ (versions, flags, environment, optimizer
  hyper-parameters: the first row's ``config_differs``).

A new kind is one method here returning ``Alarm``s and its name in ``schema/event.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from testbed.diagnose.causes import cause_phrase
from testbed.diagnose.data import DataFindings
from testbed.diagnose.exact import exact, from_finding, outliers, settles
from testbed.diagnose.sequential import SequentialTest
from testbed.diagnose.summary import diverging_ranks
from testbed.schema import event as E
from testbed.schema import row as R
from testbed.schema.row import Row

NONFINITE_KINDS = (R.NONFINITE_LOSS, R.NONFINITE_GRAD)


@dataclass
class Alarm:
    kind: str
    message: str
    step: int
    ranks: list[int] | None
    details: dict[str, Any] = field(default_factory=dict)


class BuiltinAlarms:
    """``check(row)`` → the alarms the row raises (each kind once). ``alpha``: the online test's
    false-alarm rate over the whole run (None: the statistical alarm is off)."""

    def __init__(self, world_size: int, alpha: float | None = 0.01, intended: Sequence[str] = ()):
        self.world_size = world_size
        self.sequential = SequentialTest(world_size, alpha) if alpha is not None else None
        self.data = DataFindings(world_size, intended)
        self.raised: set[str] = set()
        self._inconsistent_named: set[int] | None = None  # ranks the inconsistent alarms have named

    def check(self, row: Row) -> list[Alarm]:
        rules = (self._weights, self._nonfinite, self._lr, self._data, self._state, self._config, self._inconsistent)
        found = [a for rule in rules for a in rule(row)]
        self.raised.update(a.kind for a in found)
        return found

    def _once(self, kind: str) -> bool:
        return kind not in self.raised

    def _weights(self, row: Row) -> list[Alarm]:
        if row.get(R.WEIGHTS_IN_SYNC) is not False or not self._once(E.WEIGHTS_DIVERGED):
            return []
        sums = row.get(R.WEIGHT_CHECKSUM) or []
        ranks, reference = diverging_ranks(sums)
        if reference == "majority":
            who = f"rank(s) {ranks} differ from the majority"
        elif len(sums) == 2:
            who, ranks = "ranks 0 and 1 hold different weights (2 ranks: no majority, not attributable to either)", [0, 1]
        else:
            split = " vs ".join(", ".join(map(str, g)) for g in _classes(sums))
            who, ranks = f"the ranks split into {split} (no majority: not attributable)", list(range(len(sums)))
        first = next((d for d in row.get(R.STATE_DIFFERS) or [] if d.get("kind") == "parameter"), None)
        tensor = (f" (first differing tensor: {first['tensor']}{' (frozen)' if first.get('frozen') else ''}; a "
                  "checkpoint loaded or a layer changed on some ranks after wrapping?)") if first else ""
        return [Alarm(E.WEIGHTS_DIVERGED, f"the replicas' weights differ: {who}; the job is no longer data parallel"
                      f"{tensor}", row[R.STEP], ranks, {"tensor": first["tensor"]} if first else {})]

    def _nonfinite(self, row: Row) -> list[Alarm]:
        bad = [f for f in row.get(R.FLAGS, []) if f.get(R.FLAG_KIND) in NONFINITE_KINDS]
        if not bad or not self._once(E.NONFINITE):
            return []
        what = ", ".join(f"{f[R.FLAG_KIND]} on rank {f[R.FLAG_RANK]}" for f in bad)
        ranks = sorted({f[R.FLAG_RANK] for f in bad if f[R.FLAG_RANK] is not None})
        return [Alarm(E.NONFINITE, f"non-finite values: {what}", row[R.STEP], ranks)]

    def _lr(self, row: Row) -> list[Alarm]:
        lrs = row.get(R.LR_BY_RANK)
        if not lrs or not self._once(E.LR_DIFFERS):
            return []
        ranks, reference = diverging_ranks(lrs)
        if reference != "majority":
            ranks = list(range(len(lrs)))
        values = ", ".join(f"rank {r} {lr:.6g}" if lr is not None else f"rank {r} none" for r, lr in enumerate(lrs))
        return [Alarm(E.LR_DIFFERS, f"the ranks stepped with different learning rates ({values}): a scheduler "
                      "stepped a different number of times on some rank?", row[R.STEP], ranks)]

    def _data(self, row: Row) -> list[Alarm]:
        """The data ledger's causes (``diagnose/data.py``): new, or naming other ranks."""
        out = []
        for finding in self.data.update(row):
            if finding.intended:
                continue
            message = cause_phrase(from_finding(finding), self.world_size)
            out.append(Alarm(E.DATA, message, row[R.STEP], list(finding.ranks),
                             {"cause": finding.cause, "since_step": finding.step}))
        return out

    def _state(self, row: Row) -> list[Alarm]:
        """Buffers that differ where DDP has just synchronised them (once per run)."""
        if row.get(R.BUFFERS_IN_SYNC) is not False or not self._once(E.STATE_DIFFERS):
            return []
        first = next((d for d in row.get(R.STATE_DIFFERS) or [] if d.get("kind") == "buffer"), None)
        ranks = list(first["ranks"]) if first else []
        evidence = exact("state", "buffers", ranks, row[R.STEP], {"state": "buffer"},
                         tensor=first["tensor"] if first else None)
        return [Alarm(E.STATE_DIFFERS, cause_phrase(evidence, self.world_size), row[R.STEP], ranks,
                      {"tensor": first["tensor"] if first else None})]

    def _config(self, row: Row) -> list[Alarm]:
        """Settings that differ between the ranks (the first row's, once)."""
        differs = row.get(R.CONFIG_DIFFERS)
        if not differs or not self._once(E.CONFIG_DIFFERS):
            return []
        parts = [cause_phrase(item, self.world_size) for item in
                 (exact("config", "config", _minority(d["values"]), row[R.STEP], {}, key=d["key"], values=d["values"])
                  for d in differs[:5])]
        more = f" (+{len(differs) - 5} more keys)" if len(differs) > 5 else ""
        ranks = sorted({r for d in differs for r in _minority(d["values"])})
        return [Alarm(E.CONFIG_DIFFERS, "; ".join(parts) + more, row[R.STEP], ranks,
                      {"keys": [d["key"] for d in differs]})]

    def _inconsistent(self, row: Row) -> list[Alarm]:
        """The online test's alarm: once when the evidence first reaches 1/alpha (it may name nobody
        yet), and again each time closed testing names more ranks."""
        test = self.sequential
        found = test.update(row) if test is not None else None
        if found is None or found.kind not in ("persistent", "transient"):
            return []  # the exact kinds (divergence, nonfinite) are raised above
        ranks = [found.rank] if found.rank is not None else list(found.ranks)
        if settles([(f.cause, f.ranks) for f in self.data.findings() if not f.intended], ranks):
            return []  # an exact data cause explains the run: the verdict does not blame other ranks either
        if self._inconsistent_named is not None and set(ranks) <= self._inconsistent_named:
            return []
        self._inconsistent_named = set(ranks) | (self._inconsistent_named or set())
        message = (f"ranks are not exchangeable: {found.describe()}{direction(test, found)} "
                   f"(online test, alpha = {test.alpha})")
        return [Alarm(E.INCONSISTENT, message, found.step, ranks,
                      {"metric": found.metric, "evidence": found.kind, "e_value": found.e_value,
                       "suspect": found.suspect})]


def direction(test: SequentialTest, found: Any) -> str:
    """``: rank 1's loss is higher than rank 0's`` - which way the evidence points (the sign of the
    rank's mean standardized deviation). With two ranks (not attributable) it still says which one is
    higher; '' for the exact replica rules and when nobody is named yet."""
    metric = found.metric
    if metric not in test.metrics or math.isinf(found.e_value):
        return ""
    if test.world_size == 2:
        high, low = (1, 0) if test.deviation(metric, 1) > test.deviation(metric, 0) else (0, 1)
        return f": rank {high}'s {metric} is higher than rank {low}'s (2 ranks: which one is off is not attributable)"
    if found.rank is None:
        return ""
    return f": rank {found.rank}'s {metric} is {'higher' if test.deviation(metric, found.rank) > 0 else 'lower'} than the others'"


def _minority(values: Sequence[Any]) -> list[int]:
    return outliers(values)


def _classes(values: Sequence[Any]) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return sorted(groups.values(), key=lambda g: g[0])
