"""The state check's per-rank values, and its second, per-tensor round.

On a state-check step every rank contributes to the step's one all-gather the exact checksum of
its **parameters** (trainable and frozen, taken after the optimizer step) and of its **buffers**
(taken where DDP has just synchronised them), and the number of tensors of each. When the totals
differ (every rank sees the same gathered totals, so every rank decides alike) one more
all-gather of the per-tensor checksums names the first differing tensor and the ranks off the
plurality (``metrics/state.py``).

The buffers trap: with DDP's default ``broadcast_buffers=True`` the buffers differ after every
training forward (each rank updated its BatchNorm statistics with its own batch) until the next
forward broadcasts rank 0's. DDP does that inside ``DDP.forward`` before calling the inner
module, so a forward pre-hook on the *inner* module (``ddp.module``) sees synchronised buffers on
a healthy job - and each rank's own ones when ``broadcast_buffers=False``. A pre-hook on the DDP
wrapper notes whether this forward synchronises (``DDP._check_sync_bufs_pre_fwd``: a forward
after one under ``no_sync`` or ``torch.no_grad`` does not); the capture is taken at the step's
first training forward that does, or at its first training forward at all when DDP never
synchronises buffers. A step without such a forward reports no buffer checksum (sentinel), and the
row then has no buffer fields. ``Monitor.close``'s final check covers parameters only (after the
last forward the buffers are each rank's own until the next forward).

FSDP2: the parameters are sharded (each rank checksums its shards; there are no replicas to
compare, ``metrics/state.py``) and FSDP2 does not synchronise buffers (each rank's are its own by
design): the check compares nothing there, and says so in docs/monitor.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine import fsdp
from testbed.engine.gather import all_gather_fields
from testbed.metrics.row import BUFFERS, CHECKSUM, SIZES
from testbed.metrics.state import NO_CHECKSUM as NONE
from testbed.metrics.state import first_difference, tensor_checksums


class StateCheck:
    """One model's state check (module doc). ``arm(check)`` before the step's forwards,
    ``fields(with_buffers)`` after the optimizer step, ``second_round(gathered)`` after the gather."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, world_size: int,
                 group: dist.ProcessGroup | None):
        self.device, self.world_size, self.group = device, world_size, group
        self.sharded = fsdp.is_sharded(model)
        self.ddp = model if isinstance(model, DDP) else None
        inner = model.module if self.ddp is not None else model
        named = list(inner.named_parameters())
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        buffers = list(inner.named_buffers()) if self.ddp is not None else []
        self.buffer_names = [n for n, _ in buffers]
        self.buffers = [b for _, b in buffers]
        self.armed = False
        self.captured: torch.Tensor | None = None  # per-buffer checksums at the synchronised forward
        self._syncs = False  # whether the forward now running had DDP synchronise the buffers
        self._local: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        if self.buffers and self.ddp is not None:
            self._hooks = [self.ddp.register_forward_pre_hook(self._outer),
                           inner.register_forward_pre_hook(self._inner)]

    # ---- the capture of the buffers ---------------------------------------------------------
    def arm(self, check: bool) -> None:
        self.armed, self.captured = check, None

    def _outer(self, module: torch.nn.Module, args: Any) -> None:
        ddp = self.ddp
        if ddp is None or not getattr(ddp, "broadcast_buffers", True):
            self._syncs = True  # never synchronised: any forward shows each rank's own buffers
            return
        check = getattr(ddp, "_check_sync_bufs_pre_fwd", None) or getattr(ddp, "will_sync_module_buffers", None)
        try:
            self._syncs = bool(check()) if check is not None else True
        except Exception:  # noqa: BLE001 - a DDP without these internals: assume it synchronises
            self._syncs = True

    def _inner(self, module: torch.nn.Module, args: Any) -> None:
        if self.armed and self.captured is None and self._syncs and module.training and torch.is_grad_enabled():
            self.captured = tensor_checksums(self.buffers, self.device)

    # ---- the step's values -------------------------------------------------------------------
    def fields(self, with_buffers: bool = True) -> dict[str, torch.Tensor]:
        """This rank's checksums for the step's all-gather (keys CHECKSUM, BUFFERS, SIZES)."""
        params = fsdp.local_shards(self.params) if self.sharded else self.params
        self._local = {"parameter": tensor_checksums(params, self.device)}
        out = {CHECKSUM: self._local["parameter"].sum()}
        if self.buffers and not self.sharded and with_buffers:
            if self.captured is not None:
                self._local["buffer"] = self.captured
                out[BUFFERS] = self.captured.sum()
            else:
                out[BUFFERS] = torch.tensor(NONE, dtype=torch.int64, device=self.device)
        sizes = (len(self.params) << 24) | len(self.buffers)
        out[SIZES] = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        self.captured = None
        return out

    def second_round(self, gathered: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """When the gathered totals differ: the per-tensor round (every rank calls it alike) and
        the first differing tensor of each kind; [] when nothing differs."""
        if self.sharded or self.world_size < 2:
            return []
        kinds = [k for k, key in (("parameter", CHECKSUM), ("buffer", BUFFERS)) if key in gathered
                 and NONE not in gathered[key].tolist() and len(set(gathered[key].tolist())) > 1]
        if not kinds:
            return []
        if SIZES in gathered and len(set(gathered[SIZES].tolist())) > 1:
            return [{"kind": "parameter", "tensor": None, "frozen": False, "ranks": [], "differing": None,
                     "note": "the ranks hold different numbers of tensors"}]
        fields = {k: self._local[k] for k in kinds if k in self._local}
        if len(fields) != len(kinds):
            return []
        table = all_gather_fields(fields, None, world_size=self.world_size, device=self.device, group=self.group)
        out = []
        for kind in kinds:
            names = self.param_names if kind == "parameter" else self.buffer_names
            frozen = [not p.requires_grad for p in self.params] if kind == "parameter" else []
            found = first_difference(table.fields[kind], names, kind, frozen)
            if found is not None:
                out.append(found)
        return out

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
