"""Optimizers by name; their keyword parameters are the ``[optim]`` table's fields. The lr schedule
(``[optim] schedule``, validated in ``testbed.scenario.schedule``) is transformers' own."""
from __future__ import annotations

from typing import Annotated, Any, Iterable, Mapping

import torch

from testbed.scenario.bounds import Bounds
from testbed.scenario.schedule import ScheduleSpec
from testbed.scenario.tables import OPTIMIZERS

# Refused before launch (the file and the field named), not by torch inside a rank.
Positive = Annotated[float, Bounds(gt=0)]
NonNegative = Annotated[float, Bounds(ge=0)]
Beta = Annotated[float, Bounds(ge=0, lt=1)]


def _nesterov_needs_momentum(p: Mapping[str, Any]) -> tuple[str, str] | None:
    return ("momentum", "a number > 0 when nesterov = true") if p["nesterov"] and p["momentum"] <= 0 else None


@OPTIMIZERS.register("sgd", check=_nesterov_needs_momentum)
def sgd(parameters: Iterable[torch.nn.Parameter], *, lr: Positive, momentum: NonNegative = 0.0,
        weight_decay: NonNegative = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register("adamw")
def adamw(parameters: Iterable[torch.nn.Parameter], *, lr: Positive, beta1: Beta = 0.9, beta2: Beta = 0.999,
          eps: Positive = 1e-8, weight_decay: NonNegative = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


SCHEDULE_NEEDS_TRANSFORMERS = ("[optim] schedule / warmup use transformers' schedulers, and transformers is not "
                               "installed: pip install -e '.[hf]', or schedule = 'constant' without warmup")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSpec,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """transformers' scheduler for ``[optim] schedule`` (``get_scheduler``: the lr a ``Trainer``
    with the same arguments uses), or None for a constant lr without warmup (no transformers needed).
    Call its ``step()`` once after every ``optimizer.step()``."""
    if schedule.is_constant:
        return None
    try:
        from transformers import get_scheduler
    except ImportError:
        raise ImportError(SCHEDULE_NEEDS_TRANSFORMERS) from None
    warmup = schedule.warmup(total_steps)
    name = "constant_with_warmup" if schedule.name == "constant" else schedule.name
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
