"""Optimizers by name; their keyword parameters are the ``[optim]`` table's fields."""
from __future__ import annotations

from typing import Iterable

import torch

from testbed.scenario.tables import OPTIMIZERS


@OPTIMIZERS.register("sgd")
def sgd(parameters: Iterable[torch.nn.Parameter], *, lr: float, momentum: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register("adamw")
def adamw(parameters: Iterable[torch.nn.Parameter], *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
