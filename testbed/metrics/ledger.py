"""The data ledger: what each rank's model consumed, exchanged in the step's one all-gather.

Per exchange (a step with a collective), each rank contributes a fixed-size int64 vector built on
its device from the fingerprints of the samples its training forwards consumed since the last
exchange (``metrics/fingerprint.py``): ``payload`` =

    [samples, digest, passing, kept, f_1, ..., f_K]

``samples`` is how many it consumed; ``digest`` an order-sensitive hash of their fingerprints in
order (``Σ_i f_i · d_i``, ``d_i`` fixed multipliers, finalized by ``mix64``): two ranks with one
digest read the same samples in the same order; ``f_1..f_K`` the distinct fingerprints that pass
the ledger's **sampling filter** (the ``level`` lowest bits zero: a coordinated hash sample at
rate ``q = 2**-level``: a sample is either always in it or never, on every rank and at every
step), the smallest ``K`` of them; ``passing`` how many passed before the cut.

``DataLedger.update`` - the same deterministic code on every rank, fed the same gathered table -
turns the table into the row's data fields (keys: ``schema/row.py``): ``data_samples`` and
``data_digest`` always; while the **first pass** over the data lasts, per rank the sampled reads,
the re-reads (a sampled fingerprint read before, by any rank, at an earlier step or by a
lower rank at this step), the self re-reads (read before by the same rank) and the cross-rank
pairs ``[r, s, count]`` (rank r read ``count`` samples rank s had read). The first pass ends at the
first epoch boundary (``boundary``, over the sampled reads pooled over the last steps, at least
``POOL``): re-reads the majority, or self re-reads more than 1 in 2N reads. The ledger then stops tracking (and frees its entries):
the verdict's ``overlap`` rule judges collisions inside the first pass only
(``diagnose/data.py``).

Memory: one entry (fingerprint → bitmask of readers) per sampled distinct sample of the first
pass, at most ``capacity``; beyond it the level rises by one and half the entries go (the
sample stays uniform). The level also rises when a rank's sampled reads per exchange would
exceed ``K / 2``. Every count the rows hold is a count of *sampled* samples: the totals are
``count / q`` with the relative standard error of a binomial sample (``1 / sqrt(count)``).
Cost: per exchange ``O(N·K)`` dictionary operations on each rank; ``8·(K + 4)`` bytes per rank
added to the all-gather.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from testbed.metrics.fingerprint import mix64
from testbed.schema import row as R

HEADER = 4  # samples, digest, passing, kept
SENTINEL = (1 << 63) - 1  # an empty slot (a real fingerprint equal to it is treated as absent)
DEFAULT_SAMPLES = 64  # K: sampled fingerprints per rank per exchange
DEFAULT_CAPACITY = 1 << 17  # ledger entries (~20 MB of Python objects at most)
POOL = 16  # sampled reads pooled to decide that the first pass ended
DIGEST_SEED = 0x5D1CE5


def payload(fingerprints: torch.Tensor | None, level: int, k: int, device: torch.device) -> torch.Tensor:
    """This rank's ``[HEADER + k]`` int64 vector (module doc), built without a device sync."""
    out = torch.full((HEADER + k,), SENTINEL, dtype=torch.int64, device=device)
    out[:HEADER] = 0
    if fingerprints is None or fingerprints.numel() == 0:
        return out
    f = fingerprints.to(device=device, dtype=torch.int64).reshape(-1)
    n = f.numel()
    positions = torch.arange(n, dtype=torch.int64, device=device) + DIGEST_SEED
    out[0] = n
    out[1] = mix64((f * mix64(positions)).sum() + n)
    ordered, _ = torch.sort(f)
    fresh = torch.ones_like(ordered, dtype=torch.bool)
    fresh[1:] = ordered[1:] != ordered[:-1]
    passing = fresh & ((ordered & ((1 << level) - 1)) == 0) if level > 0 else fresh
    chosen, _ = torch.sort(torch.where(passing, ordered, torch.full_like(ordered, SENTINEL)))
    count = passing.sum()
    out[2] = count
    out[3] = torch.clamp(count, max=k)
    width = min(k, n)
    out[HEADER:HEADER + width] = chosen[:width]
    return out


def boundary(reads: int, rereads: int, selves: int, world_size: int) -> bool:
    """Reads that look like an epoch's boundary, not like its middle: re-reads are the majority, or
    ranks re-read their *own* samples more often than 1 in 2N reads. Inside an epoch a rank never
    re-reads its own samples (a sampler's shard is a permutation's slice, whatever its seed); after
    the boundary 1 in N of its reads are its own earlier ones - also when only part of the dataset
    was read (ranks reading the same shard), where re-reads stay a minority."""
    return 2 * rereads > reads or 2 * world_size * selves > reads


