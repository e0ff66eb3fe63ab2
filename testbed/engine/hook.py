"""The DDP communication hook that measures local gradients on their way through the all-reduce.

Modelled on ``torch.distributed.algorithms.ddp_comm_hooks``: an explicit state object and a small
hook function. Per bucket the hook first applies the step's gradient perturbations, if any, to the
local bucket, then takes one of two paths:

- **all-reduce path** (measured steps, fp32/fp64 buckets): all-reduce with SUM and divide by N
  (HCCL lacks AVG/PREMUL_SUM); once the mean is back, accumulate ``‖g_i‖²`` and ``g_i·ḡ``
  together, chunk by chunk, the second dot reading the local chunk from cache
  (``BucketAccumulator.add_pairs``). Nothing runs between the bucket becoming ready and its
  all-reduce starting.
- **all-to-all path** (``exchange_slices``; pairwise steps, and bf16/fp16 buckets on any measured
  step): an all-reduce is a reduce-scatter plus an all-gather, and the reduce-scatter is done as
  an all-to-all plus a local sum, so rank k holds every rank's slice k of the bucket; it adds its
  share of the Gram matrix ``G_ij = Σ_k g_i[k]·g_j[k]`` and all-gathers the mean slice. Same
  bytes on the wire as an all-reduce. At the end of the step the one scalar all-gather
  (``engine.gather``) also carries each rank's N×N share, so every rank gets the exact ``G``
  and, from it, every ``‖g_i‖``, ``g_i·ḡ`` and the pairwise matrix. For bf16 buckets it is also
  the exact path: ``g_i·ḡ`` against the all-reduced bf16 mean would be off by ~1e-3 relative.

(The previous pairwise design all-gathered every bucket chunk by chunk — N × the gradient in
traffic; it lost to the all-to-all path in every configuration measured, see
docs/performance.md, and lives on only as a benchmark variant.)

Steps that are not measured (``metrics.every`` > 1) pay only the Python hook's pass-through,
whose main cost is the separate division pass (DDP's built-in path fuses the 1/N into its copy
into the bucket); see docs/performance.md.

The all-reduce path needs the local bucket after the all-reduce has overwritten the buffer. With
DDP's default ``gradient_as_bucket_view=False`` every ``param.grad`` still holds the local
gradient while the hook's ``then`` callback runs (DDP copies the averaged bucket back later), so
no copy is made. With ``gradient_as_bucket_view=True``, or when a perturbation edited the bucket,
the hook keeps a clone of the local bucket (one bucket of extra memory).
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from testbed.metrics.step import BucketAccumulator

GradTransform = Callable[[torch.Tensor, torch.Generator], None]
WIDE_DTYPES = (torch.float32, torch.float64)  # buckets the all-reduce path measures exactly


@dataclass
class ConsistencyState:
    """State shared between the training loop and the hook; reset by ``begin_step``."""

    process_group: dist.ProcessGroup | None
    world_size: int
    copy_local: bool = False  # True when grads are bucket views (no intact local copy exists)
    measuring: bool = False
    pairwise: bool = False  # this step wants the full Gram matrix: every bucket takes the all-to-all path
    acc: BucketAccumulator | None = None
    grad_transforms: list[GradTransform] = field(default_factory=list)
    generator: torch.Generator | None = None
    keep_local: bool = False  # self-check: keep every local bucket (test / debugging only)
    local_buckets: list[torch.Tensor] = field(default_factory=list)
    always_slices: bool = False  # FSDP2: every measured step takes the all-to-all path (engine.fsdp)
    sync_backwards: int = 0  # synchronising backward passes since begin_step (DDP; 0 under FSDP2)
    # called with sync_backwards when a second one begins before the step is closed (engine/checkin.py)
    on_extra_backward: Callable[[int], None] | None = None

    def begin_step(self, measure: bool, pairwise: bool = False, grad_transforms: list[GradTransform] | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> None:
        self.measuring = measure or pairwise
        self.pairwise = pairwise
        self.acc = BucketAccumulator(self.world_size, device, with_gram=pairwise) if self.measuring else None
        self.grad_transforms = list(grad_transforms or [])
        self.generator = generator
        self.local_buckets = []
        self.sync_backwards = 0

    def count_backward(self) -> None:
        """A synchronising backward begins (its first bucket is ready)."""
        self.sync_backwards += 1
        if self.sync_backwards > 1 and self.on_extra_backward is not None:
            self.on_extra_backward(self.sync_backwards)


# ``all_gather_single`` is the newer name (torch ≥ 2.13 deprecates the old one, which 2.4 still needs).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def slice_sizes(numel: int, world_size: int) -> list[int]:
    """Lengths of the N slices of a flat bucket: ``m = ceil(numel / N)`` each, the last ones
    shorter or empty (``torch.chunk``'s layout); slice k starts at ``k·m``."""
    m = -(-numel // world_size)
    return [max(0, min(m, numel - k * m)) for k in range(world_size)]


def exchange_slices(buf: torch.Tensor, acc: BucketAccumulator, world_size: int,
                    group: dist.ProcessGroup | None) -> torch.futures.Future[torch.Tensor]:
    """All-reduce-and-average ``buf`` as all-to-all + local sum + all-gather, adding this rank's
    share of the Gram matrix on the way.

    Guarantee: when the future completes, ``buf`` (its value) holds ``(Σ_i buf_i) / N`` (summed in
    ≥ fp32, rounded once to the bucket's dtype) on every rank, and ``acc.gram`` has gained
    ``Σ_{k in my slice} g_i[k]·g_j[k]``. The all-to-all reads the bucket in place (uneven splits:
    no padded copy); the mean slice is padded to ``m`` so the all-gather is even, and it writes
    straight into the bucket when N divides its length (else into a padded buffer copied back).
    Extra memory, freed bucket by bucket: the receive buffer (one bucket) and one slice. The
    all-to-all is waited for here, on the thread that runs the hook, so every rank issues its
    collectives in the same order; the all-gather overlaps the rest of the backward pass.
    """
    flat = buf.reshape(-1)
    sizes = slice_sizes(flat.numel(), world_size)
    m, mine = sizes[0], sizes[dist.get_rank(group)]
    received = torch.empty(world_size * mine, dtype=flat.dtype, device=flat.device)
    dist.all_to_all_single(received, flat, output_split_sizes=[mine] * world_size, input_split_sizes=sizes,
                           group=group)
    mean = torch.zeros(m, dtype=flat.dtype, device=flat.device)
    acc.add_slices(received.view(world_size, mine), mean[:mine], divide=world_size)
    del received
    if flat.numel() == world_size * m:
        fut = _all_gather_flat(flat, mean, group=group, async_op=True).get_future()
        return fut.then(lambda _: buf)
    padded = torch.empty(world_size * m, dtype=flat.dtype, device=flat.device)
    fut = _all_gather_flat(padded, mean, group=group, async_op=True).get_future()
    return fut.then(lambda _: flat.copy_(padded[:flat.numel()]).view_as(buf))


def consistency_hook(state: ConsistencyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Measure the local bucket on its way through the averaging (all-reduce or all-to-all path).

    Guarantee: the returned future's value is the bucket averaged over ranks (what DDP's default
    hook computes, up to float summation order); once every bucket's future is done, ``state.acc``
    holds this rank's ``‖g_i‖²`` / ``g_i·ḡ`` over the all-reduced buckets and its share of ``G``
    over the all-to-all ones (``engine.gather`` combines them)."""
    buf = bucket.buffer()
    if bucket.index() == 0:  # DDP hooks buckets in index order: a new backward pass begins
        state.count_backward()
    for transform in state.grad_transforms:
        transform(buf, state.generator or torch.Generator())
    acc = state.acc
    if acc is not None and state.keep_local:
        state.local_buckets.append(buf.clone())
    if acc is not None and (state.pairwise or state.always_slices or buf.dtype not in WIDE_DTYPES):
        return exchange_slices(buf, acc, state.world_size, state.process_group)
    local = None
    if acc is not None and (state.copy_local or state.grad_transforms):
        local = state.local_buckets[-1] if state.keep_local else buf.clone()
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
