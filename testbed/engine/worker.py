"""One rank's training job: build, wrap in DDP (or FSDP2) with the consistency hook, step, gather scalars.

Runs the same way under the built-in spawn launcher (``testbed.engine.runner``) and under torchrun
(``torchrun --nproc-per-node N -m testbed.worker SCENARIO --out DIR``), which passes the rank
layout through RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""
from __future__ import annotations

import contextlib
import datetime
import random
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine import device as devices
from testbed.engine import teardown
from testbed.engine import fsdp
from testbed.engine.config import rank_config
from testbed.engine.coverage import epoch_coverage
from testbed.workloads.data import ShardedSampler
from testbed.workloads.optim import build_scheduler
from testbed.engine.hook import ConsistencyState, install
from testbed.engine.sinks import JsonlSink
from testbed.engine.step_path import NonFiniteStop, StepPath
from testbed.perturb.perturbations import StepPlan, derive_seed
from testbed.record.files import TIMING_FILE, JsonlWriter, write_json_atomic
from testbed.schema.row import Row
from testbed.schema import row as R
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS, PERTURBATIONS
from testbed.scenario.spec import Scenario

# Phases written to the shared progress array (step * PHASES + phase) so the launcher can tell
# a rank stuck before its compute from ranks waiting in a collective.
PHASE_START, PHASE_COMPUTE, PHASE_SYNC, PHASE_DONE = range(4)
PHASES = 4


__all__ = ["NonFiniteStop", "RankContext", "build", "train", "train_step", "make_plan", "seed_everything",
           "error_report", "write_error_report"]


@dataclass
class RankContext:
    """How this process joins the job, and where it reports."""

    rank: int
    world_size: int
    local_rank: int
    out_dir: Path
    store: Any = None  # a c10d Store (spawn launcher) or None → env:// (torchrun)
    progress: Any = None  # multiprocessing Array of int64, one slot per rank, or None
    step: int = -1  # the step being run, for error reports
    phase: int = PHASE_START

    def mark(self, step: int, phase: int) -> None:
        self.step, self.phase = step, phase
        if self.progress is not None:
            self.progress[self.rank] = step * PHASES + phase


@dataclass
class _Job:
    """Everything built once per run."""

    scenario: Scenario
    ctx: RankContext
    device: torch.device
    ddp: DDP  # the wrapped model: DDP, or the root FSDPModule when parallel.kind = "fsdp2"
    optimizer: torch.optim.Optimizer
    hook: ConsistencyState
    sampler: ShardedSampler
    dataset: Any
    base_lrs: list[float]
    path: StepPath  # the step's numbers: the same object the drop-in monitor uses
    scheduler: Any = None  # transformers' lr scheduler, or None for a constant lr
    lr: float | None = None  # the schedule's lr of the running step (before a perturbation's lr_scale)
    timing_out: JsonlWriter | None = None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed % (2**63))
    np.random.seed(seed % (2**32))
    random.seed(seed)


def make_plan(scenario: Scenario, rank: int, step: int) -> StepPlan:
    """The synced plan for (rank, step), then every active perturbation in file order."""
    plan = StepPlan.synced(rank, scenario.world_size, step, scenario.seed)
    for p in scenario.perturbations:
        if p.active(rank, step):
            PERTURBATIONS.get(p.kind)(plan, **p.params)
    return plan


def init_process_group(scenario: Scenario, ctx: RankContext, backend: str) -> None:
    timeout = datetime.timedelta(seconds=max(scenario.stall_timeout_s * 2, 30.0))
    kwargs: dict[str, Any] = {"backend": backend, "rank": ctx.rank, "world_size": ctx.world_size, "timeout": timeout}
    if ctx.store is not None:
        kwargs["store"] = ctx.store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(**kwargs)


def build(scenario: Scenario, ctx: RankContext) -> _Job:
    device_type = devices.resolve_device_type(scenario.device)
    backend = devices.resolve_backend(scenario.backend, device_type)
    device = devices.local_device(device_type, ctx.local_rank)
    torch.set_num_threads(scenario.threads_per_rank)
    init_process_group(scenario, ctx, backend)
    dataset = DATASETS.get(scenario.data.kind)(scenario.seed, **scenario.data.params)
    seed_everything(derive_seed("init", scenario.seed))  # identical init; DDP also broadcasts rank 0's
    module = MODELS.get(scenario.model.kind)(dataset, **scenario.model.params).to(device)
    if scenario.parallel.kind == "fsdp2":
        ddp = fsdp.shard(module, reshard_after_forward=scenario.parallel.reshard_after_forward)
        hook = fsdp.install(ddp)
    else:
        with warnings.catch_warnings():  # torch >= 2.13 deprecates the keyword (forward_sync_buffers); older lack the new one
            warnings.simplefilter("ignore", FutureWarning)
            buffers = {} if scenario.parallel.broadcast_buffers else {"broadcast_buffers": False}
            ddp = DDP(module, device_ids=[device.index] if device.type != "cpu" else None, **buffers)
        hook = install(ddp)
    optimizer = OPTIMIZERS.get(scenario.optim.kind)(ddp.parameters(), **scenario.optim.params)
    job = _Job(scenario, ctx, device, ddp, optimizer, hook,
               ShardedSampler(dataset.size, scenario.world_size, scenario.batch_size), dataset,
               [g["lr"] for g in optimizer.param_groups], step_path(scenario, ddp, hook, device, ctx, optimizer))
    job.scheduler = build_scheduler(optimizer, scenario.schedule, scenario.steps)
    if ctx.rank == 0:
        job.timing_out = JsonlWriter(ctx.out_dir / TIMING_FILE)
    return job


def step_path(scenario: Scenario, model: torch.nn.Module, hook: ConsistencyState, device: torch.device,
              ctx: RankContext, optimizer: torch.optim.Optimizer | None = None) -> StepPath:
    """The scenario's step path: its cadence, rank 0's metrics/events files, its non-finite policy,
    the data ledger and the settings exchange. No check-in and no alarms: the launcher watches the
    ranks itself (progress counters, ``stall_timeout_s``) and the verdict judges the finished record."""
    s = scenario
    return StepPath(model, hook, s.metrics.cadence, device=device, batch_size=s.batch_size * s.grad_accum,
                    noise_scale_ema=s.metrics.noise_scale_ema, last_step=s.steps - 1,
                    sinks=[JsonlSink(ctx.out_dir)] if ctx.rank == 0 else [], on_nonfinite=s.on_nonfinite,
                    self_check=s.metrics.self_check, ledger_samples=s.metrics.ledger_samples,
                    config=lambda: rank_config(model, optimizer))


def _autocast(plan: StepPlan, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=plan.autocast_dtype)


def _sync(model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradient accumulation: reduce only on the last micro-batch (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync``, which also holds the accumulated unsharded local gradient)."""
    if fsdp.is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


