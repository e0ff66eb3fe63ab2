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
records their mean when the optimizer has stepped (``trainer.global_step`` moved). The record in
``out_dir`` is the monitor's (run.json with the verdict, finalized at ``on_fit_end``, or as failed
at ``on_exception``). Rows also go, as ``testbed/...`` scalars, to ``LightningModule.log_dict`` -
so every Lightning logger receives them at its ``log_every_n_steps`` cadence; alarms go to the
loggers at once, at the step Lightning logs that row at. Needs the ``lightning`` extra.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine.config import rank_config
from testbed.engine.sinks import is_alarm
from testbed.integrations.monitor import Monitor, attach, ordered_loader
from testbed.metrics.ledger import DEFAULT_SAMPLES
from testbed.integrations.scalars import alarm_values, flat_values
from testbed.scenario import cadence as cadence_rule
from testbed.schema import row as R
from testbed.schema.event import Event
from testbed.schema.row import Row


class LightningLogSink:
    """Rows to ``log_dict`` (only inside ``on_train_batch_end``, where Lightning allows it), alarms to
    every logger at the step Lightning logs the current row at (``engine.sinks.Sink``)."""

    def __init__(self, callback: "TestbedLightningCallback"):
        self.callback = callback
        self.module: pl.LightningModule | None = None  # set while a batch's row may be logged

    def write_row(self, row: Row) -> None:
        if self.callback.log and self.module is not None:
            self.module.log_dict(flat_values(row), on_step=True, on_epoch=False)

    def write_event(self, event: Event) -> None:
        trainer = self.callback.trainer
        if not is_alarm(event) or trainer is None:
            return
        for logger in trainer.loggers:  # rank 0 only (Lightning)
            logger.log_metrics(alarm_values(event), step=logging_step(trainer))

    def close(self) -> None:
        self.module = None


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector writes this batch's ``log_dict`` values at: the
    training loop's ``_batches_that_stepped``, which it advances only after logging (so it is
    ``global_step - 1`` inside ``on_train_batch_end``)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", max(trainer.global_step - 1, 0)))


class TestbedLightningCallback(pl.Callback):
    """Per-step consistency metrics of a Lightning DDP run (see the module docstring). The options
    are ``attach``'s (docs/monitor.md); ``log``: also send the rows to the Lightning loggers."""

    def __init__(self, *, out_dir: str | Path | None = None, every: int = cadence_rule.EVERY,
                 pairwise_every: int = cadence_rule.PAIRWISE_EVERY,
                 weight_check_every: int = cadence_rule.WEIGHT_CHECK_EVERY, batch_size: int | None = None,
                 alpha: float | None = 0.01, log: bool = True, overwrite: bool = False,
                 step_timeout_s: float | None = None, name: str | None = None, ledger_samples: int = DEFAULT_SAMPLES,
                 fixed_order: bool = False):
        self.options = dict(out_dir=out_dir, every=every, pairwise_every=pairwise_every,
                            weight_check_every=weight_check_every, batch_size=batch_size, alpha=alpha,
                            overwrite=overwrite, step_timeout_s=step_timeout_s, name=name,
                            ledger_samples=ledger_samples, fixed_order=fixed_order)
        self.log = log
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self.trainer: pl.Trainer | None = None
        self._losses: list[torch.Tensor] = []
        self._global_step = 0
        self._loader_seen = False
        self._sink = LightningLogSink(self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, DDP):
            warnings.warn(f"TestbedLightningCallback: the strategy's model is a {type(ddp).__name__}, not DDP "
                          "(single device, FSDP or DeepSpeed); no consistency metrics are recorded", stacklevel=2)
            return
        steps = trainer.max_steps - trainer.global_step if trainer.max_steps and trainer.max_steps > 0 else None
        self.monitor = attach(ddp, steps=steps, keep_rows=False, _client="lightning", **self.options)
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        # the settings: the optimizer's too, and the train loader's sampler once Lightning has built it
        self.monitor.path.config = lambda: rank_config(ddp, optimizers[0] if optimizers else None,
                                                       getattr(trainer, "train_dataloader", None))
        self.monitor.path.sinks.append(self._sink)
        self.trainer, self._global_step = trainer, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None:
            return
        if not self._loader_seen:  # Lightning builds the loader after on_fit_start
            self._loader_seen = True
            if ordered_loader(getattr(trainer, "train_dataloader", None)):
                self.monitor.declare_fixed_order()  # shuffle=False: the order repeats by design
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach() * trainer.accumulate_grad_batches)
        if trainer.global_step == self._global_step:
            return  # accumulating: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        losses, self._losses = self._losses or [torch.tensor(float("nan"))], []  # NaN (flagged): no loss seen
        self._sink.module = pl_module
        try:
            row = self.monitor.step(losses, extra={R.GLOBAL_STEP: trainer.global_step})
        finally:
            self._sink.module = None
        if row is not None:
            self.rows.append(row)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.fail(exception)
