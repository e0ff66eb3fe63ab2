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

With gradient accumulation (micro-batches under ``ddp_model.no_sync()``, or FSDP2's
``set_requires_gradient_sync(False)``), call ``step`` once per optimizer step with the mean of the
micro-batch losses: the hook only fires on the synchronising backward, so the metrics are those of the accumulated local gradient (docs/metrics.md).
Attach before the first backward; a model that already has a comm hook cannot take a second one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine import fsdp
from testbed.engine.hook import ConsistencyState, install
from testbed.engine.gather import gather_row
from testbed.engine.gather import weight_sync as _weight_sync
from testbed.metrics.step import NoiseScaleEMA
from testbed.record.files import METRICS_FILE, JsonlWriter

Row = dict[str, Any]


class Monitor:
    """Per-step consistency metrics of one DDP or FSDP2 model (see the module docstring for use)."""

    def __init__(self, ddp_model: torch.nn.Module, state: ConsistencyState, *, every: int = 1, pairwise_every: int = 0,
                 weight_check_every: int = 0, batch_size: int | None = None, noise_scale_ema: float = 0.9,
                 out_dir: str | Path | None = None, keep_rows: bool = True):
        if every < 1 or pairwise_every < 0 or weight_check_every < 0:
            raise ValueError("attach needs every >= 1, pairwise_every >= 0 and weight_check_every >= 0")
        self.ddp, self.state = ddp_model, state
        self.every, self.pairwise_every, self.weight_check_every = every, pairwise_every, weight_check_every
        self.batch_size = batch_size
        self.noise = NoiseScaleEMA(noise_scale_ema)
        self.device = next(ddp_model.parameters()).device
        self.rank = dist.get_rank(state.process_group)
        self.writer = JsonlWriter(Path(out_dir) / METRICS_FILE) if out_dir is not None and self.rank == 0 else None
        self.keep_rows = keep_rows
        self.rows: list[Row] = []
        self.step_index = 0
        self._measuring = self._pairwise = False
        self.begin_step()

    def begin_step(self) -> None:
        """Arm the hook for the coming backward (``step`` calls it for the next step)."""
        k = self.step_index
        self._measuring = k % self.every == 0
        self._pairwise = self.pairwise_every > 0 and k % self.pairwise_every == 0
        self.state.begin_step(self._measuring, self._pairwise, device=self.device)

    def end_step(self, loss: torch.Tensor | float) -> Row | None:
        """Close the step: gather the per-rank scalars (one small collective) and build the row."""
        step = self.step_index
        self.step_index += 1
        check_weights = self.weight_check_every > 0 and (step + 1) % self.weight_check_every == 0
        if not (self._measuring or check_weights):
            return None
        row = gather_row(self.state.acc, loss, step=step, measure=self._measuring, device=self.device,
                         world_size=self.state.world_size, batch_size=self.batch_size, noise=self.noise,
                         group=self.state.process_group, pairwise=self._pairwise)
        if check_weights:
            row.update(weight_sync(self.ddp, self.state.process_group))
        if self.keep_rows:
            self.rows.append(row)
        if self.writer is not None:
            self.writer.write(row)
        return row

    def step(self, loss: torch.Tensor | float) -> Row | None:
        """``end_step(loss)`` and arm the next step: the one call a plain training loop needs."""
        row = self.end_step(loss)
        self.begin_step()
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(ddp_model: torch.nn.Module, *, out_dir: str | Path | None = None, every: int = 1, pairwise_every: int = 0,
           weight_check_every: int = 0, batch_size: int | None = None, noise_scale_ema: float = 0.9,
           process_group: dist.ProcessGroup | None = None) -> Monitor:
    """Install the consistency hook on ``ddp_model`` (a DDP model, or the root module of an FSDP2
    ``fully_shard`` model) and return its :class:`Monitor`.

    ``batch_size`` (samples per rank per optimizer step) enables the gradient-noise-scale
    estimate; ``out_dir`` makes rank 0 append rows to ``out_dir/metrics.jsonl``.
    """
    options = dict(every=every, pairwise_every=pairwise_every, weight_check_every=weight_check_every,
                   batch_size=batch_size, noise_scale_ema=noise_scale_ema, out_dir=out_dir)
    if fsdp.is_sharded(ddp_model):
        return Monitor(ddp_model, fsdp.install(ddp_model, process_group), **options)
    if not isinstance(ddp_model, DDP):
        raise TypeError("attach needs a torch.nn.parallel.DistributedDataParallel model or an FSDP2 model "
                        f"(torch.distributed.fsdp.fully_shard), got {type(ddp_model).__name__}")
    try:
        state = install(ddp_model, process_group)
    except RuntimeError as e:
        raise RuntimeError(f"cannot attach the testbed hook: {e} (a DDP model takes one comm hook; "
                           "attach replaces DDP's default all-reduce, not a custom hook such as fp16 compression)") from e
    return Monitor(ddp_model, state, **options)


def weight_sync(ddp_model: torch.nn.Module, process_group: dist.ProcessGroup | None = None) -> Row:
    """Exact per-rank parameter checksums and whether they agree (one small all-gather); for an
    FSDP2 model, the whole model's checksum (sum over the shards) on every rank."""
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    sharded = fsdp.is_sharded(ddp_model)
    return _weight_sync(fsdp.local_shards(params) if sharded else params, dist.get_world_size(process_group),
                        process_group, sharded=sharded)