def train_step(job: _Job, step: int) -> Row | None:
    """One optimizer step; returns the metrics row (on every rank) or None if not measured."""
    s, ctx = job.scenario, job.ctx
    plan = make_plan(s, ctx.rank, step)
    ctx.mark(step, PHASE_START)
    for action in plan.before_step:
        action()
    if plan.state_edits:  # a bug zoo edit of this rank's model after wrapping (perturb/bugs.py)
        with torch.no_grad():
            for edit in plan.state_edits:
                edit(job.ddp if fsdp.is_sharded(job.ddp) else job.ddp.module)
    seed_everything(plan.rng_seed)
    lrs = job.scheduler.get_last_lr() if job.scheduler is not None else job.base_lrs
    for group, lr in zip(job.optimizer.param_groups, lrs):
        group["lr"] = lr * plan.lr_scale
    job.lr = lrs[0]
    job.path.begin(step, plan.grad_transforms, plan.generator("grad"))
    ctx.mark(step, PHASE_COMPUTE)
    local_loss = torch.zeros((), dtype=torch.float64, device=job.device)
    for micro in range(s.grad_accum):
        idx = job.sampler.indices(step * s.grad_accum + micro, plan)
        batch = job.dataset.batch(idx)
        for transform in plan.batch_transforms:
            batch = transform(batch, plan.generator("batch", micro))
        batch = {k: v.to(job.device, non_blocking=True) for k, v in batch.items()}
        last = micro == s.grad_accum - 1
        with _sync(job.ddp, last), _autocast(plan, job.device):
            loss = job.ddp(**batch)
        if last and plan.delay_s > 0:
            time.sleep(plan.delay_s)  # a straggler: late to the all-reduce, numerics untouched
        if last:
            ctx.mark(step, PHASE_SYNC)
        (loss / s.grad_accum).backward()
        local_loss += loss.detach().double() / s.grad_accum
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    if job.scheduler is not None:
        job.scheduler.step()  # closed form (LambdaLR): the lr_scale set above does not feed back
    coverage = epoch_coverage(s, job.sampler, step, make_plan) if job.path.plan.collective else None
    extra = {R.DATA_COVERAGE: coverage} if coverage is not None else None
    row = job.path.end(step, local_loss, lr=job.lr, extra=extra)  # rank 0's sinks write it (metrics.jsonl)
    ctx.mark(step, PHASE_DONE)
    return row


def train(scenario: Scenario, ctx: RankContext) -> None:
    """The whole job on this rank; rank 0 writes the metrics rows as steps complete."""
    job = build(scenario, ctx)
    finished = False
    try:
        for step in range(scenario.steps):
            t0 = time.perf_counter()
            train_step(job, step)
            if job.timing_out is not None:
                job.timing_out.write({R.STEP: step, "seconds": time.perf_counter() - t0})
        if scenario.metrics.save_weights:
            path = ctx.out_dir / "ranks" / f"rank{ctx.rank}.final.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            weights = (fsdp.full_state_dict(job.ddp) if fsdp.is_sharded(job.ddp)
                       else {k: v.detach().cpu() for k, v in job.ddp.module.state_dict().items()})
            torch.save(weights, path)
        dist.barrier()
        ctx.mark(scenario.steps, PHASE_START)  # "past the last step": all work done, only teardown left
        finished = True
    finally:
        job.path.close()
        if job.timing_out is not None:
            job.timing_out.close()
        if finished:  # nothing in flight after the barrier: join gloo's threads now, not at
            teardown.release_gloo([job.ddp])  # interpreter finalization (issue 17, engine/teardown.py)
        if dist.is_initialized():  # other backends, or a failure (a join could wait on a dead peer)
            dist.destroy_process_group()


def error_report(ctx: RankContext, exc: BaseException) -> dict[str, Any]:
    return {
        "rank": ctx.rank,
        "step": ctx.step,
        "phase": ctx.phase,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
        "time": time.time(),
        "nonfinite_ranks": exc.ranks if isinstance(exc, NonFiniteStop) else None,
    }


def write_error_report(ctx: RankContext, exc: BaseException) -> None:
    write_json_atomic(ctx.out_dir / "ranks" / f"rank{ctx.rank}.json", error_report(ctx, exc))
