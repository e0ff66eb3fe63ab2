"""FSDP2 (``fully_shard``): the per-layer wrapping and the reduce-scatter that measures local gradients.

Under FSDP2 a rank's *local* gradient is visible at one public point only: the reduce-scatter
comm of each FSDP unit (``FSDPModule.set_custom_reduce_scatter``, torch ≥ 2.9). FSDP hands it
the unit's unsharded local gradients, flattened, each padded on dim 0 to a multiple of N and laid
out chunk-cat (``input.view(N, -1)[k]`` is what rank k keeps); the padding is zero-filled by
FSDP's ``chunk_cat`` copy-in. ``ConsistencyReduceScatter`` performs that reduce-scatter as an
all-to-all plus a local sum — the same bytes — and on the way adds this rank's share of the Gram
matrix (``BucketAccumulator.add_slices``): after the backward pass, one all-gather of N² scalars
per rank (``engine.gather``) gives every rank the exact ``G``, hence every ``‖g_i‖``,
``cos(g_i, ḡ)`` and the pairwise matrix. Norms and dots do not depend on the layout, and zero
padding adds nothing to them.

What FSDP calls the comm with (torch 2.13, ``_fsdp_collectives.foreach_reduce``): the reduce
dtype (the gradient's, or ``MixedPrecisionPolicy.reduce_dtype``) and ``op`` = AVG (fp32 / bf16),
SUM (with ``set_force_sum_reduction_for_comms``; FSDP then divides the output itself) or
PREMUL_SUM (a custom ``set_gradient_divide_factor``). For reduce dtypes other than fp32 / bf16
FSDP pre-divides the input by a factor it does not pass on, so the local gradient is not
recoverable: those dtypes and PREMUL_SUM are refused with a clear error rather than measured
wrongly. FSDP skips the comm at world size 1 (nothing to measure there).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # the documented comm protocol
from torch.distributed.tensor import DTensor

from testbed.engine.hook import ConsistencyState

_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
MEASURED_DTYPES = (torch.float32, torch.bfloat16)


class ConsistencyReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter as all-to-all + local sum + this rank's share of the Gram matrix.

    ``state`` is the same ``ConsistencyState`` the DDP hook uses (armed by ``begin_step``; its
    ``always_slices`` is set). Guarantee: ``output_tensor`` receives what the default comm would
    write (the sum of every rank's slice k, divided by N for AVG), rounded once to the reduce
    dtype; on measured steps ``state.acc.gram`` gains ``Σ_{k in this rank's slice} g_i[k]·g_j[k]``.
    Unmeasured steps call the default ``reduce_scatter``. The measured path runs synchronously
    (FSDP2 does not ask for ``async_op``); it needs one receive buffer the size of the input.
    """

    def __init__(self, state: ConsistencyState):
        self.state = state

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> dist.Work | None:
        state = self.state
        for transform in state.grad_transforms:  # perturbations act on the local gradient, as in DDP
            transform(input_tensor, state.generator or torch.Generator())
        acc = state.acc
        if acc is None:
            return _reduce_scatter_flat(output_tensor, input_tensor, group=group, op=op, async_op=async_op)
        n = group.size()
        if n != state.world_size:
            raise ValueError(f"testbed measures FSDP2 over one data-parallel group of {state.world_size} ranks; this "
                             f"unit reduce-scatters over {n} (HSDP / a 2-D mesh is not supported)")
        if input_tensor.dtype not in MEASURED_DTYPES:
            raise ValueError(f"testbed measures FSDP2 gradients reduced in fp32 or bf16; this unit reduces in "
                             f"{input_tensor.dtype}, which FSDP pre-divides by a factor the comm cannot see "
                             "(set MixedPrecisionPolicy(reduce_dtype=torch.float32))")
        if op not in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            raise ValueError(f"testbed's FSDP2 reduce-scatter supports ReduceOp AVG and SUM, got {op} (a custom "
                             "set_gradient_divide_factor: also call set_force_sum_reduction_for_comms(True))")
        if state.keep_local:
            state.local_buckets.append(input_tensor.detach().clone())
        rows = torch.empty_like(input_tensor).view(n, -1)
        dist.all_to_all_single(rows, input_tensor, group=group)
        acc.add_slices(rows, output_tensor, divide=n if op == dist.ReduceOp.AVG else 1)
        return None


def layer_units(module: nn.Module) -> list[nn.Module]:
    """The modules that get their own ``fully_shard`` before the root: the blocks of the longest
    ``nn.ModuleList`` (a transformer's layers: ``transformer``, HF decoders), else every
    ``nn.Linear`` (the ``mlp``). One unit per layer lets each layer's reduce-scatter overlap the
    backward of the layers before it, and frees its gathered weights after its forward."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        return list(max(lists, key=len))
    return [m for m in module.modules() if isinstance(m, nn.Linear) and m is not module]


def shard(module: nn.Module, *, reshard_after_forward: bool = True) -> FSDPModule:
    """``fully_shard`` each layer unit (``layer_units``), then the root (tied weights such as a
    shared embedding / output head stay in the root unit)."""
    for unit in layer_units(module):
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    return fully_shard(module)


def install(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> ConsistencyState:
    """Set ``ConsistencyReduceScatter`` on every FSDP unit of ``model`` (it is set per module) and
    return the shared state; call before the first backward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise TypeError(f"{type(model).__name__} has no FSDP2 unit: apply torch.distributed.fsdp.fully_shard first")
    world_size = dist.get_world_size(process_group)
    if world_size < 2:
        raise ValueError("FSDP2 skips the reduce-scatter at world size 1: there is no local gradient to measure")
    state = ConsistencyState(process_group, world_size, always_slices=True)
    comm = ConsistencyReduceScatter(state)
    for unit in units:
        unit.set_custom_reduce_scatter(comm)
    return state


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_shards(params: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each parameter (a DTensor's local shard; plain tensors as they are)."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of every state tensor (a collective: every rank must call it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}
