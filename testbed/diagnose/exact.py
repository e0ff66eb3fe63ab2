"""The exact evidence with a cause, read from the rows: data (``data.py``), state, config.

Each builder returns ``Evidence`` items of kind ``data`` / ``state`` / ``config`` (METRICS.md,
"Exact evidence"): no p-value to state. ``settle`` then keeps the statistical evidence from
contradicting them: where an exact data or state cause explains the run, a statistical item that
points at a rank the exact evidence does not name (or at any rank, when the cause is job-wide) is
a consequence - ranks whose data is wrong differ in distribution (a rank that re-reads one fixed
shard every epoch fits it better) - and is moved to the notes instead of blaming a healthy rank.
Unread samples alone (``uncovered``, naming nobody) settle nothing: they say the shards miss data,
not who reads the wrong one, which is what the statistics can still tell.

Who is named (``outliers``): the ranks whose value differs from a plurality of at least two
ranks; nobody when there is no such plurality (two ranks, or every rank different: not
attributable, or job-wide).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

from testbed.diagnose.data import DataFinding, DataFindings
from testbed.diagnose.evidence import EXACT_KINDS, Evidence, counts
from testbed.schema import row as R

Row = dict[str, Any]


def outliers(values: Sequence[Any]) -> list[int]:
    """Ranks outside the plurality value, when it holds >= 2 ranks and beats every other value."""
    ranked = Counter(_key(v) for v in values).most_common()
    if len(ranked) < 2 or ranked[0][1] < 2 or ranked[0][1] == ranked[1][1]:
        return []
    return [r for r, v in enumerate(values) if _key(v) != ranked[0][0]]


def _key(value: Any) -> Any:
    return repr(value) if isinstance(value, (list, dict)) else value


def exact(kind: str, metric: str, ranks: list[int], step: int, effect: dict[str, Any], **details: Any) -> Evidence:
    return Evidence(metric, kind, {**effect, "since_step": step}, None, group=[sorted(ranks)],
                    details={**details, "ranks": sorted(ranks), "step": step})


def from_finding(f: DataFinding) -> Evidence:
    return exact("data", "data", f.ranks, f.step, {**f.effect, "detected_step": f.detected}, cause=f.cause)


class ExactEvidence:
    """The exact evidence of a whole record, fed row by row in step order with bounded memory.

    The launcher and the report stream every row of a long record through it while the statistical
    part of the verdict sees a bounded sample (``record/sample.py``): the data rules compare
    consecutive windows and the state and config rules want the first step a difference shows, so
    they must see every row, not every k-th."""

    def __init__(self, world_size: int, intended: Sequence[str] = ()):
        self.data = DataFindings(world_size, intended)
        self.state: dict[str, Evidence] = {}
        self.last_ok: dict[str, int] = {}
        self.config: list[Evidence] | None = None
        self.lr: Evidence | None = None

    def update(self, row: Row) -> None:
        self.data.update(row)
        step = row.get(R.STEP)
        if isinstance(step, int):
            self._state(row, step)
            self._config(row, step)

    def items(self) -> list[Evidence]:
        lr = [self.lr] if self.lr is not None else []
        return [from_finding(f) for f in self.data.findings()] + list(self.state.values()) + (self.config or []) + lr

    def _state(self, row: Row, step: int) -> None:
        """The first differing tensor of each kind (parameter, buffer) at the first step it differed."""
        for entry in row.get(R.STATE_DIFFERS) or []:
            kind = str(entry.get("kind", "parameter"))
            if kind in self.state:
                continue
            effect = {"frozen": bool(entry.get("frozen")), "differing_tensors": entry.get("differing"),
                      "state": kind, "last_in_sync": self.last_ok.get(kind)}
            self.state[kind] = exact("state", f"{kind}s", list(entry.get("ranks") or []), step, effect,
                                     tensor=entry.get("tensor"))
        if row.get(R.WEIGHTS_IN_SYNC) is True and "parameter" not in self.state:
            self.last_ok["parameter"] = step
        if row.get(R.BUFFERS_IN_SYNC) is True and "buffer" not in self.state:
            self.last_ok["buffer"] = step
        if row.get(R.BUFFERS_IN_SYNC) is False and "buffer" not in self.state:
            sums = row.get(R.BUFFER_CHECKSUM) or []
            self.state["buffer"] = exact("state", "buffers", outliers(sums), step,
                                         {"state": "buffer", "last_in_sync": self.last_ok.get("buffer")}, tensor=None)

    def _config(self, row: Row, step: int) -> None:
        """Per-rank settings that differ (the first row's ``config_differs``) and learning rates that
        differ (``lr_by_rank``, at the first step they do)."""
        if self.config is None and isinstance(row.get(R.CONFIG_DIFFERS), list):
            self.config = []
            for entry in row[R.CONFIG_DIFFERS]:
                values = list(entry.get("values") or [])
                self.config.append(exact("config", "config", outliers(values), step, {}, key=entry.get("key"),
                                         values=values))
        if self.lr is None and isinstance(row.get(R.LR_BY_RANK), list):
            values = row[R.LR_BY_RANK]
            self.lr = exact("config", "config", outliers(values), step, {}, key="lr", values=values)


def exact_evidence(rows: Iterable[Row], n: int, intended: Sequence[str] = ()) -> list[Evidence]:
    """Every row through ``ExactEvidence``: the data, state and config evidence of the run."""
    tracker = ExactEvidence(n, intended)
    for row in rows:
        tracker.update(row)
    return tracker.items()


def settle(statistical: list[Evidence], exact_items: list[Evidence], suspects: Any) -> tuple[list[Evidence], list[str]]:
    """Statistical evidence that does not contradict the exact data and state causes, and notes for
    the rest (module doc). ``suspects(e)`` gives the ranks a statistical item points at. A config
    difference explains nothing by itself (an environment variable may be harmless): it settles
    nothing."""
    causes = [((e.details or {}).get("cause"), e.culprits) for e in exact_items
              if counts(e) and e.kind in ("data", "state")]
    kept, notes = [], []
    for e in statistical:
        ranks = set(suspects(e))
        if e.kind in ("divergence", "nonfinite") or not settles(causes, ranks):
            kept.append(e)
            continue
        who = ", ".join(map(str, sorted(ranks))) if ranks else "none"
        notes.append(f"statistical evidence on {e.metric} ({e.kind}; ranks named: {who}) follows from the exact "
                     "cause and is not reported as a finding of its own")
    return kept, notes


def settles(causes: Iterable[tuple[str | None, Sequence[int]]], ranks: Iterable[int]) -> bool:
    """Whether exact causes, as (cause, culprits) pairs, account for statistical evidence pointing at
    ``ranks`` (module doc) - the one rule of the verdict (``settle``) and the online alarm
    (``engine/alarms.py``). Unread samples naming nobody (``uncovered``) settle nothing: the ledger
    sees that the shards miss data, not whose shard is wrong (shard skew on 2 of 4: the split names
    ranks 2-3)."""
    active = [set(culprits) for cause, culprits in causes if culprits or cause != "uncovered"]
    if not active:
        return False
    ranks = set(ranks)
    return not (ranks and ranks <= set().union(*active))


def is_exact(e: Evidence) -> bool:
    return e.kind in EXACT_KINDS
