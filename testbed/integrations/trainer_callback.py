"""``TestbedCallback``: the drop-in monitor for a Hugging Face ``Trainer`` run under torchrun.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(TestbedCallback(trainer, out_dir="runs/mine"))
    trainer.train()          # rank 0 owns runs/mine: run.json (with the verdict), metrics.jsonl, ...

At ``on_train_begin`` (after the Trainer has wrapped the model in DDP, before the first
backward) it attaches :func:`testbed.attach` to ``trainer.model_wrapped`` with the run's
``max_steps`` (so the last step's row has the state check); it arms the hook at
``on_step_begin`` and closes the step at ``on_step_end``, and ``on_train_end`` closes the monitor
(the final run.json). Not distributed (one process, or a wrapper other than DDP such as FSDP /
DeepSpeed): it warns and records nothing.

The per-rank loss is read from the model's own output on the Trainer's training forwards (a
forward hook on the DDP wrapper, counted only between ``on_step_begin`` and ``on_step_end``, so a
forward another callback makes on ``trainer.model`` is not counted) and is the mean over the
step's micro-batches of the model's own loss on each (docs/metrics.md). A model that divides by
the Trainer's ``num_items_in_batch`` is converted back to its own normalisation
(``testbed.integrations.hf_loss``); one that ignores it (a sequence classifier) is taken as is.

Every row also reaches the Trainer's ``report_to`` integrations (TensorBoard, W&B, MLflow) as
``testbed/<metric>`` and ``testbed/<metric>/rank<r>`` scalars - at the Trainer's logging cadence,
or every ``log_every`` steps - through their ``on_log``, not ``trainer.log``: the console printers
(``ProgressCallback``, ``PrinterCallback``) and ``state.log_history`` do not get ~16 extra values
per step. Alarms go to the integrations at once as ``testbed/alarm/<kind>``; in ``events.jsonl``
they carry the Trainer's ``global_step`` beside the monitor's 0-based ``step``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from testbed.engine.config import rank_config
from testbed.engine.sinks import is_alarm
from testbed.integrations.hf_loss import LossReader
from testbed.metrics.ledger import DEFAULT_SAMPLES
from testbed.integrations.monitor import Monitor, attach
from testbed.integrations.scalars import alarm_values, flat_values
from testbed.scenario import cadence as cadence_rule
from testbed.schema import row as R
from testbed.schema.event import Event
from testbed.schema.row import Row

CONSOLE_CALLBACKS = (ProgressCallback, PrinterCallback)  # they print every on_log's values


class TrainerLogSink:
    """Rows and alarms to the Trainer's integrations (``engine.sinks.Sink``): each callback's
    ``on_log`` but the console printers' and the testbed callback's own."""

    def __init__(self, callback: "TestbedCallback"):
        self.callback = callback

    def write_row(self, row: Row) -> None:
        every, control = self.callback.log_every, self.callback.trainer.control
        global_step = row.get(R.GLOBAL_STEP)
        if global_step is None:
            return
        if (control.should_log if every is None else every > 0 and global_step % every == 0):
            self.log(flat_values(row))

    def write_event(self, event: Event) -> None:
        if is_alarm(event):
            self.log(alarm_values(event))

    def log(self, values: dict[str, float]) -> None:
        trainer = self.callback.trainer
        handler = trainer.callback_handler
        kwargs = {name: getattr(handler, name, None) for name in ("model", "processing_class", "optimizer",
                                                                   "lr_scheduler", "train_dataloader", "eval_dataloader")}
        for cb in handler.callbacks:
            if isinstance(cb, CONSOLE_CALLBACKS) or cb is self.callback:
                continue
            cb.on_log(trainer.args, trainer.state, trainer.control, logs=dict(values), **kwargs)

    def close(self) -> None:
        pass


class TestbedCallback(TrainerCallback):
    """Per-step consistency metrics of a ``Trainer`` run (see the module docstring). The options
    are ``attach``'s (docs/monitor.md); ``log_every``: None = when the Trainer logs, k = every k
    steps, 0 = never to the integrations (the record in ``out_dir`` is written regardless)."""

    def __init__(self, trainer: Any, *, out_dir: str | Path | None = None, every: int = cadence_rule.EVERY,
                 pairwise_every: int = cadence_rule.PAIRWISE_EVERY,
                 weight_check_every: int = cadence_rule.WEIGHT_CHECK_EVERY, alpha: float | None = 0.01,
                 log_every: int | None = None, overwrite: bool = False, step_timeout_s: float | None = None,
                 name: str | None = None, ledger_samples: int = DEFAULT_SAMPLES, fixed_order: bool = False):
        self.trainer = trainer
        self.options = dict(out_dir=out_dir, every=every, pairwise_every=pairwise_every,
                            weight_check_every=weight_check_every, alpha=alpha, overwrite=overwrite,
                            step_timeout_s=step_timeout_s, name=name, ledger_samples=ledger_samples,
                            fixed_order=fixed_order)
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self.log_every = log_every
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
        steps = state.max_steps - state.global_step if state.max_steps and state.max_steps > 0 else None
        loader = kwargs.get("train_dataloader")
        self.monitor = attach(ddp, batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                              steps=steps, keep_rows=False, loader=loader, _client="hf_trainer", **self.options)
        optimizer = kwargs.get("optimizer") or getattr(self.trainer, "optimizer", None)
        self.monitor.path.config = lambda: rank_config(ddp, optimizer, loader)  # the settings include the optimizer's
        self.monitor.path.sinks.append(TrainerLogSink(self))
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
        row = self.monitor.end_step(losses, extra={R.GLOBAL_STEP: state.global_step})  # 1-based; "step": 0-based
        if row is not None:
            self.rows.append(row)

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