class DataLedger:
    """The host side (module doc): ``update(table)`` → the row's data fields; ``level`` is the
    sampling level the next payload must use (the same on every rank)."""

    def __init__(self, world_size: int, samples: int = DEFAULT_SAMPLES, capacity: int = DEFAULT_CAPACITY):
        if samples < 1:
            raise ValueError(f"the ledger needs at least 1 sampled fingerprint per rank, got {samples}")
        self.world_size, self.samples, self.capacity = world_size, samples, capacity
        self.level = 0
        self.entries: dict[int, int] | None = {}  # fingerprint -> bitmask of the ranks that read it
        self.recent: deque[tuple[int, int, int]] = deque()  # (reads, rereads, self re-reads) of the last exchanges

    @property
    def width(self) -> int:
        return HEADER + self.samples

    def update(self, table: np.ndarray) -> dict[str, Any]:
        """``table``: ``[N, width]`` int64, every rank's payload. Returns the row's data fields."""
        table = np.asarray(table, dtype=np.int64).reshape(self.world_size, self.width)
        samples = [int(x) for x in table[:, 0]]
        fields: dict[str, Any] = {R.DATA_SAMPLES: samples,
                                  R.DATA_DIGEST: [int(d) if s else None for d, s in zip(table[:, 1], samples)]}
        if self.entries is not None and any(samples):
            fields.update(self._first_pass(table))
        self._adapt(samples)
        return fields

    def _first_pass(self, table: np.ndarray) -> dict[str, Any]:
        """Reads, re-reads and cross-rank pairs of this exchange. Ranks with one digest at this step
        (replicas, ``data_digest``) are not counted against each other here: that is the
        ``replicated`` finding's, not an overlap."""
        entries = self.entries
        assert entries is not None
        n = self.world_size
        reads, rereads, selves = [0] * n, [0] * n, [0] * n
        pairs: dict[tuple[int, int], int] = {}
        now: dict[int, int] = {}  # fingerprint -> ranks that read it at this step
        digests = [int(table[r, 1]) if table[r, 0] else None for r in range(n)]
        for r in range(n):
            twins = sum(1 << s for s in range(r) if digests[s] is not None and digests[s] == digests[r])
            for f in table[r, HEADER:HEADER + int(table[r, 3])].tolist():
                if f == SENTINEL:
                    continue
                reads[r] += 1
                same = now.get(f, 0)
                hit = entries.get(f, 0) | (same & ~twins)
                now[f] = same | 1 << r
                if not hit:
                    continue
                rereads[r] += 1
                selves[r] += hit >> r & 1
                for s in range(n):
                    if s != r and hit >> s & 1:
                        pairs[(r, s)] = pairs.get((r, s), 0) + 1
        for f, ranks in now.items():
            entries[f] = entries.get(f, 0) | ranks
        fields: dict[str, Any] = {R.DATA_READS: reads, R.DATA_REREADS: rereads, R.DATA_SELF: selves,
                                  R.DATA_LEVEL: self.level}
        if pairs:
            fields[R.DATA_PAIRS] = [[r, s, c] for (r, s), c in sorted(pairs.items())]
        if boundary(sum(reads), sum(rereads), sum(selves), n):
            fields[R.DATA_BOUNDARY] = True  # the verdict leaves this step's pairs out (diagnose/data.py)
        if any(int(table[r, 2]) > int(table[r, 3]) for r in range(n)):
            fields[R.DATA_TRUNCATED] = True
        if self._pass_ended(sum(reads), sum(rereads), sum(selves)):
            fields[R.DATA_PASS_END] = True
            self.entries, self.recent = None, deque()
        return fields

    def _pass_ended(self, reads: int, rereads: int, selves: int) -> bool:
        """Over the last >= POOL sampled reads, re-reads are the majority, or a rank re-read its own
        samples more often than 1 in 2N reads (``boundary``)."""
        self.recent.append((reads, rereads, selves))
        while len(self.recent) > 1 and sum(r[0] for r in list(self.recent)[1:]) >= POOL:
            self.recent.popleft()
        pooled = [sum(r[i] for r in self.recent) for i in range(3)]
        return pooled[0] >= POOL and boundary(*pooled, self.world_size)

    def _adapt(self, samples: list[int]) -> None:
        """Raise the level while a rank would send more than K/2 sampled fingerprints, or while the
        entries exceed the capacity (evicting those the new level no longer keeps)."""
        most = max(samples) if samples else 0
        while most > 0 and most >> self.level > self.samples // 2 and self.level < 62:
            self._raise()
        while self.entries is not None and len(self.entries) > self.capacity and self.level < 62:
            self._raise()

    def _raise(self) -> None:
        self.level += 1
        if self.entries:
            mask = (1 << self.level) - 1
            self.entries = {f: v for f, v in self.entries.items() if f & mask == 0}
