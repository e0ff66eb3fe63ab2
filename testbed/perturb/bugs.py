"""The bug zoo's perturbations: the mistakes users make, as faithful as a step plan can hold them.

Each kind reproduces one reported mistake (docs/bugs.md names the public reports); the scenarios
using them are in ``scenarios/bugs/``. Unlike the abstract perturbations (``perturbations.py``:
noise, desynchronised seeds), these change what the job does the way the bug does:

- ``sampler_seed``: the rank's DistributedSampler is built with another ``seed`` - its epoch
  permutation differs, its shard overlaps the others' and some samples go unread;
- ``no_set_epoch``: ``sampler.set_epoch(epoch)`` is never called - every epoch repeats the order of
  epoch 0;
- ``no_sampler``: no DistributedSampler - the rank reads the whole dataset in the shared order
  (on every rank: every rank reads the same batches);
- ``sampler_rank``: the sampler is given another rank (``LOCAL_RANK`` instead of the global rank on
  a multi-node job: ``rank % ranks_per_node``) - ranks on different nodes read the same shard;
- ``load_checkpoint``: a checkpoint is loaded into this rank's model after DDP was built (DDP
  broadcast rank 0's weights at construction and never again): its weights differ from step
  ``start_step`` on;
- ``reinit_frozen``: a frozen layer (``requires_grad`` False, so DDP never syncs it) is
  re-initialised on this rank after wrapping;
- ``unfreeze_after_wrap``: the frozen layers get ``requires_grad = True`` after DDP was built on
  this rank only: they train on its local gradients (DDP does not reduce parameters it did not
  register), so they drift from the other replicas;
- ``augment``: random input augmentation (Gaussian jitter of ``key``); ``same_seed = true`` seeds
  it identically on every rank (``set_seed(seed)`` everywhere, accelerate#236) - the healthy twin
  seeds it per rank;
- ``env_differs``: an environment variable (``NCCL_ALGO=Tree`` on one node) set on this rank only.

Apply the one-off edits (``load_checkpoint``, ``reinit_frozen``) with ``end_step = start_step + 1``.
"""
from __future__ import annotations

import os
from typing import Annotated

import torch

from testbed.perturb.perturbations import Batch, StepPlan, derive_seed
from testbed.scenario.bounds import Bounds
from testbed.scenario.tables import PERTURBATIONS


@PERTURBATIONS.register("sampler_seed")
def sampler_seed(plan: StepPlan, *, seed: int = 1) -> None:
    """The rank's sampler shuffles with ``DistributedSampler(seed=scenario seed + seed)``."""
    plan.shuffle_seed = derive_seed("shuffle", plan.seed + seed)


@PERTURBATIONS.register("no_set_epoch")
def no_set_epoch(plan: StepPlan) -> None:
    """``set_epoch`` is never called: the rank's sampler stays at epoch 0."""
    plan.fixed_epoch = 0


@PERTURBATIONS.register("no_sampler")
def no_sampler(plan: StepPlan) -> None:
    """No DistributedSampler: the rank reads the whole dataset (num_replicas 1) in the shared order."""
    plan.num_shards, plan.data_rank = 1, 0


@PERTURBATIONS.register("sampler_rank")
def sampler_rank(plan: StepPlan, *, ranks_per_node: Annotated[int, Bounds(ge=1)] = 2) -> None:
    """The sampler is given the local rank (``rank % ranks_per_node``) instead of the global rank."""
    if ranks_per_node < 1:
        raise ValueError(f"sampler_rank ranks_per_node must be >= 1, got {ranks_per_node}")
    plan.data_rank = plan.rank % ranks_per_node


@PERTURBATIONS.register("load_checkpoint")
def load_checkpoint(plan: StepPlan, *, scale: Annotated[float, Bounds(gt=0)] = 0.01) -> None:
    """This rank loads a checkpoint after wrapping: every parameter moves by ``scale`` × Gaussian
    noise (a checkpoint from a slightly different run), deterministically."""
    generator = plan.generator("checkpoint")

    def load(module: torch.nn.Module) -> None:
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
            p.add_(noise * scale)

    plan.state_edits.append(load)


@PERTURBATIONS.register("reinit_frozen")
def reinit_frozen(plan: StepPlan) -> None:
    """This rank re-initialises its frozen layers (``reset_parameters``) after wrapping."""
    seed = derive_seed("reinit", plan.seed, plan.rank, plan.step)

    def reinit(module: torch.nn.Module) -> None:
        torch.manual_seed(seed % (2**63))
        for m in module.modules():
            own = list(m.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own) and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    plan.state_edits.append(reinit)


@PERTURBATIONS.register("unfreeze_after_wrap")
def unfreeze_after_wrap(plan: StepPlan) -> None:
    """This rank sets ``requires_grad = True`` on its frozen parameters after DDP was built."""

    def unfreeze(module: torch.nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad_(True)

    plan.state_edits.append(unfreeze)


@PERTURBATIONS.register("augment")
def augment(plan: StepPlan, *, std: Annotated[float, Bounds(ge=0)] = 0.1, key: str = "inputs",
            same_seed: bool = False) -> None:
    """Random augmentation: Gaussian jitter of ``std`` added to ``key``. Seeded per rank and step (the
    healthy way) or, with ``same_seed``, per step only - the same draws on every rank."""
    seed = derive_seed("augment", plan.seed, plan.step, -1 if same_seed else plan.rank)

    def jitter(batch: Batch, _generator: torch.Generator) -> Batch:
        g = torch.Generator().manual_seed(seed)
        x = batch[key]
        return {**batch, key: x + std * torch.randn(x.shape, generator=g).to(x.dtype)}

    plan.batch_transforms.append(jitter)


@PERTURBATIONS.register("env_differs")
def env_differs(plan: StepPlan, *, name: str = "NCCL_ALGO", value: str = "Tree") -> None:
    """This rank's environment has ``name=value`` (set before the step, so the first exchange sees it)."""
    plan.before_step.append(lambda: os.environ.__setitem__(name, value))
