"""The step's one all-gather: every rank's named scalars (and Gram share) to every rank.

The comm hook leaves each rank holding its loss, ‖g_i‖² and g_i·ḡ; the step path adds its learning
rate and, on state-check steps, its exact parameter checksum. One all-gather of those scalars
(``all_gather_fields``) gives every rank the same table, and ``metrics.row.build_row`` derives the
row from it. Buckets that took the all-to-all path (pairwise steps, bf16 buckets, FSDP2) leave each
rank a share of the Gram matrix instead; the same all-gather then carries the N² shares too, and
their sum is the exact ``G``. A new per-rank value is one more entry in ``fields``: the payload
grows by 8 bytes per rank (per element, for a fixed-length vector such as the data ledger's), still
one collective per step.

Integer fields (int64: checksums, fingerprints) travel bit for bit inside the float64 payload
(reinterpreted, never converted), so they stay exact beyond 2**53.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Gathered:
    """``fields``: name → one value per rank (float64, or int64 for integer fields); ``gram``: the
    summed N×N Gram shares, or None when no bucket took the all-to-all path."""

    fields: dict[str, np.ndarray]
    gram: np.ndarray | None


def all_gather_fields(fields: Mapping[str, torch.Tensor], gram: torch.Tensor | None, *, world_size: int,
                      device: torch.device, group: dist.ProcessGroup | None = None) -> Gathered:
    """One all-gather of each rank's ``fields`` (0-d, or 1-d of a length every rank shares: float or
    int64) and its Gram share ``gram`` ([N, N] float64, or None: the same on every rank, since every
    rank took the same path). A 0-d field comes back as one value per rank, a 1-d field of length
    k as an ``[N, k]`` table.

    Every rank must pass the same field names, shapes and dtypes in the same order (the step path
    builds them from the step's cadence, which the monitor's check-in confirms is the same on
    every rank)."""
    names = list(fields)
    parts = [_as_payload(fields[name], device) for name in names]
    widths = [p.numel() for p in parts]
    if gram is not None:
        parts.append(gram.to(device=device, dtype=torch.float64).reshape(-1))
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().numpy()
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, width in zip(names, widths):
        block = np.ascontiguousarray(table[:, start:start + width])
        if fields[name].dtype == torch.int64:
            block = block.view(np.int64)
        out[name] = block[:, 0] if fields[name].dim() == 0 else block
        start += width
    shares = table[:, start:] if gram is not None else None
    summed = shares.sum(axis=0).reshape(world_size, world_size) if shares is not None else None
    return Gathered(out, summed)


def _as_payload(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A flat float64 tensor: floats converted, int64 reinterpreted bit for bit."""
    value = value.detach().reshape(-1).to(device)
    if value.dtype == torch.int64:
        return value.view(torch.float64)
    return value.to(torch.float64)
