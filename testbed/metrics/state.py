"""The exact state check: one integer per rank that differs when any bit of its parameters differs.

``parameter_checksum`` sums the parameters' bit patterns as integers (int64, wrapping), so a
1-ulp difference shows where a float sum could round it away (barring an exactly cancelling
pair). ``state_fields`` turns every rank's checksum into the row's ``weight_checksum`` /
``weights_in_sync``. Issue 22's per-tensor state checks extend this module.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from testbed.schema import row as R
from testbed.schema.row import Row

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def parameter_checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact int64 checksum of the tensors' bit patterns (a 0-d tensor on their device)."""
    if not params:
        return torch.zeros((), dtype=torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=params[0].device)
    for p in params:
        total += p.detach().reshape(-1).view(_INT_VIEW[p.element_size()]).sum(dtype=torch.int64)
    return total


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
