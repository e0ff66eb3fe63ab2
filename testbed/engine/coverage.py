"""The runner's ``uncovered`` evidence: samples a sampler epoch never read, against a synced run.

The runner knows what no monitor can: the dataset's size and every rank's sample indices (a step's
batch is a pure function of the rank's plan and the step, ``workloads/data.py``). At the last step
of each sampler epoch (and at the run's last step) ``epoch_coverage`` counts the distinct indices
all ranks read in that epoch's steps and the distinct indices a synchronised job (every plan
``StepPlan.synced``) reads in the same steps - the drop-last leftovers and the padding the healthy
sampler itself produces cancel out, so any shortfall is the job's: ``data_coverage`` in the row,
``uncovered`` in the verdict (``diagnose/data.py``). Cost: ``N × batches per epoch`` index
computations once per epoch, on every rank (every rank must hold the same row).
"""
from __future__ import annotations

from typing import Any, Callable

from testbed.perturb.perturbations import StepPlan
from testbed.scenario.spec import Scenario
from testbed.workloads.data import ShardedSampler

PlanOf = Callable[[Scenario, int, int], StepPlan]


def epoch_coverage(scenario: Scenario, sampler: ShardedSampler, step: int, plan_of: PlanOf) -> dict[str, Any] | None:
    """``{"epoch", "from_step", "size", "read", "expected"}`` when ``step`` ends a sampler epoch (or
    the run), else None."""
    accum, per_epoch = scenario.grad_accum, sampler.batches_per_epoch
    last_micro = (step + 1) * accum - 1
    if (last_micro + 1) % per_epoch and step != scenario.steps - 1:
        return None
    epoch = last_micro // per_epoch
    first_micro = epoch * per_epoch
    read: set[int] = set()
    expected: set[int] = set()
    for rank in range(scenario.world_size):
        for micro in range(first_micro, last_micro + 1):
            at = micro // accum
            read.update(sampler.indices(micro, plan_of(scenario, rank, at)).tolist())
            synced = StepPlan.synced(rank, scenario.world_size, at, scenario.seed)
            expected.update(sampler.indices(micro, synced).tolist())
    return {"epoch": epoch + 1, "from_step": first_micro // accum, "size": sampler.size, "read": len(read),
            "expected": len(expected)}
