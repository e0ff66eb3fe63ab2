"""Optimizers by name; their keyword parameters are the ``[optim]`` table's fields."""
from __future__ import annotations

from typing import Annotated, Any, Iterable, Mapping

import torch

from testbed.scenario.bounds import Bounds
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
