"""``TestbedCallback``: the drop-in monitor for a Hugging Face ``Trainer`` run under torchrun.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(TestbedCallback(trainer, out_dir="runs/mine"))
    trainer.train()          # rank 0 writes runs/mine/metrics.jsonl; every rank keeps .rows

At ``on_train_begin`` (after the Trainer has wrapped the model in DDP, before the first
backward) it attaches :func:`testbed.monitor.attach` to ``trainer.model_wrapped``; it arms the
hook at ``on_step_begin`` and closes the step at ``on_step_end``. Not distributed (one process,
or a wrapper other than DDP such as FSDP / DeepSpeed): it warns and records nothing.

The per-rank loss is read from the model's own output on the Trainer's training forwards (a
forward hook on the DDP wrapper, counted only between ``on_step_begin`` and ``on_step_end``, so a
forward another callback makes on ``trainer.model`` is not counted) and is the mean over the
step's micro-batches of the model's own loss on each (docs/metrics.md). A model that divides by
the Trainer's ``num_items_in_batch`` is converted back to its own normalisation
(``testbed.integrations.hf_loss``); one that ignores it (a sequence classifier) is taken as is.
The gradients are the Trainer's: see docs/monitor.md for when they differ in scale from the
built-in runner's (``average_tokens_across_devices``, ``num_items_in_batch`` normalisation).

Every row also goes into the Trainer's logs (``trainer.log``, at the Trainer's logging cadence or
every ``log_every`` steps) as ``testbed/<metric>`` and ``testbed/<metric>/rank<r>`` scalars, so
each ``report_to`` integration (TensorBoard, W&B, MLflow) receives them from the main process;
the monitor's alarms go there at once as ``testbed/alarm/<kind>``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import TrainerCallback

from testbed.integrations.hf_loss import LossReader
from testbed.integrations.monitor import Monitor, Row, attach
from testbed.integrations.scalars import alarm_values, flat_values


class TestbedCallback(TrainerCallback):
    """Per-step consistency metrics of a ``Trainer`` run (see the module docstring)."""

    def __init__(self, trainer: Any, *, out_dir: str | Path | None = None, every: int = 1, pairwise_every: int = 0,
                 weight_check_every: int = 0, log_every: int | None = None):
        self.trainer = trainer
        self.out_dir, self.every = out_dir, every
        self.pairwise_every, self.weight_check_every = pairwise_every, weight_check_every
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self.log_every = log_every  # None: when the Trainer logs (logging_steps); 0: never
        self._losses: list[torch.Tensor] = []
        self._handle: Any = None
        self._reader = LossReader()
        self._armed = False  # between on_step_begin and on_step_end: the Trainer's own forwards

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
        self.monitor.on_alarm.append(self._log_alarm)
        self._handle = ddp.register_forward_hook(self._capture_loss, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self._losses.clear()
            self.monitor.begin_step()
            self._armed = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self._armed = False
        losses = list(self._losses) or [torch.tensor(float("nan"))]  # NaN (flagged): no loss was seen
        row = self.monitor.end_step(losses, extra={"global_step": state.global_step})  # 1-based; "step" is 0-based
        if row is None:
            return
        self.rows.append(row)
        every = self.log_every
        if control.should_log if every is None else every > 0 and state.global_step % every == 0:
            self._log(flat_values(row), control)

    def _log(self, values: dict[str, float], control: Any) -> None:
        """``trainer.log`` (every rank, as the Trainer does; integrations write from the main process).
        Its ``on_log`` clears ``should_log``, which the Trainer's own log of this step still needs."""
        should_log = control.should_log
        self.trainer.log(values)
        control.should_log = should_log

    def _log_alarm(self, event: Row) -> None:
        self._log(alarm_values(event), self.trainer.control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()

    def _capture_loss(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (self._armed and module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None:
            return  # the Trainer computes the loss itself (compute_loss_func / label smoothing): not seen here
        # A copy in float64: the Trainer scales the returned tensor in place afterwards (loss *= N)
        self._losses.append(self._reader(module.module, kwargs, loss.detach().to(torch.float64, copy=True)))
