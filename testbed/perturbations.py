"""Perturbations: small functions that edit one rank's plan for one step.

The worker builds a :class:`StepPlan` for every (rank, step) holding what a normal synchronous DP
step would do, then calls each *active* perturbation on it. A perturbation only ever edits the
plan, so it cannot reach into the training loop, and its effect window (``start_step`` /
``end_step``, ``ranks``) is enforced in one place. Register new kinds with
``@PERTURBATIONS.register("name")``; keyword-only parameters become the scenario's fields.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from testbed.registry_tables import PERTURBATIONS

Batch = dict[str, torch.Tensor]
BatchTransform = Callable[[Batch, torch.Generator], Batch]
GradTransform = Callable[[torch.Tensor, torch.Generator], None]


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StepPlan:
    """What one rank does in one optimizer step. Defaults = a correctly synchronised DP step."""

    rank: int
    world_size: int
    step: int
    seed: int  # the scenario seed
    shuffle_seed: int  # seeds the epoch permutation; shared by all ranks in a synced job
    rng_seed: int  # seeds torch / numpy / random for this step (dropout masks, noise)
    data_rank: int  # whose shard of the permutation this rank reads
    lr_scale: float = 1.0
    autocast_dtype: torch.dtype | None = None
    delay_s: float = 0.0
    batch_transforms: list[BatchTransform] = field(default_factory=list)
    grad_transforms: list[GradTransform] = field(default_factory=list)
    before_step: list[Callable[[], None]] = field(default_factory=list)
    index_transforms: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)

    @staticmethod
    def synced(rank: int, world_size: int, step: int, seed: int) -> "StepPlan":
        return StepPlan(
            rank=rank,
            world_size=world_size,
            step=step,
            seed=seed,
            shuffle_seed=derive_seed("shuffle", seed),
            rng_seed=derive_seed("rng", seed, step),
            data_rank=rank,
        )

    def generator(self, *salt: Any) -> torch.Generator:
        """A CPU generator private to this rank, step and purpose (for perturbation noise)."""
        return torch.Generator().manual_seed(derive_seed("perturb", self.seed, self.rank, self.step, *salt))


@PERTURBATIONS.register("shuffle_desync")
def shuffle_desync(plan: StepPlan, *, salt: int = 0) -> None:
    """The rank draws its epoch permutation from its own seed instead of the shared one.

    Its shard then overlaps the others' and some samples are skipped for the epoch: the
    reference study's data-shuffling desync (e.g. a sampler whose ``set_epoch`` or seed differs).
    """
    plan.shuffle_seed = derive_seed("shuffle-own", plan.seed, plan.rank, salt)


@PERTURBATIONS.register("seed_desync")
def seed_desync(plan: StepPlan, *, salt: int = 0) -> None:
    """The rank seeds torch / numpy / random with its own seed (different dropout masks, noise)."""
    plan.rng_seed = derive_seed("rng-own", plan.seed, plan.step, plan.rank, salt)


@PERTURBATIONS.register("replicate_batch")
def replicate_batch(plan: StepPlan, *, source_rank: int = 0) -> None:
    """The rank reads ``source_rank``'s shard, so (on all ranks) every rank sees the same batch.

    With all ranks affected this is the exact-zero control: identical inputs, identical seeds,
    hence identical local gradients, zero dispersion and cosine 1.
    """
    plan.data_rank = source_rank % plan.world_size
