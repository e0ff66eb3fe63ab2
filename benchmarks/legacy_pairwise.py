"""The previous pairwise design, kept only so the benchmark can compare against it.

Until the all-to-all path (testbed/engine/hook.py, ``exchange_slices``) the exact N×N matrix was
taken by all-gathering every bucket chunk by chunk (``GATHER_CHUNK`` elements per rank: extra
memory N × 1 MB) and multiplying the gathered [N, chunk] blocks, *in addition* to the ordinary
all-reduce: N + 1 times the gradient in traffic. This is that hook, unchanged in what it computes
(on pairwise steps only; the Gram is every rank's full matrix, not a share, and ``‖g_i‖²`` /
``g_i·ḡ`` come from the all-reduce path as before). Not used by testbed itself.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from testbed.engine.hook import ConsistencyState
from testbed.metrics.step import GRAM_CHUNK, BucketAccumulator, mean_offdiagonal, pairwise_cosine, step_metrics

GATHER_CHUNK = GRAM_CHUNK
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def chunked_gather_hook(state: ConsistencyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Gram by chunked all-gather, then the all-reduce path's ``‖g_i‖²`` / ``g_i·ḡ`` (the old hook).
    Guarantee: the future's value is the bucket averaged over ranks."""
    buf = bucket.buffer()
    acc = state.acc
    if acc is not None and acc.gram is not None:
        for chunk in buf.reshape(-1).split(GATHER_CHUNK):
            out = torch.empty(state.world_size * chunk.numel(), dtype=chunk.dtype, device=chunk.device)
            _all_gather_flat(out, chunk, group=state.process_group)
            acc.add_gram(out.view(state.world_size, -1))
    fut = dist.all_reduce(buf, group=state.process_group, async_op=True).get_future()

    def finish(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        mean = f.value()[0].div_(state.world_size)
        if acc is not None:
            acc.add_pairs([p.grad for p in bucket.parameters()], bucket.gradients())
        return mean

    return fut.then(finish)


def install(ddp_model: torch.nn.parallel.DistributedDataParallel) -> ConsistencyState:
    """Register the legacy hook; its state is armed like testbed's (``begin_step``)."""
    state = ConsistencyState(None, dist.get_world_size())
    ddp_model.register_comm_hook(state, chunked_gather_hook)
    return state


def pairwise_row(acc: BucketAccumulator, loss: torch.Tensor, world_size: int) -> dict[str, Any]:
    """What the old row gather did: 3 scalars per rank (all-gathered) plus the local full Gram."""
    local = torch.stack([loss.detach().double(), acc.sq_norm, acc.dot_with_mean])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    assert acc.gram is not None
    table = torch.stack(gathered).numpy()
    row = step_metrics(table[:, 0], table[:, 1], table[:, 2])
    matrix = pairwise_cosine(np.asarray(acc.gram))
    return {**row, "pairwise_cos": matrix, "pairwise_cos_mean": mean_offdiagonal(matrix)}
