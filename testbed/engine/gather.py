"""One step's row from every rank: the single small all-gather shared by the worker and the monitor.

The comm hook leaves each rank holding three scalars (its loss, ‖g_i‖², g_i·ḡ); one all-gather of
those builds the row every rank agrees on (``metrics.step`` does the math). Buckets that took the
all-to-all path (pairwise steps, bf16 buckets, FSDP2) leave each rank a share of the Gram matrix
instead; the same one all-gather then carries 3 + N² scalars per rank, and the sum of the shares
is the exact ``G``. The weight check is a second all-gather of one exact integer per rank. The
runner's worker and the drop-in monitor call the same functions, so a row means the same thing
whoever recorded it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from testbed.metrics.step import (BucketAccumulator, NoiseScaleEMA, gram_scalars, mean_offdiagonal,
                                  noise_scale_terms, pairwise_cosine, step_metrics)

Row = dict[str, Any]


def weight_checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact integer checksum of the parameters' bit patterns: any differing bit shows (barring
    an exactly cancelling pair), unlike float sums that can round a 1-ulp difference away."""
    total = torch.zeros((), dtype=torch.int64, device=params[0].device)
    int_view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    for p in params:
        total += p.detach().reshape(-1).view(int_view[p.element_size()]).sum(dtype=torch.int64)
    return total


def weight_sync(params: Sequence[torch.Tensor], world_size: int, group: dist.ProcessGroup | None = None,
                sharded: bool = False) -> Row:
    """Every rank's exact parameter checksum and whether they agree (one small all-gather).

    ``sharded`` (FSDP2: ``params`` are this rank's local shards): there are no replicas to
    compare, so every rank records the whole model's checksum — the int64 sum of the shard
    checksums, the same integer DDP records for the same weights — and ``weights_in_sync`` is
    true by construction (docs/metrics.md)."""
    checksum = weight_checksum(params)
    sums = [torch.empty_like(checksum) for _ in range(world_size)]
    dist.all_gather(sums, checksum, group=group)
    if sharded:
        total = int(torch.stack(sums).sum())  # int64: wraps exactly like the unsharded sum
        return {"weight_checksum": [total] * world_size, "weights_in_sync": True}
    values = [int(x) for x in sums]
    return {"weight_checksum": values, "weights_in_sync": len(set(values)) == 1}


def gather_row(acc: BucketAccumulator | None, loss: torch.Tensor | float, *, step: int, measure: bool,
               device: torch.device, world_size: int, batch_size: int | None, noise: NoiseScaleEMA,
               group: dist.ProcessGroup | None = None, pairwise: bool = False) -> Row:
    """All-gather (loss, ‖g_i‖², g_i·ḡ [, share of G]) from every rank and derive the step's metrics.

    ``batch_size`` (samples per rank per optimizer step) enables the gradient-noise scale.
    ``pairwise``: every bucket of this step took the all-to-all path, so the summed shares are the
    whole Gram matrix: the pairwise cosine matrix is added to the row.
    """
    zero = torch.zeros((), dtype=torch.float64, device=device)
    value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    local_loss = value.to(device=device, dtype=torch.float64).reshape(())
    local = torch.stack([local_loss, acc.sq_norm if acc else zero, acc.dot_with_mean if acc else zero])
    has_gram = acc is not None and acc.gram is not None  # the same on every rank (same buckets, same step)
    if has_gram:
        local = torch.cat([local, acc.gram.reshape(-1)])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().numpy()
    sq_norms, dots = table[:, 1], table[:, 2]
    gram = table[:, 3:].sum(axis=0).reshape(world_size, world_size) if has_gram else None
    if gram is not None:  # buckets of the all-to-all path: their part of ‖g_i‖² and g_i·ḡ from G
        gram_sq, gram_dots = gram_scalars(gram)
        sq_norms, dots = sq_norms + gram_sq, dots + gram_dots
    row: Row = {"step": step}
    if measure and acc is not None:
        row.update(step_metrics(table[:, 0], sq_norms, dots))
        mean_norm = row["mean_grad_norm"]
        terms = noise_scale_terms(sq_norms, mean_norm**2, batch_size) if batch_size and mean_norm is not None else None
        row["noise_scale"] = noise.update(terms) if batch_size else None
        if batch_size and row["noise_scale"] is None:  # EMA |G|² <= 0, or no estimate yet (docs/metrics.md)
            row["flags"].append({"rank": None, "kind": "noise_scale_undefined"})
    if pairwise and gram is not None:
        matrix = pairwise_cosine(gram)
        row["pairwise_cos"] = matrix
        row["pairwise_cos_mean"] = mean_offdiagonal(matrix)
    return row
