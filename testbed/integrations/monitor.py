"""Drop-in consistency metrics for your own DDP or FSDP2 training loop - no testbed runner needed.

``attach(ddp_model, out_dir=...)`` registers the testbed's comm hook (``engine/hook.py``) on an
existing ``DistributedDataParallel`` model (or sets testbed's reduce-scatter on an FSDP2 model,
``engine/fsdp.py``) and returns a ``Monitor``. After each optimizer step ``monitor.step(loss)`` -
on every rank - runs the runner's own step path (``engine/step_path.py``: check-in, one all-gather,
the row, the sinks, the built-in alarms) and returns the row::

    monitor = testbed.attach(ddp_model, out_dir="runs/mine")   # rank 0 owns runs/mine
    for batch in loader:
        loss = ddp_model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        row = monitor.step(loss)            # every rank calls it; None on unmeasured steps
    monitor.close()                         # or leave it to the exit handler

``out_dir`` holds a run record like ``testbed run``'s (``integrations/run_record.py``): run.json
from ``attach`` on (status ``running``), metrics.jsonl, events.jsonl, and at every ending - close,
interpreter exit, SIGTERM/SIGINT/SIGHUP, an exception in the loop - the final run.json with the
status and the verdict. A directory holding another record is refused on every rank unless
``overwrite=True``. A rank that stops calling ``step`` while the others go on ends the job with an
error naming it (``engine/checkin.py``) instead of a hang.

With gradient accumulation call ``step`` once per optimizer step with the list of the micro-batch
losses (``monitor.step([l1, l2])``; their mean is recorded): the hook fires only on the
synchronising backward (docs/monitor.md). One loss after several training forwards is recorded as
given, with a warning pointing at the call.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from testbed.engine import fsdp, teardown
from testbed.engine.alarms import BuiltinAlarms
from testbed.engine.config import rank_config
from testbed.engine.checkin import CheckInError
from testbed.engine.hook import ConsistencyState, install
from testbed.engine.sinks import ListenerSink
from testbed.engine.step_path import StepPath
from testbed.metrics.ledger import DEFAULT_SAMPLES
from testbed.integrations import endings
from testbed.integrations.monitor_setup import Owned, build_sinks, caller_stacklevel, checked_model, claim
from testbed.integrations.run_record import Ending, rank_environment, verdict_line
from testbed.scenario import cadence as cadence_rule
from testbed.scenario.cadence import Cadence
from testbed.schema import run as K
from testbed.schema import row as R
from testbed.schema.event import Event
from testbed.schema.row import Row

Loss = torch.Tensor | float
Listener = Callable[[Row], None]

__all__ = ["Monitor", "attach", "Row"]


class Monitor:
    """Per-step consistency metrics of one DDP or FSDP2 model (see the module docstring and
    ``attach`` for the options)."""

    def __init__(self, model: torch.nn.Module, state: ConsistencyState, cadence: Cadence, owned: Owned, *,
                 batch_size: int | None = None, noise_scale_ema: float = 0.9, keep_rows: bool = True,
                 tensorboard: str | Path | None = None, optimizer: torch.optim.Optimizer | None = None,
                 alpha: float | None = 0.01, steps: int | None = None, step_timeout_s: float | None = None,
                 name: str | None = None, on_nonfinite: str = "continue", client: str = "attach",
                 ledger_samples: int = DEFAULT_SAMPLES, fixed_order: bool = False, loader: Any = None):
        self.model: torch.nn.Module | None = model
        self.state, self.cadence, self.alpha = state, cadence, alpha
        self.device = next(model.parameters()).device
        self.rank, self.world_size = dist.get_rank(state.process_group), state.world_size
        self.checkin, self.record = owned.checkin, owned.record
        self.out_dir = self.record.out_dir if self.record is not None else None
        self.keep_rows, self.rows = keep_rows, []  # type: list[Row]
        self.on_row: list[Listener] = []  # called with every row, on every rank
        self.on_alarm: list[Callable[[Event], None]] = []  # called with every alarm event, on every rank
        self.step_index = 0
        self.intended = ["epoch_repeat"] if fixed_order or ordered_loader(loader) else []
        self.path = StepPath(model, state, cadence, device=self.device, batch_size=batch_size,
                             noise_scale_ema=noise_scale_ema, last_step=steps - 1 if steps else None,
                             alarms=BuiltinAlarms(self.world_size, alpha, self.intended),
                             checkin=self.checkin if step_timeout_s != 0 else None, on_nonfinite=on_nonfinite,
                             ledger_samples=ledger_samples, config=lambda: rank_config(model, optimizer, loader))
        self.path.sinks = build_sinks(self, tensorboard) + [ListenerSink(self.on_row, self.on_alarm)]
        if self.record is not None:
            info = {K.NAME: name or default_name(), K.CLIENT: client, K.CADENCE: cadence.to_dict(), K.ALPHA: alpha,
                    "batch_size": batch_size, "steps": steps, "step_timeout_s": step_timeout_s,
                    "noise_scale_ema": noise_scale_ema, K.LEDGER_SAMPLES: ledger_samples, K.INTENDED: self.intended}
            self.record.start(info, rank_environment(self.rank, self.device, state.process_group),
                              dist.get_backend(state.process_group), str(self.device))
        self._closed = False
        self._forwards, self._warned_accum = 0, False
        # Counts training forwards between steps: several with one loss given = accumulation, warned.
        self._forward_hook: Any = model.register_forward_pre_hook(self._count_forward)
        self._lr: float | None = None  # the lr optimizer.step() used this step (a step pre-hook reads it)
        self._lr_hook: Any = optimizer.register_step_pre_hook(self._read_lr) if optimizer is not None else None
        endings.watch(self)
        self.begin_step()

    # ---- the training loop's calls -----------------------------------------------------------
    def begin_step(self) -> None:
        """Arm the hook for the coming backward (``step`` calls it for the next step)."""
        self._check_open()
        self.path.begin(self.step_index)
        self._forwards = 0

    def end_step(self, loss: Loss | Sequence[Loss], extra: dict[str, Any] | None = None) -> Row | None:
        """Close the step (after the optimizer step): check in, gather the per-rank scalars (one
        small collective) and build the row; None on a step the cadence does not measure.

        ``loss``: this rank's loss, or the list of its micro-batch losses (their mean is recorded).
        ``extra`` fields (e.g. the Trainer's ``global_step``) go into the row before it is written.
        Raises RuntimeError on a closed monitor, a ``CheckInError`` naming the ranks when the ranks
        cannot go on together."""
        self._check_open()
        step = self.step_index
        local_loss = self._local_loss(loss)
        row = self.path.end(step, local_loss, lr=self._lr, extra=extra)
        self.step_index += 1  # after the step completed: a failure inside it is "at step <step>"
        if row is not None and self.keep_rows:
            self.rows.append(row)
        return row

    def step(self, loss: Loss | Sequence[Loss], extra: dict[str, Any] | None = None) -> Row | None:
        """``end_step(loss)`` and arm the next step: the one call a plain training loop needs."""
        row = self.end_step(loss, extra)
        self.begin_step()
        return row

    def alarm(self, kind: str, message: str, *, step: int | None = None, ranks: Sequence[int] | None = None,
              **details: Any) -> Event:
        """Raise an alarm; call it on every rank, like ``step``. Rank 0 appends it to
        ``out_dir/events.jsonl``, logs a warning on the ``testbed`` logger and writes it to
        TensorBoard; every rank passes it to the ``on_alarm`` listeners (e.g. the Trainer's logs).
        ``step`` defaults to the last step; the event carries that step's ``global_step``, if any."""
        return self.path.alarm(kind, message, step=step, ranks=ranks, **details)

    # ---- endings -----------------------------------------------------------------------------
    def close(self) -> None:
        """End the run: the final state check (when the last step had none and every rank closes),
        the final run.json with the verdict (rank 0), then the files, the hook (later backwards are
        plain averaging) and the model are let go. Idempotent; ``rows`` stays. The process group
        is left alone (``engine.teardown.at_exit`` runs at exit)."""
        self._end(Ending(K.OK))

    def stopped(self, signame: str) -> None:
        """A stop signal reached the process (``integrations/endings.py``): finalize as failed, tell
        the peers; nothing is closed (the interrupted code may still be writing)."""
        if self.record is not None and self.record.ending is not None:
            return  # already finalized (a close() in its final check is not: the signal ends it)
        what = f"was stopped by {signame} at step {self.step_index}"
        if self.checkin is not None:
            self.checkin.end("stopped", what, self.step_index)
        self._finish(Ending(K.FAILED, f"stopped by {signame} at step {self.step_index}", failed_rank=self.rank,
                            failed_step=self.step_index))

    def fail(self, exc: BaseException) -> None:
        """End the run as failed because ``exc`` escaped the loop (``with`` block, exit handler,
        a framework's exception hook)."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        step = self.step_index
        if isinstance(exc, CheckInError):  # the ranks it names are the cause, not this one
            culprit = exc.ranks[0] if len(exc.ranks) == 1 else None
            ending = Ending(K.FAILED, f"{str(exc).removeprefix('testbed monitor: ')} (seen by rank {self.rank} at "
                            f"step {step})", failed_rank=culprit, failed_step=step, traceback=tb)
        else:
            what = f"interrupted ({text})" if isinstance(exc, KeyboardInterrupt) else text
            ending = Ending(K.FAILED, f"rank {self.rank} failed at step {step}: {what}", failed_rank=self.rank,
                            failed_step=step, traceback=tb)
        self._end(ending, error=text)

    def _end(self, ending: Ending, error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if ending.status == K.OK:
                self._final_check()
            elif self.checkin is not None:
                self.checkin.end("failed", f"failed at step {self.step_index}", self.step_index, error)
            self._finish(ending)
        finally:
            self._let_go()

    def _final_check(self) -> None:
        """The state check after the last step, when its row had none and every rank is closing."""
        last = self.step_index - 1
        due = (self.cadence.weight_check_every > 0 and last >= 0 and self.path.last_state_check != last
               and self.world_size > 1)  # one rank: nothing to compare
        gone = self.checkin.close_barrier(last if last >= 0 else None) if self.checkin is not None else []
        if due and not gone and _group_alive(self.state.process_group):
            global_step = (self.path.last_row or {}).get(R.GLOBAL_STEP)
            self.path.final_check(last, extra={R.GLOBAL_STEP: global_step} if global_step is not None else None)

    def _finish(self, ending: Ending) -> None:
        if self.record is None:
            return
        run = self.record.finish(ending)
        line = verdict_line(run, self.out_dir) if self.out_dir is not None else None
        if line:
            sys.stderr.write(line + "\n")

    def _let_go(self) -> None:
        self.path.close()
        for handle in (self._forward_hook, self._lr_hook):
            if handle is not None:
                handle.remove()
        self._forward_hook = self._lr_hook = None
        if self.record is not None:
            self.record.release()
        endings.unwatch(self)
        self.model = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Monitor is closed")

    # ---- small helpers -----------------------------------------------------------------------
    def declare_fixed_order(self) -> None:
        """The loader repeats its order every epoch on purpose (``attach(..., fixed_order=True)``
        after the fact: the Lightning callback calls it once it sees an unshuffled loader). Call it
        on every rank before the second epoch."""
        if "epoch_repeat" in self.intended:
            return
        self.intended.append("epoch_repeat")
        if self.path.alarms is not None:
            self.path.alarms.data.intended.add("epoch_repeat")
        if self.record is not None and self.record.run:
            self.record.run[K.INTENDED] = list(self.intended)

    def _read_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self._lr = optimizer.param_groups[0]["lr"]

    def _count_forward(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._forwards += 1

    def _local_loss(self, loss: Loss | Sequence[Loss]) -> torch.Tensor:
        """One float64 value: the loss, or the mean of the micro-batch losses."""
        if isinstance(loss, (list, tuple)):
            if not loss:
                raise ValueError("monitor.step got an empty list of micro-batch losses")
            return torch.stack([_scalar(x, self.device) for x in loss]).mean()
        if self._forwards > 1 and not self._warned_accum:
            self._warned_accum = True
            warnings.warn(f"testbed monitor: one loss for a step of {self._forwards} training forwards (gradient "
                          "accumulation?); it is recorded as given. Pass the micro-batch losses, "
                          "monitor.step([loss_1, ..., loss_k]), to record their mean (docs/monitor.md)",
                          stacklevel=caller_stacklevel())
        return _scalar(loss, self.device)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(exc)
        else:
            self.close()


def attach(model: torch.nn.Module, *, out_dir: str | Path | None = None, every: int = cadence_rule.EVERY,
           pairwise_every: int = cadence_rule.PAIRWISE_EVERY, weight_check_every: int = cadence_rule.WEIGHT_CHECK_EVERY,
           batch_size: int | None = None, noise_scale_ema: float = 0.9, process_group: dist.ProcessGroup | None = None,
           tensorboard: str | Path | None = None, optimizer: torch.optim.Optimizer | None = None,
           alpha: float | None = 0.01, steps: int | None = None, overwrite: bool = False,
           step_timeout_s: float | None = None, name: str | None = None, on_nonfinite: str = "continue",
           keep_rows: bool = True, ledger_samples: int = DEFAULT_SAMPLES, fixed_order: bool = False,
           loader: Any = None, _client: str = "attach") -> Monitor:
    """Install the consistency hook on ``model`` (a DDP model, or the root module of an FSDP2
    ``fully_shard`` model) and return its :class:`Monitor`. Call it on every rank, before the first
    backward. Every option is described in docs/monitor.md ("Options of attach"). Everything that
    can be refused - the model, the options, ``out_dir`` - is refused before the hook is installed."""
    model = checked_model(model, process_group)
    cadence = Cadence(every, pairwise_every, weight_check_every)  # ValueError naming the option
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (the optimizer steps the loop will run), got {steps}")
    if isinstance(ledger_samples, bool) or not isinstance(ledger_samples, int) or not 0 <= ledger_samples <= 4096:
        raise ValueError(f"ledger_samples must be an integer in 0..4096 (0 = the data ledger off), got {ledger_samples!r}")
    owned = claim(process_group, out_dir, overwrite, step_timeout_s)  # RunDirError on every rank
    try:
        state = fsdp.install(model, process_group) if fsdp.is_sharded(model) else _install_ddp(model, process_group)
        monitor = Monitor(model, state, cadence, owned, batch_size=batch_size, noise_scale_ema=noise_scale_ema,
                          keep_rows=keep_rows, tensorboard=tensorboard, optimizer=optimizer, alpha=alpha, steps=steps,
                          step_timeout_s=step_timeout_s, name=name, on_nonfinite=on_nonfinite, client=_client,
                          ledger_samples=ledger_samples, fixed_order=fixed_order, loader=loader)
    except BaseException:
        if owned.record is not None:
            owned.record.release()
        raise
    teardown.register(model, monitor)  # closes it at exit, then joins gloo's threads (issue 17)
    return monitor


def _install_ddp(model: torch.nn.Module, process_group: dist.ProcessGroup | None) -> ConsistencyState:
    try:
        return install(model, process_group)
    except RuntimeError as e:
        raise RuntimeError(f"cannot attach the testbed hook: {e} (a DDP model takes one comm hook; attach "
                           "replaces DDP's default all-reduce, not a custom hook such as fp16 compression)") from e


def ordered_loader(loader: Any) -> bool:
    """Whether a DataLoader visibly repeats its order every epoch by design: its sampler is a
    ``DistributedSampler(shuffle=False)`` or a ``SequentialSampler``."""
    from torch.utils.data import DistributedSampler, SequentialSampler

    sampler = getattr(loader, "sampler", None)
    if sampler is None or not isinstance(sampler, (DistributedSampler, SequentialSampler)):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", sampler)
    if isinstance(sampler, DistributedSampler):
        return not sampler.shuffle
    return isinstance(sampler, SequentialSampler) and not isinstance(getattr(loader, "dataset", None),
                                                                      torch.utils.data.IterableDataset)


def default_name() -> str:
    """The script's name (``train`` for ``train.py``), the run's label in reports."""
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else ""
    return script or "monitor"


def _group_alive(group: dist.ProcessGroup | None) -> bool:
    return dist.is_initialized() and (group is None or group != dist.GroupMember.NON_GROUP_MEMBER)


def _scalar(value: Loss, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)

