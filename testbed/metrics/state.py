"""The exact state check: integers per rank that differ when any bit of its state differs.

``tensor_checksums`` sums each tensor's bit patterns as integers (int64, wrapping): a 1-ulp
difference shows where a float sum could round it away (barring an exactly cancelling pair).
``parameter_checksum`` is their total over the parameters - trainable and frozen -, the row's
``weight_checksum``; the buffers have their own total (``buffer_checksum``). When totals differ the
step path gathers the per-tensor checksums once more and ``first_difference`` names the first
tensor (in the module's order) that differs, and the ranks off the plurality (``state_fields``
and ``state_difference`` build the row's fields).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from testbed.schema import row as R
from testbed.schema.row import Row

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
NO_CHECKSUM = -(1 << 63)  # a rank that has no buffer checksum this step (no synchronised training forward)


def tensor_checksums(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Per tensor, the exact int64 sum of its bit patterns: a ``[T]`` int64 tensor (no host sync)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64, device=device)
    target = device if device is not None else tensors[0].device
    sums = [t.detach().reshape(-1).view(_INT_VIEW[t.element_size()]).sum(dtype=torch.int64).to(target)
            for t in tensors]
    return torch.stack(sums)


def parameter_checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact int64 checksum of the tensors' bit patterns (a 0-d tensor on their device)."""
    if not params:
        return torch.zeros((), dtype=torch.int64)
    return tensor_checksums(params).sum()


def state_fields(checksums: Sequence[int], sharded: bool = False) -> Row:
    """``weight_checksum`` and ``weights_in_sync`` from every rank's checksum.

    ``sharded`` (FSDP2: each rank summed its own shards): there are no replicas to compare, so
    every rank records the whole model's checksum - the int64 sum of the shard checksums, the same
    integer DDP records for the same weights - and ``weights_in_sync`` is true by construction."""
    values = [int(x) for x in checksums]
    if sharded:
        total = int(np.asarray(values, dtype=np.int64).sum())  # int64: wraps exactly like the unsharded sum
        return {R.WEIGHT_CHECKSUM: [total] * len(values), R.WEIGHTS_IN_SYNC: True}  # type: ignore[misc]
    return {R.WEIGHT_CHECKSUM: values, R.WEIGHTS_IN_SYNC: len(set(values)) == 1}  # type: ignore[misc]


def buffer_fields(checksums: Sequence[int]) -> Row:
    """``buffer_checksum`` and ``buffers_in_sync``."""
    values = [int(x) for x in checksums]
    return {R.BUFFER_CHECKSUM: values, R.BUFFERS_IN_SYNC: len(set(values)) == 1}  # type: ignore[misc]


def plurality_outliers(values: Sequence[Any]) -> list[int]:
    """Ranks off the plurality value when it holds >= 2 ranks and beats every other value; [] when
    none does (two ranks, every rank different: not attributable)."""
    ranked = Counter(values).most_common()
    if len(ranked) < 2 or ranked[0][1] < 2 or ranked[0][1] == ranked[1][1]:
        return []
    return [r for r, v in enumerate(values) if v != ranked[0][0]]


def first_difference(table: np.ndarray, names: Sequence[str], kind: str,
                     frozen: Sequence[bool] = ()) -> dict[str, Any] | None:
    """``table``: ``[N, T]`` per-tensor checksums of every rank. The first tensor (column) whose
    ranks disagree: ``{"kind", "tensor", "frozen", "ranks" (off the plurality), "differing"}``."""
    table = np.asarray(table, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] == 0:
        return None
    differs = [j for j in range(table.shape[1]) if len(set(table[:, j].tolist())) > 1]
    if not differs:
        return None
    j = differs[0]
    return {"kind": kind, "tensor": names[j] if j < len(names) else f"#{j}",
            "frozen": bool(frozen[j]) if j < len(frozen) else False,
            "ranks": plurality_outliers(table[:, j].tolist()), "differing": len(differs)}
