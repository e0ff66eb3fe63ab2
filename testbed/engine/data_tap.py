"""What each rank's model consumes: a forward pre-hook that fingerprints the training inputs.

``DataTap`` hooks the wrapped model (the DDP wrapper, or the FSDP2 root) - so the user's loop does
not change - and, on every *training* forward (``module.training`` and gradients enabled: eval
passes and ``torch.no_grad`` probes are left out), fingerprints each sample of the inputs on their
device (``metrics/fingerprint.py``). Gradient accumulation's several forwards per optimizer step
add up to one step's samples. ``payload`` hands the step's fingerprints to the ledger's fixed-size
vector (``metrics/ledger.py``) for the step's one all-gather, and starts the next step.

The hook never breaks a training step: an input it cannot read (a custom object holding the
tensors out of reach) simply contributes nothing, and any error switches the tap off with one
warning (the record then has no data fields from that point on, on that rank: the other ranks'
fields still come, the verdict reads what it has).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from testbed.metrics.fingerprint import Fingerprinter
from testbed.metrics.ledger import DataLedger, payload


class DataTap:
    """The pre-hook and the ledger of one model (module doc). ``samples`` = the ledger's K."""

    def __init__(self, model: torch.nn.Module, *, world_size: int, device: torch.device, samples: int):
        self.device = device
        self.ledger = DataLedger(world_size, samples)
        self.fingerprinter = Fingerprinter()
        self.parts: list[torch.Tensor] = []
        self.failed: str | None = None
        self._handle: Any = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    @property
    def width(self) -> int:
        return self.ledger.width

    def _pre(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if self.failed is not None or not module.training or not torch.is_grad_enabled():
            return
        try:
            found = self.fingerprinter.fingerprints(args, kwargs)
        except Exception as e:  # noqa: BLE001 - never break the user's forward
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"testbed: the data ledger cannot fingerprint this model's inputs ({self.failed}); "
                          "the data checks are off on this rank", stacklevel=2)
            return
        if found is not None:
            self.parts.append(found.to(self.device, non_blocking=True))

    def payload(self) -> torch.Tensor:
        """The step's fixed-size vector (every rank the same length), and a fresh step."""
        parts, self.parts = self.parts, []
        fingerprints = torch.cat(parts) if parts else None
        return payload(fingerprints, self.ledger.level, self.ledger.samples, self.device)

    def clear(self) -> None:
        self.parts = []

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
