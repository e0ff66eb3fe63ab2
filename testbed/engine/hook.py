"""The DDP communication hook that measures local gradients on their way through the all-reduce.

Modelled on ``torch.distributed.algorithms.ddp_comm_hooks``: an explicit state object and a small
hook function. Per bucket the hook (1) applies the step's gradient perturbations, if any, to the
local bucket, (2) on pairwise steps all-gathers it chunk by chunk (``GATHER_CHUNK`` elements per
rank) and accumulates the Gram matrix (peak extra memory: N chunks, not N buckets), (3)
all-reduces with SUM and divides by N (HCCL lacks AVG/PREMUL_SUM), and (4) once the mean is
back, accumulates ``‖g_i‖²`` and ``g_i·ḡ`` together, chunk by chunk, the second dot reading the
local chunk from cache (``BucketAccumulator.add_pairs``). On non-pairwise steps nothing runs
between the bucket becoming ready and its all-reduce starting. Steps that are not measured
(``metrics.every`` > 1) pay only the Python hook's pass-through, whose main cost is the separate
division pass (DDP's built-in path fuses the 1/N into its copy into the bucket); see
docs/performance.md.

Step (4) needs the local bucket after the all-reduce has overwritten the buffer. With DDP's
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

from testbed.metrics.step import GRAM_CHUNK, BucketAccumulator

GradTransform = Callable[[torch.Tensor, torch.Generator], None]
# Elements per rank per pairwise all-gather: the pairwise step's extra memory is N × this (× 4 bytes
# for fp32), whatever the bucket size; one more collective per chunk is the price (benchmarks/).
GATHER_CHUNK = GRAM_CHUNK


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


# ``all_gather_single`` is the newer name (torch ≥ 2.13 deprecates the old one, which 2.4 still needs).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_bucket(buf: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's copy of this one bucket as an [N, n] tensor.

    The pairwise path's only large allocation: N × (``buf`` bytes), written in place by the
    collective (no per-rank list, no stacked copy) and freed when the caller drops it. The hook
    passes one ``GATHER_CHUNK`` slice of a bucket at a time, so the extra peak memory of a pairwise
    step is N × GATHER_CHUNK elements (plus what ``BucketAccumulator.add_gram`` documents: an N×N
    matrix), whatever the bucket size. Measured in tests/test_pairwise.py and benchmarks/.
    """
    out = torch.empty(world_size * buf.numel(), dtype=buf.dtype, device=buf.device)
    _all_gather_flat(out, buf.reshape(-1), group=group)
    return out.view(world_size, -1)


def consistency_hook(state: ConsistencyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Measure the local bucket, all-reduce it (SUM then /N), then measure it against the mean."""
    buf = bucket.buffer()
    for transform in state.grad_transforms:
        transform(buf, state.generator or torch.Generator())
    acc = state.acc
    local = None
    if acc is not None:
        if acc.gram is not None:
            for chunk in buf.reshape(-1).split(GATHER_CHUNK):
                acc.add_gram(gather_bucket(chunk, state.world_size, state.process_group))
        if state.copy_local or state.grad_transforms or state.keep_local:
            local = buf.clone()
            if state.keep_local:
                state.local_buckets.append(local)
    fut = dist.all_reduce(buf, group=state.process_group, async_op=True).get_future()

    def finish(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        mean = f.value()[0].div_(state.world_size)
        if acc is not None:
            if local is not None:
                acc.add_pairs([local], [mean])
            else:  # param.grad: the local gradient; bucket.gradients(): its views into the mean
                acc.add_pairs([p.grad for p in bucket.parameters()], bucket.gradients())
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
