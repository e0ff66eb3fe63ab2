"""The loss a ``transformers`` model returned under the ``Trainer``, turned back into the model's own loss.

When the Trainer passes ``num_items_in_batch`` (it does for every model whose forward takes
``**kwargs``), a model *may* return ``sum / num_items_in_batch`` instead of its usual mean over the
micro-batch - causal and masked LMs do, a ``BertForSequenceClassification`` ignores it and returns
its mean. Guessing from the class name would be silently wrong for the next model, so
:class:`LossReader` asks the model once: it re-runs the first micro-batch in eval mode without
gradients with ``num_items_in_batch`` doubled (a loss that halves uses it) and, when the label
counts with and without the causal shift differ, without ``num_items_in_batch`` (the ratio is the
count the model divides by). Two or three no-grad forwards per run; dropout is off in eval mode, so
the comparison is exact up to float round-off.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

IGNORE_INDEX = -100
RTOL = 1e-3  # float32 round-off of a loss is ~1e-7; a real difference is a factor of 2 or a count ratio


class LossReader:
    """Per micro-batch: the model's own loss (its mean over the micro-batch's targets)."""

    def __init__(self) -> None:
        self.uses_num_items: bool | None = None  # None: not known yet
        self.layout: str | None = None  # "shifted" (labels[..., 1:], causal LMs) | "unshifted" | "other"

    def __call__(self, module: torch.nn.Module, kwargs: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        num_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if num_items is None:
            return loss
        if self.uses_num_items is None:
            self.uses_num_items = self._probe_uses(module, kwargs, num_items)
        if not self.uses_num_items:
            return loss
        if not isinstance(labels, torch.Tensor):
            return self._unknown(loss, "the Trainer passed no `labels` tensor to count")
        shifted = (labels[..., 1:] != IGNORE_INDEX).sum()
        unshifted = (labels != IGNORE_INDEX).sum()
        if int(shifted) == int(unshifted):
            count = shifted  # the two layouts agree on this micro-batch
        else:
            if self.layout is None:
                self.layout = self._probe_layout(module, kwargs, num_items, int(shifted), int(unshifted))
            if self.layout is None:
                return loss  # zero or non-finite: the same under any normalisation; ask again next time
            if self.layout == "other":
                return self._unknown(loss, "it divides by neither label count")
            count = shifted if self.layout == "shifted" else unshifted
        n = torch.as_tensor(num_items, device=loss.device).to(loss.dtype).reshape(-1)[0]
        return loss * n / count.to(loss.device).clamp(min=1)

    def _probe_uses(self, module: torch.nn.Module, kwargs: dict[str, Any], num_items: Any) -> bool | None:
        once, twice = _probe(module, kwargs, num_items), _probe(module, kwargs, num_items * 2)
        if not (_usable(once) and _usable(twice)):
            return None  # ask again at the next micro-batch
        return not math.isclose(once, twice, rel_tol=RTOL)

    def _probe_layout(self, module: torch.nn.Module, kwargs: dict[str, Any], num_items: Any, shifted: int,
                      unshifted: int) -> str | None:
        scaled, own = _probe(module, kwargs, num_items), _probe(module, kwargs, None)
        if not (_usable(scaled) and _usable(own)):
            return None
        count = float(torch.as_tensor(num_items).float().reshape(-1)[0]) * scaled / own
        if math.isclose(count, shifted, rel_tol=RTOL):
            return "shifted"
        if math.isclose(count, unshifted, rel_tol=RTOL):
            return "unshifted"
        return "other"

    def _unknown(self, loss: torch.Tensor, why: str) -> torch.Tensor:
        warnings.warn(f"TestbedCallback: the model's loss depends on num_items_in_batch but {why}; the "
                      "recorded loss is the model's output as the Trainer normalised it", stacklevel=4)
        self.uses_num_items = False  # warn once; record the output as it is from now on
        return loss


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value != 0.0


def _probe(module: torch.nn.Module, kwargs: dict[str, Any], num_items: Any) -> float | None:
    """The model's loss on the same inputs, eval mode, no grad (training flags restored after)."""
    inputs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
    if num_items is not None:
        inputs["num_items_in_batch"] = num_items
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            output = module(**inputs)
    finally:
        for m, training in modes:
            m.training = training
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return float(loss) if isinstance(loss, torch.Tensor) else None
