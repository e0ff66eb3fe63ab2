"""A simulated data pipeline for the ledger's pure tests and the bug-zoo benchmark: N ranks reading a
dataset of ``size`` samples through DistributedSampler semantics (one permutation per epoch from a
shared seed, padded to a multiple of N, rank r taking every N-th index), with the real mistakes as
switches. Each sample's fingerprint is its index through ``mix64``; the rows come out of the real
``payload`` + ``DataLedger`` path, without processes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from testbed.metrics.fingerprint import mix64
from testbed.metrics.ledger import DataLedger, payload


@dataclass
class Pipeline:
    world_size: int = 3
    size: int = 240
    batch: int = 8
    seed: int = 0
    own_seed_ranks: tuple[int, ...] = ()  # these ranks' samplers use another seed (overlap)
    no_set_epoch: bool = False  # the epoch never advances (epoch_repeat)
    no_set_epoch_ranks: tuple[int, ...] = ()  # only these ranks' epochs never advance
    unsharded: bool = False  # every rank reads the whole dataset in the shared order (replicated)
    copies: dict[int, int] = field(default_factory=dict)  # rank r reads rank s's shard (partial replication)
    shuffle: bool = True
    drop_last: bool = True
    duplicates: float = 0.0  # fraction of samples whose content duplicates another sample's

    def steps_per_epoch(self) -> int:
        n = self.size if self.unsharded else math.ceil(self.size / self.world_size)
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def indices(self, rank: int, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch())
        if self.no_set_epoch or rank in self.no_set_epoch_ranks:
            epoch = 0
        seed = self.seed + (1000 + rank if rank in self.own_seed_ranks else 0)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
        if self.unsharded:
            shard = perm
        else:
            total = math.ceil(self.size / self.world_size) * self.world_size
            perm = perm + perm[: total - self.size]
            shard = perm[self.copies.get(rank, rank)::self.world_size]
        return shard[k * self.batch:(k + 1) * self.batch]

    def content(self, index: int) -> int:
        """The sample's content id: with duplicates, some samples repeat another's content."""
        if self.duplicates and (index * 2654435761 % 1000) < self.duplicates * 1000:
            return (index * 7919) % self.size
        return index

    def rows(self, steps: int, samples: int = 64) -> list[dict]:
        ledger, rows = DataLedger(self.world_size, samples), []
        for step in range(steps):
            table = []
            for r in range(self.world_size):
                ids = torch.tensor([self.content(i) for i in self.indices(r, step)], dtype=torch.int64)
                table.append(payload(mix64(ids * 1000003 + 17), ledger.level, samples, torch.device("cpu")))
            rows.append({"step": step, **ledger.update(torch.stack(table).numpy())})
        return rows
