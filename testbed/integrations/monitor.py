"""Drop-in consistency metrics for your own DDP or FSDP2 training loop - no testbed runner needed.

``attach(ddp_model)`` registers the testbed's comm hook (``testbed.engine.hook``) on an existing
``DistributedDataParallel`` model. The hook replaces DDP's default all-reduce with the same
arithmetic (SUM, then divide by N) and measures each rank's local gradient on its way through.
``attach(fsdp_model)`` (the root returned by ``fully_shard``) sets testbed's reduce-scatter
(``testbed.engine.fsdp``: all-to-all + local sum, the same bytes) on every FSDP unit instead.
After each optimizer step, ``monitor.step(loss)`` gathers three scalars per rank and returns the
step's row (same fields as the runner's ``metrics.jsonl``: per-rank loss and gradient norm, their
std / CV, cosine of each rank's gradient to the mean, ...) on every rank::

    monitor = testbed.attach(ddp_model, out_dir="runs/mine")   # rank 0 writes runs/mine/metrics.jsonl
    for batch in loader:
        loss = ddp_model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        row = monitor.step(loss)            # every rank calls it; None on unmeasured steps

With gradient accumulation (micro-batches under ``ddp_model.no_sync()`` or with
``ddp_model.require_backward_grad_sync = False``, or FSDP2's ``set_requires_gradient_sync(False)``), call ``step`` once per optimizer step with the
list of the micro-batch losses (``monitor.step([l1, l2])``; their mean is recorded): the hook only
fires on the synchronising backward, so the metrics are those of the accumulated local gradient
(docs/monitor.md). One loss after several training forwards is recorded as given, with a warning.
Attach before the first backward; a model that already has a comm hook cannot take a second one.

Alarms: ``monitor.alarm(kind, message)`` (and the built-in ones: weights diverged, a non-finite
value) go to ``out_dir/events.jsonl``, the ``testbed`` logger, TensorBoard and every
``monitor.on_alarm`` listener; ``monitor.on_row`` listeners get every row.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine import fsdp, teardown
from testbed.engine.hook import ConsistencyState, install
from testbed.diagnose.sequential import SequentialTest
from testbed.engine.gather import gather_row
from testbed.engine.gather import weight_sync as _weight_sync
from testbed.diagnose.summary import diverging_ranks
from testbed.metrics.step import NoiseScaleEMA
from testbed.record.files import EVENTS_FILE, METRICS_FILE, JsonlWriter

Row = dict[str, Any]
Loss = torch.Tensor | float
Listener = Callable[[Row], None]
LOG = logging.getLogger("testbed")


class Monitor:
    """Per-step consistency metrics of one DDP or FSDP2 model (see the module docstring for use)."""

    def __init__(self, ddp_model: torch.nn.Module, state: ConsistencyState, *, every: int = 1, pairwise_every: int = 0,
                 weight_check_every: int = 0, batch_size: int | None = None, noise_scale_ema: float = 0.9,
                 out_dir: str | Path | None = None, keep_rows: bool = True, tensorboard: str | Path | None = None,
                 optimizer: torch.optim.Optimizer | None = None, alpha: float | None = 0.01):
        if every < 1 or pairwise_every < 0 or weight_check_every < 0:
            raise ValueError("attach needs every >= 1, pairwise_every >= 0 and weight_check_every >= 0")
        self.ddp: torch.nn.Module | None = ddp_model
        self.state = state
        self.every, self.pairwise_every, self.weight_check_every = every, pairwise_every, weight_check_every
        self.batch_size = batch_size
        self.noise = NoiseScaleEMA(noise_scale_ema)
        self.device = next(ddp_model.parameters()).device
        self.rank = dist.get_rank(state.process_group)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.writer = JsonlWriter(self.out_dir / METRICS_FILE) if self.out_dir is not None and self.rank == 0 else None
        self.keep_rows = keep_rows
        self.rows: list[Row] = []
        self.step_index = 0
        self._measuring = self._pairwise = False
        self.on_row: list[Listener] = []  # called with every row, on every rank
        self.on_alarm: list[Listener] = []  # called with every alarm event, on every rank
        self.tensorboard = _tensorboard_sink(tensorboard) if tensorboard is not None and self.rank == 0 else None
        self._events: JsonlWriter | None = None
        self._alarmed: set[str] = set()
        # The verdict's online test (diagnose/sequential.py): anytime-valid, so the chance of a false
        # alarm over the whole run is <= alpha however long it runs. Every rank sees the same rows,
        # so every rank raises the same alarm at the same step.
        self.sequential = SequentialTest(state.world_size, alpha) if alpha is not None else None
        self._forwards, self._warned_accum = 0, False
        # Counts training forwards between steps: several with one loss given = accumulation, warned.
        self._forward_hook: Any = ddp_model.register_forward_pre_hook(self._count_forward)
        self._lr: float | None = None  # the lr optimizer.step() used this step (a step pre-hook reads it)
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda opt, *_: setattr(self, "_lr", opt.param_groups[0]["lr"]))
        self.begin_step()

    def begin_step(self) -> None:
        """Arm the hook for the coming backward (``step`` calls it for the next step)."""
        if self.ddp is None:
            raise RuntimeError("this Monitor is closed")
        k = self.step_index
        self._measuring = k % self.every == 0
        self._pairwise = self.pairwise_every > 0 and k % self.pairwise_every == 0
        self.state.begin_step(self._measuring, self._pairwise, device=self.device)
        self._forwards = 0

    def end_step(self, loss: Loss | Sequence[Loss], extra: dict[str, Any] | None = None) -> Row | None:
        """Close the step: gather the per-rank scalars (one small collective) and build the row.

        ``loss``: this rank's loss, or the list of its micro-batch losses (their mean is recorded).
        ``extra`` fields (e.g. the Trainer's ``global_step``) go into the row before it is written.
        Raises RuntimeError on a closed monitor.
        """
        if self.ddp is None:
            raise RuntimeError("this Monitor is closed")
        step = self.step_index
        self.step_index += 1
        local_loss = self._local_loss(loss)
        check_weights = self.weight_check_every > 0 and (step + 1) % self.weight_check_every == 0
        if not (self._measuring or check_weights):
            return None
        row = gather_row(self.state.acc, local_loss, step=step, measure=self._measuring, device=self.device,
                         world_size=self.state.world_size, batch_size=self.batch_size, noise=self.noise,
                         group=self.state.process_group, pairwise=self._pairwise)
        row.update(extra or {})
        if check_weights:
            row.update(weight_sync(self.ddp, self.state.process_group))
        if self._lr is not None:
            row["lr"] = self._lr
        if self.keep_rows:
            self.rows.append(row)
        if self.writer is not None:
            self.writer.write(row)
        if self.tensorboard is not None:
            self.tensorboard.write_row(row)
        for listener in self.on_row:
            listener(row)
        self._builtin_alarms(row)
        return row

    def step(self, loss: Loss | Sequence[Loss], extra: dict[str, Any] | None = None) -> Row | None:
        """``end_step(loss)`` and arm the next step: the one call a plain training loop needs."""
        row = self.end_step(loss, extra)
        self.begin_step()
        return row

    def alarm(self, kind: str, message: str, *, step: int | None = None, ranks: Sequence[int] | None = None,
              **details: Any) -> Row:
        """Raise an alarm; call it on every rank, like ``step``. Rank 0 appends it to
        ``out_dir/events.jsonl``, logs a warning on the ``testbed`` logger and writes it to
        TensorBoard; every rank passes it to the ``on_alarm`` listeners (e.g. the Trainer's logs).
        The hook point for detectors such as the verdict's sequential test."""
        event: Row = {"step": self.step_index - 1 if step is None else step, "event": "alarm", "kind": kind,
                      "message": message, "ranks": list(ranks) if ranks is not None else None, **details}
        if self.rank == 0:
            if self.out_dir is not None:
                self._events = self._events or JsonlWriter(self.out_dir / EVENTS_FILE)
                self._events.write(event)
            LOG.warning("testbed alarm at step %s: %s: %s", event["step"], kind, message)
            if self.tensorboard is not None:
                self.tensorboard.write_alarm(event)
        for listener in self.on_alarm:
            listener(event)
        return event

    def _builtin_alarms(self, row: Row) -> None:
        """Once per kind: the replicas' weights diverged; a non-finite loss or gradient appeared."""
        if row.get("weights_in_sync") is False and "weights_diverged" not in self._alarmed:
            self._alarmed.add("weights_diverged")
            ranks, reference = diverging_ranks(row.get("weight_checksum", []))
            self.alarm("weights_diverged", f"the replicas' weights differ (ranks {ranks} vs {reference}): "
                       "the job is no longer data parallel", step=row["step"], ranks=ranks)
        bad = [f for f in row.get("flags", []) if str(f.get("kind", "")).startswith("nonfinite")]
        if bad and "nonfinite" not in self._alarmed:
            self._alarmed.add("nonfinite")
            what = ", ".join(f"{f['kind']} on rank {f['rank']}" for f in bad)
            self.alarm("nonfinite", f"non-finite values: {what}", step=row["step"],
                       ranks=sorted({f["rank"] for f in bad if f["rank"] is not None}))
        found = self.sequential.update(row) if self.sequential is not None else None
        if found is not None and found.kind in ("persistent", "transient"):  # the other two: raised above
            ranks = [found.rank] if found.rank is not None else list(found.ranks)
            self.alarm("inconsistent", f"ranks are not exchangeable: {found.describe()} (online test, "
                       f"alpha = {self.sequential.alpha})", step=found.step, ranks=ranks, metric=found.metric,
                       evidence=found.kind, e_value=found.e_value)

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
                          "monitor.step([loss_1, ..., loss_k]), to record their mean (docs/monitor.md)", stacklevel=3)
        return _scalar(loss, self.device)

    def close(self) -> None:
        """Close the files, disarm the hook (later backwards are plain all-reduces) and let go of the
        model. Idempotent. The process group is left alone (``engine.teardown.at_exit`` runs at exit)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._close_extras()
        if self.ddp is not None:
            self.state.begin_step(False, device=self.device)
            self.ddp = None

    def _close_extras(self) -> None:
        """The alarm file, the TensorBoard writer and the forward counter (idempotent)."""
        for closable in (self._events, self.tensorboard):
            if closable is not None:
                closable.close()
        self._events = self.tensorboard = None
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(ddp_model: torch.nn.Module, *, out_dir: str | Path | None = None, every: int = 1, pairwise_every: int = 0,
           weight_check_every: int = 0, batch_size: int | None = None, noise_scale_ema: float = 0.9,
           process_group: dist.ProcessGroup | None = None, tensorboard: str | Path | None = None,
           optimizer: torch.optim.Optimizer | None = None, alpha: float | None = 0.01) -> Monitor:
    """Install the consistency hook on ``ddp_model`` (a DDP model, or the root module of an FSDP2
    ``fully_shard`` model) and return its :class:`Monitor`.

    ``batch_size`` (samples per rank per optimizer step) enables the gradient-noise-scale
    estimate; ``out_dir`` makes rank 0 append rows to ``out_dir/metrics.jsonl``; ``tensorboard``
    (a log directory) makes rank 0 write the rows as TensorBoard scalars; ``alpha`` is the false-alarm
    rate of the online consistency test over the whole run (None: off); ``optimizer`` adds
    ``lr`` to each row (its first param group's lr as ``optimizer.step()`` used it, scheduler or not).
    """
    options = dict(every=every, pairwise_every=pairwise_every, weight_check_every=weight_check_every,
                   batch_size=batch_size, noise_scale_ema=noise_scale_ema, out_dir=out_dir, tensorboard=tensorboard,
                   optimizer=optimizer, alpha=alpha)
    if fsdp.is_sharded(ddp_model):
        monitor = Monitor(ddp_model, fsdp.install(ddp_model, process_group), **options)
        teardown.register(ddp_model, monitor)  # joins gloo's threads at exit, before finalization (issue 17)
        return monitor
    if not isinstance(ddp_model, DDP):
        raise TypeError("attach needs a torch.nn.parallel.DistributedDataParallel model or an FSDP2 model "
                        f"(torch.distributed.fsdp.fully_shard), got {type(ddp_model).__name__}")
    try:
        state = install(ddp_model, process_group)
    except RuntimeError as e:
        raise RuntimeError(f"cannot attach the testbed hook: {e} (a DDP model takes one comm hook; "
                           "attach replaces DDP's default all-reduce, not a custom hook such as fp16 compression)") from e
    monitor = Monitor(ddp_model, state, **options)
    teardown.register(ddp_model, monitor)  # joins gloo's threads at exit, before finalization (issue 17)
    return monitor


def weight_sync(ddp_model: torch.nn.Module, process_group: dist.ProcessGroup | None = None) -> Row:
    """Exact per-rank parameter checksums and whether they agree (one small all-gather); for an
    FSDP2 model, the whole model's checksum (sum over the shards) on every rank."""
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    sharded = fsdp.is_sharded(ddp_model)
    return _weight_sync(fsdp.local_shards(params) if sharded else params, dist.get_world_size(process_group),
                        process_group, sharded=sharded)


def _scalar(value: Loss, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _tensorboard_sink(log_dir: str | Path) -> Any:
    from testbed.integrations.tensorboard import TensorBoardSink  # torch.utils.tensorboard only when asked for

    return TensorBoardSink(log_dir)
