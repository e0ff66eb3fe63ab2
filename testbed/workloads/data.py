"""Datasets and DistributedSampler-style sharding, computed statelessly per step.

A dataset is any object with ``size`` (int), ``batch(indices) -> dict[str, Tensor]`` and an
``info`` dict the model builder reads (feature count, classes, vocabulary...). Sharding follows
``torch.utils.data.DistributedSampler``: one permutation per epoch from a shared seed, padded to
a multiple of the world size, rank r taking every N-th index from r. Because the batch of a step
is a pure function of (plan, step), runs are reproducible and a perturbation can change it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Protocol

import torch

from testbed.perturb.perturbations import StepPlan, derive_seed
from testbed.scenario.bounds import Bounds
from testbed.scenario.tables import DATASETS


class Dataset(Protocol):
    size: int
    info: dict[str, Any]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass
class TensorDataset:
    """In-memory tensors indexed along dim 0; ``info`` describes them to the model builder."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t[indices] for k, t in self.tensors.items()}


@DATASETS.register("synthetic")
def synthetic_classification(
    seed: int, *, size: Annotated[int, Bounds(ge=1)] = 4096, features: Annotated[int, Bounds(ge=1)] = 32,
    classes: Annotated[int, Bounds(ge=2)] = 8, noise: Annotated[float, Bounds(ge=0)] = 0.5
) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random linear teacher plus noise (learnable, not trivial)."""
    if size < 1 or features < 1 or classes < 2:
        raise ValueError("synthetic data needs size >= 1, features >= 1, classes >= 2")
    g = torch.Generator().manual_seed(derive_seed("synthetic-data", seed))
    x = torch.randn(size, features, generator=g)
    teacher = torch.randn(features, classes, generator=g) / math.sqrt(features)
    logits = x @ teacher + noise * torch.randn(size, classes, generator=g)
    return TensorDataset({"inputs": x, "targets": logits.argmax(dim=1)},
                         {"features": features, "classes": classes})


synthetic_classification.batch_keys = ("inputs", "targets")  # type: ignore[attr-defined]
# float32 inputs + int64 targets, built whole in every rank (engine/memory.py checks it fits)
synthetic_classification.memory_bytes = (  # type: ignore[attr-defined]
    lambda p: int(p.get("size", 4096)) * (4 * int(p.get("features", 32)) + 8 + 4 * int(p.get("classes", 8))))


class ShardedSampler:
    """Per-step batch indices for each rank, DistributedSampler semantics, drop_last batches."""

    def __init__(self, dataset_size: int, world_size: int, batch_size: int):
        self.size = dataset_size
        self.world_size = world_size
        self.batch_size = batch_size
        self.per_rank = math.ceil(dataset_size / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"dataset of {dataset_size} samples is too small for {world_size} ranks × batch {batch_size}"
            )

    def indices(self, micro_step: int, plan: StepPlan) -> torch.Tensor:
        """Indices of the ``micro_step``-th batch of ``plan.data_rank``'s shard under ``plan``
        (``plan.num_shards``: the sampler's num_replicas, 1 = the whole dataset per rank;
        ``plan.fixed_epoch``: an epoch that never advances)."""
        shards = plan.num_shards or self.world_size
        per_epoch = self.batches_per_epoch if shards == self.world_size else \
            max(1, math.ceil(self.size / shards) // self.batch_size)
        epoch, k = divmod(micro_step, per_epoch)
        if plan.fixed_epoch is not None:
            epoch = plan.fixed_epoch
        perm = _epoch_permutation(self.size, shards, plan.shuffle_seed, epoch)
        shard = perm[plan.data_rank % shards :: shards]
        idx = shard[k * self.batch_size : (k + 1) * self.batch_size]
        for transform in plan.index_transforms:
            idx = transform(idx)
        return idx


@lru_cache(maxsize=16)
def _epoch_permutation(size: int, world_size: int, shuffle_seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed("epoch", shuffle_seed, epoch))
    perm = torch.randperm(size, generator=g)
    total = math.ceil(size / world_size) * world_size
    if total > size:  # pad by wrapping around, like DistributedSampler
        perm = torch.cat([perm, perm[: total - size]])
    return perm
