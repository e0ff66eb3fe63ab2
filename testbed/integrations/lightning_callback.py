"""``TestbedLightningCallback``: the drop-in monitor for a Lightning ``Trainer`` on its DDP strategy.

    trainer = L.Trainer(strategy="ddp", callbacks=[TestbedLightningCallback(out_dir="runs/mine")])

Lightning documents two ways to give its DDP a communication hook: ``DDPStrategy(ddp_comm_hook=...)``
or registering it on the wrapped model after the strategy's setup. The testbed's hook state needs
the process group, which exists only after setup, so the callback takes the second way: at
``on_fit_start`` the strategy has wrapped the module in DDP (``trainer.strategy.model``) and no
backward has run yet. A strategy that is not DDP (single device, FSDP, DeepSpeed): it warns and
records nothing. A DDP strategy that already has a comm hook refuses a second one (an error).

The per-rank loss is what ``training_step`` returned: Lightning divides it by
``accumulate_grad_batches`` for the backward and hands the divided value to
``on_train_batch_end``, so the callback multiplies it back, keeps each micro-batch's value and
records their mean when the optimizer has stepped (``trainer.global_step`` moved). Rows go to
``out_dir/metrics.jsonl`` (rank 0) and, as ``testbed/...`` scalars, to ``LightningModule.log_dict``
- so every Lightning logger receives them at its ``log_every_n_steps`` cadence; alarms go to the
loggers at once. Needs the ``lightning`` extra (``pip install 'testbed[lightning]'``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.integrations.monitor import Monitor, Row, attach
from testbed.integrations.scalars import alarm_values, flat_values


class TestbedLightningCallback(pl.Callback):
    """Per-step consistency metrics of a Lightning DDP run (see the module docstring)."""

    def __init__(self, *, out_dir: str | Path | None = None, every: int = 1, pairwise_every: int = 0,
                 weight_check_every: int = 0, batch_size: int | None = None, log: bool = True):
        self.out_dir, self.every, self.batch_size, self.log = out_dir, every, batch_size, log
        self.pairwise_every, self.weight_check_every = pairwise_every, weight_check_every
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self._losses: list[torch.Tensor] = []
        self._global_step = 0
        self._trainer: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, DDP):
            warnings.warn(f"TestbedLightningCallback: the strategy's model is a {type(ddp).__name__}, not DDP "
                          "(single device, FSDP or DeepSpeed); no consistency metrics are recorded", stacklevel=2)
            return
        self.monitor = attach(ddp, out_dir=self.out_dir, every=self.every, pairwise_every=self.pairwise_every,
                              weight_check_every=self.weight_check_every, batch_size=self.batch_size)
        self.monitor.keep_rows = False  # the callback keeps its own list
        self.monitor.on_alarm.append(self._log_alarm)
        self._trainer, self._global_step = trainer, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach() * trainer.accumulate_grad_batches)
        if trainer.global_step == self._global_step:
            return  # accumulating: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        losses, self._losses = self._losses or [torch.tensor(float("nan"))], []  # NaN (flagged): no loss seen
        row = self.monitor.step(losses, extra={"global_step": trainer.global_step})
        if row is None:
            return
        self.rows.append(row)
        if self.log:
            pl_module.log_dict(flat_values(row), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def _log_alarm(self, event: Row) -> None:
        for logger in self._trainer.loggers if self._trainer is not None else []:
            logger.log_metrics(alarm_values(event), step=self._trainer.global_step)  # rank 0 only (Lightning)
