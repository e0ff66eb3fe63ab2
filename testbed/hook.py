"""The DDP communication hook that measures local gradients on their way through the all-reduce.

Modelled on ``torch.distributed.algorithms.ddp_comm_hooks``: an explicit state object and a small
hook function. Per bucket the hook (1) applies the step's gradient perturbations, if any, to the
local bucket, (2) accumulates ``‖g_i‖²`` from it, (3) on pairwise steps all-gathers this one bucket
and accumulates the Gram matrix (peak extra memory: N buckets), (4) all-reduces with SUM and
divides by N (HCCL lacks AVG/PREMUL_SUM), and (5) once the mean is back, accumulates ``g_i·ḡ``.

Step (5) needs the local bucket after the all-reduce has overwritten the buffer. With DDP's
default ``gradient_as_bucket_view=False`` every ``param.grad`` still holds the local gradient
while the hook's ``then`` callback runs (DDP copies the averaged bucket back later), so no copy
is made. With ``gradient_as_bucket_view=True``, or when a perturbation edited the bucket, the hook
keeps a clone of the local bucket (one bucket of extra memory).
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from testbed.metrics import BucketAccumulator

GradTransform = Callable[[torch.Tensor, torch.Generator], None]


@dataclass
class ConsistencyState:
    """State shared between the training loop and the hook; reset by ``begin_step``."""

    process_group: dist.ProcessGroup | None
    world_size: int
    copy_local: bool = False  # True when grads are bucket views (no intact local copy exists)
    measuring: bool = False
    acc: BucketAccumulator | None = None
    grad_transforms: list[GradTransform] = field(default_factory=list)
    generator: torch.Generator | None = None
    keep_local: bool = False  # self-check: keep every local bucket (test / debugging only)
    local_buckets: list[torch.Tensor] = field(default_factory=list)

    def begin_step(self, measure: bool, pairwise: bool = False, grad_transforms: list[GradTransform] | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> None:
        self.measuring = measure or pairwise
        self.acc = BucketAccumulator(self.world_size, device, with_gram=pairwise) if self.measuring else None
        self.grad_transforms = list(grad_transforms or [])
        self.generator = generator
        self.local_buckets = []


def consistency_hook(state: ConsistencyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Measure the local bucket, all-reduce it (SUM then /N), then measure it against the mean."""
    buf = bucket.buffer()
    for transform in state.grad_transforms:
        transform(buf, state.generator or torch.Generator())
    acc = state.acc
    local = None
    if acc is not None:
        acc.add_local(buf)
        if acc.gram is not None:
            gathered = [torch.empty_like(buf) for _ in range(state.world_size)]
            dist.all_gather(gathered, buf, group=state.process_group)
            acc.add_gram(torch.stack(gathered))
            del gathered
        if state.copy_local or state.grad_transforms or state.keep_local:
            local = buf.clone()
            if state.keep_local:
                state.local_buckets.append(local)
    fut = dist.all_reduce(buf, group=state.process_group, async_op=True).get_future()

    def finish(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        mean = f.value()[0].div_(state.world_size)
        if acc is not None:
            if local is not None:
                acc.add_dot(local, mean)
            else:
                for param, view in zip(bucket.parameters(), bucket.gradients()):
                    acc.add_dot(param.grad, view)
        return mean

    return fut.then(finish)


def install(ddp_model: torch.nn.parallel.DistributedDataParallel,
            process_group: dist.ProcessGroup | None = None) -> ConsistencyState:
    """Register the hook on a DDP model (before its first backward) and return its state."""
    world_size = dist.get_world_size(process_group)
    state = ConsistencyState(process_group, world_size,
                             copy_local=bool(getattr(ddp_model, "gradient_as_bucket_view", False)))
    ddp_model.register_comm_hook(state, consistency_hook)
    return state
