"""Model builders. Every model's ``forward(**batch)`` returns the batch's mean loss, so the
worker loop is the same for every kind (no per-model training loops)."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

from testbed.scenario.bounds import Bounds

from testbed.workloads.data import Dataset
from testbed.scenario.tables import MODELS


class MLPClassifier(nn.Module):
    """A plain MLP with optional dropout and BatchNorm; cross-entropy loss on ``inputs`` / ``targets``.
    ``frozen``: the first ``frozen`` hidden layers do not train (a frozen pretrained stem)."""

    def __init__(self, features: int, classes: int, hidden: int, depth: int, dropout: float,
                 dtype: torch.dtype = torch.float32, norm: str = "none", frozen: int = 0):
        super().__init__()
        self.dtype = dtype
        layers: list[nn.Module] = []
        width = features
        for i in range(depth):
            block: list[nn.Module] = [nn.Linear(width, hidden)]
            if norm == "batch":
                block.append(nn.BatchNorm1d(hidden))
            block.append(nn.GELU())
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            if i < frozen:
                for module in block:
                    module.requires_grad_(False)
            layers += block
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers).to(dtype)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(inputs.to(self.dtype)).float(), targets)


@MODELS.register("mlp")
def mlp(dataset: Dataset, *, hidden: Annotated[int, Bounds(ge=1)] = 64, depth: Annotated[int, Bounds(ge=0)] = 2,
        dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.0, dtype: Literal["fp32", "bf16"] = "fp32",
        norm: Literal["none", "batch"] = "none", frozen: Annotated[int, Bounds(ge=0)] = 0) -> nn.Module:
    """MLP over a classification dataset (needs ``info['features']`` and ``info['classes']``).
    ``dtype = "bf16"``: weights and gradients in bf16 (the loss in fp32), for bf16-gradient runs.
    ``norm = "batch"``: BatchNorm1d after each hidden Linear (running statistics: buffers).
    ``frozen = k``: the first k hidden layers are frozen (``requires_grad`` False) before wrapping."""
    if hidden < 1 or depth < 0 or not 0.0 <= dropout < 1.0 or not 0 <= frozen <= depth:
        raise ValueError("mlp needs hidden >= 1, depth >= 0, 0 <= dropout < 1 and 0 <= frozen <= depth")
    return MLPClassifier(dataset.info["features"], dataset.info["classes"], hidden, depth, dropout,
                         torch.bfloat16 if dtype == "bf16" else torch.float32, norm, frozen)


def _mlp_parameters(params: dict, data: dict) -> int:
    """Parameters of ``mlp`` with these settings over ``data`` (its features and classes)."""
    features, classes = int(data.get("features", 32)), int(data.get("classes", 8))
    hidden, depth = int(params.get("hidden", 64)), int(params.get("depth", 2))
    widths = [features] + [hidden] * depth + [classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


mlp.batch_keys = ("inputs", "targets")  # type: ignore[attr-defined]  # what forward() reads (scenario/compat.py)
mlp.parameter_count = _mlp_parameters  # type: ignore[attr-defined]  # sizes checked before launch (engine/memory.py)
mlp.size_field = "hidden"  # type: ignore[attr-defined]
