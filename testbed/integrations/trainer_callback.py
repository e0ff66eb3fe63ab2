"""``TestbedCallback``: the drop-in monitor for a Hugging Face ``Trainer`` run under torchrun.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(TestbedCallback(trainer, out_dir="runs/mine"))
    trainer.train()          # rank 0 writes runs/mine/metrics.jsonl; every rank keeps .rows

At ``on_train_begin`` (after the Trainer has wrapped the model in DDP, before the first
backward) it attaches :func:`testbed.monitor.attach` to ``trainer.model_wrapped``; it arms the
hook at ``on_step_begin`` and closes the step at ``on_step_end``. Not distributed (one process,
or a wrapper other than DDP such as FSDP / DeepSpeed): it warns and records nothing.

The per-rank loss is read from the model's own output on every training forward (a forward hook
on ``trainer.model``) and is the mean over the step's micro-batches of each micro-batch's token
mean - the testbed's definition (docs/metrics.md). When the Trainer passes ``num_items_in_batch``
the model returns ``sum / num_items_in_batch`` instead; the hook converts it back with the
micro-batch's own count of label tokens (labels shifted by one, as transformers' causal-LM loss
does). The gradients are the Trainer's: see docs/monitor.md for when they differ in scale from
the built-in runner's (``average_tokens_across_devices``, gradient accumulation with
token-count normalisation).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import TrainerCallback

from testbed.integrations.monitor import Monitor, Row, attach

IGNORE_INDEX = -100


class TestbedCallback(TrainerCallback):
    """Per-step consistency metrics of a ``Trainer`` run (see the module docstring)."""

    def __init__(self, trainer: Any, *, out_dir: str | Path | None = None, every: int = 1, pairwise_every: int = 0,
                 weight_check_every: int = 0):
        self.trainer = trainer
        self.out_dir, self.every = out_dir, every
        self.pairwise_every, self.weight_check_every = pairwise_every, weight_check_every
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self._losses: list[torch.Tensor] = []
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ddp = self.trainer.model_wrapped
        if not isinstance(ddp, DDP):
            warnings.warn(f"TestbedCallback: the model is wrapped in {type(ddp).__name__}, not DDP "
                          "(single process, FSDP or DeepSpeed); no consistency metrics are recorded", stacklevel=2)
            return
        self.monitor = attach(ddp, out_dir=self.out_dir, every=self.every, pairwise_every=self.pairwise_every,
                              weight_check_every=self.weight_check_every,
                              batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps)
        self.monitor.keep_rows = False  # the callback keeps its own list, with the Trainer's step numbers
        self._handle = self.trainer.model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self._losses.clear()
            self.monitor.begin_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        loss = torch.stack(self._losses).mean() if self._losses else torch.tensor(float("nan"))
        row = self.monitor.end_step(loss)
        if row is not None:
            row["global_step"] = state.global_step
            self.rows.append(row)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()

    def _capture_loss(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None:
            return  # the Trainer computes the loss itself (compute_loss_func / label smoothing): not seen here
        loss = loss.detach().float()
        num_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if num_items is not None and labels is not None:
            count = (labels[..., 1:] != IGNORE_INDEX).sum()
            loss = loss * torch.as_tensor(num_items, device=loss.device).float() / count.clamp(min=1)
        self._losses.append(loss)
