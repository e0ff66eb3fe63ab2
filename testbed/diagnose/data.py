"""Exact data findings from the rows' ledger fields (``metrics/ledger.py``): what the ranks read.

One incremental rule set, fed row by row, used by the online alarm (``engine/alarms.py``) and by
the offline verdict (``verdict.py``) alike, with bounded memory:

- ``replicated`` - ranks whose digests agree over a window of at least ``MIN_SAMPLES`` samples
  read the same samples in the same order (the window spans as few steps as reach that many
  samples on every rank). Ranks reading their own shards never agree: the probability that two
  different sample sequences share a 64-bit digest is negligible (the fingerprint's bound,
  ``metrics/fingerprint.py``). Named: in each class of identical ranks every rank but the lowest
  (the copies); nobody when one class holds every rank (the data is not sharded at all: a
  job-wide cause).
- ``epoch_repeat`` - a rank's window digest equals one of its own earlier, non-overlapping
  windows: it re-reads a stretch of at least ``MIN_SAMPLES`` samples in the same order (an epoch
  order repeated: ``set_epoch`` not called, or a loader with ``shuffle=False``). A shuffled order
  repeats such a stretch with negligible probability. Job-wide when every rank repeats, else
  the ranks that do. ``period``: the distance in steps (the epoch's length).
- ``overlap`` - inside the first pass over the data, where a disjoint partition lets no two ranks
  read the same sample (but for one padding duplicate per pair at the epoch's end, and exact
  duplicates in the dataset itself): a pair of ranks sharing at least ``MIN_PAIR`` sampled
  samples more than ``DUPLICATE_MARGIN`` times what the dataset's duplicates explain. The
  duplicates are measured by the ranks' *own* repeats: inside the first pass a rank never re-reads
  a sample of its own shard (a shard is a slice of one permutation, whatever its seed), so its
  self-collisions ``S`` come from duplicated content alone, at the rate ``p = 2·ΣS / ΣR²`` per pair
  of reads, which predicts ``p·R_r·R_s`` duplicate collisions between ranks r and s (``R``: sampled
  reads); ``S`` is taken at its upper bound ``S + 2√S + 3`` (a few duplicates may land on no rank
  twice). A sampler with another seed crosses the bar after a few times ``N·sqrt(MIN_PAIR / n)``
  of its first epoch (n: the dataset's samples). Steps whose
  reads look like an epoch's boundary (``data_boundary``: re-reads the majority, or ranks re-reading
  their own samples more than 1 in 2N reads, ``metrics/ledger.py``) are left out: there re-reading
  is what a healthy job does. Named: the ranks outside the largest set of mutually non-overlapping
  ranks (the ranks sharing one sampler), when that set is unique and holds at least two ranks; else
  job-wide (every rank's sampler differs; two ranks: not attributable). Once a pair is found, the
  attribution also counts the pairs above half the bar (``MIN_PAIR / 2`` beyond the duplicates),
  so a short first pass still names the rank that collides with the others.
- ``uncovered`` (the runner, which knows the indices) - at a sampler epoch's end, fewer distinct
  samples were read than a synchronised sampler reads in the same steps.

``intended`` causes (a ``replicate_batch`` baseline, a loader that repeats its order on purpose)
are still found, marked ``intended`` and do not count against the run; replication on purpose
also makes the samples it leaves unread intended.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable, Sequence

from testbed.schema import row as R
from testbed.schema.run import DATA_CAUSES

MIN_SAMPLES = 8
MIN_PAIR = 4
DUPLICATE_MARGIN = 2.0
HISTORY_CAPACITY = 1 << 16  # remembered windows per rank (epoch_repeat); thinned beyond it
CAUSES = DATA_CAUSES
Row = dict[str, Any]


@dataclass
class DataFinding:
    """One cause: ``ranks`` the culprits ([] = job-wide or not attributable), ``step`` where it
    starts, ``detected`` the step whose row first showed it, ``effect`` its numbers."""

    cause: str
    ranks: list[int]
    step: int
    detected: int
    effect: dict[str, Any] = field(default_factory=dict)

    @property
    def intended(self) -> bool:
        return bool(self.effect.get("intended"))


def window_digest(digests: Iterable[int]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(tuple(digests)).encode(), digest_size=8).digest(), "little")


class DataFindings:
    """``update(row)`` → the findings that are new or changed at this row; ``findings`` → the
    current finding of each cause (module doc)."""

    def __init__(self, world_size: int, intended: Sequence[str] = ()):
        self.n, self.intended = world_size, set(intended)
        if "replicated" in self.intended:
            self.intended.add("uncovered")  # ranks reading one shard on purpose leave the others' unread
        self.window: list[tuple[int, list[int | None], list[int]]] = []  # (step, digests, samples)
        self.history: list[dict[int, int]] = [{} for _ in range(world_size)]
        self.history_level = 0
        self.current: dict[str, DataFinding] = {}
        self.replica_steps: dict[tuple[int, ...], list[int]] = {}  # partition -> [first step, windows]
        self.repeaters: dict[int, tuple[int, int, int]] = {}  # rank -> (window start, period, earlier end)
        self.reads = [0] * world_size
        self.selves = [0] * world_size
        self.pairs: dict[tuple[int, int], int] = {}
        self.pair_first: dict[tuple[int, int], int] = {}
        self.first_pass = True
        self.level = 0
        self._culprits: dict[frozenset[tuple[int, int]], list[int]] = {}

    def findings(self) -> list[DataFinding]:
        return [self.current[c] for c in CAUSES if c in self.current]

    def update(self, row: Row) -> list[DataFinding]:
        step = row.get(R.STEP)
        if not isinstance(step, int):
            return []
        found: list[DataFinding] = []
        digests, samples = row.get(R.DATA_DIGEST), row.get(R.DATA_SAMPLES)
        if isinstance(digests, list) and isinstance(samples, list) and len(digests) == len(samples) == self.n:
            found += self._digests(step, digests, samples)
        if self.first_pass and isinstance(row.get(R.DATA_READS), list):
            found += self._ledger(step, row)
        if isinstance(row.get(R.DATA_COVERAGE), dict):
            found += self._coverage(step, row[R.DATA_COVERAGE])
        return found

    # ---- replicated and epoch_repeat: the digests ----------------------------------------------
    def _digests(self, step: int, digests: list[int | None], samples: list[int]) -> list[DataFinding]:
        self.window.append((step, digests, [int(s or 0) for s in samples]))
        total, start = 0, len(self.window)
        while start > 0 and total < MIN_SAMPLES:
            start -= 1
            active = [s for s in self.window[start][2] if s > 0]
            total += min(active) if active else 0
        del self.window[:start]
        if total < MIN_SAMPLES:
            return []
        first = self.window[0][0]
        reading = [r for r in range(self.n) if all(w[1][r] is not None for w in self.window)]
        windows = {r: window_digest(w[1][r] for w in self.window) for r in reading}
        return self._replicas(first, step, windows) + self._repeats(first, step, windows)

    def _replicas(self, first: int, step: int, windows: dict[int, int]) -> list[DataFinding]:
        classes: dict[int, list[int]] = {}
        for r, w in windows.items():
            classes.setdefault(w, []).append(r)
        shared = tuple(sorted(tuple(g) for g in classes.values() if len(g) > 1))
        if not shared:
            return []
        seen = self.replica_steps.setdefault(shared, [first, 0])
        seen[1] += 1
        best = max(self.replica_steps.items(), key=lambda kv: (kv[1][1], -kv[1][0]))
        groups, (since, count) = [list(g) for g in best[0]], best[1]
        job_wide = any(len(g) == self.n for g in groups)
        ranks = [] if job_wide else sorted(r for g in groups for r in g[1:])
        effect = {"classes": groups, "windows": count, "samples_per_window": MIN_SAMPLES}
        return self._set("replicated", ranks, since, step, effect)

    def _repeats(self, first: int, step: int, windows: dict[int, int]) -> list[DataFinding]:
        mask = (1 << self.history_level) - 1
        for r, w in windows.items():
            if w & mask:
                continue
            earlier = self.history[r].get(w)
            if earlier is not None and earlier < first and r not in self.repeaters:
                self.repeaters[r] = (first, step - earlier, earlier)
            self.history[r].setdefault(w, step)
        if any(len(h) > HISTORY_CAPACITY for h in self.history):
            self.history_level += 1
            mask = (1 << self.history_level) - 1
            self.history = [{w: s for w, s in h.items() if not w & mask} for h in self.history]
        if not self.repeaters:
            return []
        ranks = sorted(self.repeaters)
        since = min(v[0] for v in self.repeaters.values())
        period = min(v[1] for v in self.repeaters.values())
        readers = [r for r in range(self.n) if r in windows or r in self.repeaters]
        job_wide = set(ranks) >= set(readers)
        effect = {"period": period, "repeats_from_step": since - period, "repeating_ranks": ranks}
        return self._set("epoch_repeat", [] if job_wide else ranks, since, step, effect)

    # ---- overlap: the first pass's collisions ----------------------------------------------------
    def _ledger(self, step: int, row: Row) -> list[DataFinding]:
        reads = row[R.DATA_READS]
        level = row.get(R.DATA_LEVEL, 0)
        if isinstance(level, int) and level > self.level:  # entries were evicted: keep the counts' scale
            scale = 2 ** (level - self.level)
            self.reads = [x // scale for x in self.reads]
            self.selves = [x // scale for x in self.selves]
            self.pairs = {k: v // scale for k, v in self.pairs.items()}
            self.level = level
        boundary = bool(row.get(R.DATA_BOUNDARY))
        if row.get(R.DATA_PASS_END):
            self.first_pass = False
        if boundary:  # re-reading is what a healthy job does at an epoch's boundary
            return []
        selves = row.get(R.DATA_SELF) or [0] * self.n
        for r in range(min(self.n, len(reads))):
            self.reads[r] += int(reads[r])
            self.selves[r] += int(selves[r]) if r < len(selves) else 0
        for r, s, count in row.get(R.DATA_PAIRS) or []:
            key = (min(r, s), max(r, s))
            self.pairs[key] = self.pairs.get(key, 0) + int(count)
            self.pair_first.setdefault(key, step)
        flagged = [k for k, x in self.pairs.items() if self._overlapping(k, x)]
        if not flagged:
            return []
        elevated = [k for k, x in self.pairs.items() if self._overlapping(k, x, attributing=True)]
        key = frozenset(elevated)
        if key not in self._culprits:
            if len(self._culprits) > 64:
                self._culprits.clear()
            self._culprits[key] = culprits(self.n, elevated)
        ranks = self._culprits[key]
        since = min(self.pair_first[k] for k in flagged)
        effect = {"collisions": sum(self.pairs[k] for k in flagged), "pairs": [[a, b, self.pairs[(a, b)]]
                                                                               for a, b in sorted(flagged)],
                  "sampled_fraction": 2.0 ** -self.level, "reads": sum(self.reads),
                  "own_repeats": sum(self.selves),
                  "disjoint_allows": "at most 1 per pair (padding at an epoch's end)"}
        return self._set("overlap", ranks, since, step, effect)

    def _overlapping(self, pair: tuple[int, int], shared: int, attributing: bool = False) -> bool:
        """``shared`` sampled samples between a pair of ranks beyond what the dataset's own
        duplicates explain (module doc); the attribution's bar is half as high."""
        a, b = pair
        squares = sum(r * r for r in self.reads)
        own = sum(self.selves)
        own_bound = own + 2 * math.sqrt(own) + 3  # a one-sided upper bound of the Poisson count (3 for 0 seen)
        expected = 2 * own_bound / squares * self.reads[a] * self.reads[b] if squares else 0.0
        if attributing:
            return shared >= MIN_PAIR / 2 + expected
        return shared >= MIN_PAIR + DUPLICATE_MARGIN * expected

    # ---- uncovered: the runner's coverage -------------------------------------------------------
    def _coverage(self, step: int, coverage: dict[str, Any]) -> list[DataFinding]:
        unread = int(coverage.get("expected", 0)) - int(coverage.get("read", 0))
        if unread <= 0 or "uncovered" in self.current:
            return []
        effect = {"unread": unread, "size": coverage.get("size"), "epoch": coverage.get("epoch"),
                  "read": coverage.get("read"), "expected": coverage.get("expected")}
        return self._set("uncovered", [], int(coverage.get("from_step", step)), step, effect)

    def _set(self, cause: str, ranks: list[int], since: int, step: int, effect: dict[str, Any]) -> list[DataFinding]:
        """Record the cause's current finding; returned when it is new or names other ranks."""
        if cause in self.intended:
            effect = {**effect, "intended": True}
        old = self.current.get(cause)
        detected = old.detected if old is not None else step
        self.current[cause] = DataFinding(cause, ranks, min(since, old.step) if old else since, detected, effect)
        if old is not None and old.ranks == ranks:
            return []
        return [self.current[cause]]


def culprits(n: int, flagged: Sequence[tuple[int, int]]) -> list[int]:
    """The ranks outside the unique largest set of mutually non-overlapping ranks (module doc): the
    unique smallest set of ranks that touches every overlapping pair, leaving at least two ranks;
    [] when there is none or several (job-wide, or not attributable). Sets of up to 4 ranks are
    searched (``C(N, 4)`` candidates: fine for thousands of ranks' worth of pairs)."""
    pairs = [tuple(p) for p in flagged]
    for size in range(1, min(n - 2, 4) + 1):
        covers = [c for c in combinations(range(n), size) if all(a in c or b in c for a, b in pairs)]
        if covers:
            return list(covers[0]) if len(covers) == 1 else []
    return []


def data_findings(rows: Sequence[Row], world_size: int, intended: Sequence[str] = ()) -> list[DataFinding]:
    """The run's data findings (every row through ``DataFindings``)."""
    tracker = DataFindings(world_size, intended)
    for row in rows:
        tracker.update(row)
    return tracker.findings()
