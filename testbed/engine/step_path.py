"""The one path of a step's numbers, for the scenario runner's worker and the drop-in monitor alike.

``begin(step)`` asks the cadence (``scenario/cadence.py``) what the step runs and arms the comm hook
and the state check; ``end(step, loss)`` - after the optimizer step - builds the row:

1. the check-in (``engine/checkin.py``; the monitor's, the runner's launcher watches its ranks
   itself): every rank reached the step with the same plan, or an error naming the ranks;
2. at the first exchange only, every rank's settings (``engine/config.py``: one
   ``all_gather_object``) - their differences go into this first row;
3. the step's one all-gather (``engine/gather.py``) of each rank's loss, ‖g_i‖², g_i·ḡ, learning
   rate, the data ledger's fixed-size vector (``engine/data_tap.py``: what its training forwards
   consumed) and - on state-check steps - exact parameter and buffer checksums
   (``engine/state_check.py``; FSDP2: of its shards), plus the Gram shares of all-to-all buckets;
   on a state-check step whose checksums differ, one more all-gather of the per-tensor checksums
   names the first differing tensor;
4. the row (``metrics/row.py``, the ledger's ``DataLedger.update``), the caller's extra fields;
5. the sinks (``engine/sinks.py``): the row, then the non-finite events, then the built-in alarms
   (``engine/alarms.py``); with ``on_nonfinite="stop"``, ``NonFiniteStop`` on every rank.

A fix here is a fix for ``testbed run`` and for every monitored loop.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from testbed.engine import config as rank_settings
from testbed.engine import fsdp
from testbed.engine.alarms import Alarm, BuiltinAlarms
from testbed.engine.checkin import CheckIn
from testbed.engine.data_tap import DataTap
from testbed.engine.gather import all_gather_fields
from testbed.engine.hook import ConsistencyState, GradTransform
from testbed.engine.sinks import Sink
from testbed.engine.state_check import StateCheck
from testbed.metrics.config import config_differences
from testbed.metrics.ledger import DEFAULT_SAMPLES
from testbed.metrics.row import DOT_WITH_MEAN, LEDGER, LOCAL_LOSS, LOCAL_LR, SQ_NORM, build_row
from testbed.metrics.step import NoiseScaleEMA, brute_force
from testbed.scenario.cadence import Cadence, StepCadence
from testbed.schema import event as E
from testbed.schema import row as R
from testbed.schema.event import Event
from testbed.schema.row import Row

NONFINITE_KINDS = (R.NONFINITE_LOSS, R.NONFINITE_GRAD)


class NonFiniteStop(RuntimeError):
    """Raised on every rank when a non-finite value appears and the policy says stop.

    ``ranks`` are the flagged ranks (not the raising one), so a launcher blames the right rank.
    """

    def __init__(self, message: str, ranks: list[int] | None = None):
        super().__init__(message)
        self.ranks = ranks or []


class StepPath:
    """One model's per-step measurement (module doc). ``sinks`` and ``alarms`` may be changed
    between steps; every rank must call ``begin`` / ``end`` for the same steps."""

    def __init__(self, model: torch.nn.Module, state: ConsistencyState, cadence: Cadence, *, device: torch.device,
                 batch_size: int | None = None, noise_scale_ema: float = 0.9, last_step: int | None = None,
                 sinks: Sequence[Sink] = (), alarms: BuiltinAlarms | None = None, checkin: CheckIn | None = None,
                 on_nonfinite: str = "continue", self_check: bool = False, ledger_samples: int = DEFAULT_SAMPLES,
                 config: rank_settings.ConfigSource | None = None):
        if on_nonfinite not in ("continue", "stop"):
            raise ValueError(f"on_nonfinite must be 'continue' or 'stop', got {on_nonfinite!r}")
        self.model, self.state, self.cadence, self.device = model, state, cadence, device
        self.world_size, self.group = state.world_size, state.process_group
        self.batch_size, self.last_step = batch_size, last_step
        self.noise = NoiseScaleEMA(noise_scale_ema)
        self.sinks: list[Sink] = list(sinks)
        self.alarms, self.checkin, self.on_nonfinite = alarms, checkin, on_nonfinite
        self.sharded = fsdp.is_sharded(model)
        self.state_check = StateCheck(model, device=device, world_size=self.world_size, group=self.group)
        self.data = DataTap(model, world_size=self.world_size, device=device, samples=ledger_samples) \
            if ledger_samples else None
        self.config = config  # this rank's settings, exchanged at the first exchange (then None)
        self.self_check = self_check
        if self_check:
            self.state.keep_local = True  # the hook keeps every local bucket for the brute-force copy
        self.plan = StepCadence(False, False, False)
        self.step: int | None = None  # the step armed by begin
        self.last_state_check: int | None = None  # the last step whose row has the state check
        self.last_row: Row | None = None
        if checkin is not None:
            state.on_extra_backward = self._extra_backward

    # ---- the two calls of a step --------------------------------------------------------------
    def begin(self, step: int, grad_transforms: list[GradTransform] | None = None,
              generator: torch.Generator | None = None) -> StepCadence:
        """Arm the hook for ``step``'s backward (before its first forward) and return its plan."""
        self.step, self.plan = step, self.cadence.plan(step, self.last_step)
        self.state.begin_step(self.plan.measure, self.plan.pairwise, grad_transforms, generator, self.device)
        self.state_check.arm(self.plan.check_state)
        return self.plan

    def end(self, step: int, loss: torch.Tensor | float, *, lr: float | None = None,
            extra: Mapping[str, Any] | None = None) -> Row | None:
        """After the optimizer step: the row of ``step`` on every rank (None when the cadence skips
        it). ``loss``: this rank's loss (float64 is kept); ``lr``: the learning rate it stepped with."""
        plan = self.plan
        if not plan.collective:
            return None
        acc = self.state.acc if plan.measure or plan.pairwise else None
        fields = self._fields(loss, lr, plan.check_state)
        gram = acc.gram if acc is not None else None
        if self.checkin is not None:
            values = sum(f.numel() for f in fields.values())
            self.checkin.arrive(step, self.plan_of(plan, gram is not None, values), self.state.sync_backwards)
        differs = self._exchange_config()
        gathered = all_gather_fields(fields, gram, world_size=self.world_size, device=self.device, group=self.group)
        row = build_row(step, gathered.fields, gathered.gram, measure=plan.measure and acc is not None,
                        pairwise=plan.pairwise, batch_size=self.batch_size, noise=self.noise, sharded=self.sharded)
        self._exact_fields(row, gathered.fields, plan.check_state, differs)
        row.update(extra or {})  # type: ignore[typeddict-item]
        if self.self_check and plan.measure:
            row[R.SELF_CHECK] = self._self_check()  # type: ignore[literal-required]
        if plan.check_state:
            self.last_state_check = step
        self._emit(row)
        return row

    def final_check(self, step: int, extra: Mapping[str, Any] | None = None) -> Row:
        """The state check after the last step when its row had none (``Monitor.close``): a row with
        ``step``, the parameter checksums and ``final_check`` (no buffers: after the last forward they
        are each rank's own). Every rank must call it (one all-gather, two when they differ)."""
        fields = self.state_check.fields(with_buffers=False)
        gathered = all_gather_fields(fields, None, world_size=self.world_size, device=self.device, group=self.group)
        row = build_row(step, gathered.fields, None, measure=False, pairwise=False, batch_size=None, noise=self.noise,
                        sharded=self.sharded)
        self._exact_fields(row, gathered.fields, True, None)
        row.update({R.FINAL_CHECK: True, **(extra or {})})  # type: ignore[typeddict-item]
        self.last_state_check = step
        self._emit(row)
        return row

    def alarm(self, kind: str, message: str, *, step: int | None = None, ranks: Sequence[int] | None = None,
              **details: Any) -> Event:
        """An alarm event (the built-in ones and ``Monitor.alarm``) to every sink; returns it."""
        last = self.last_row or {}
        event: Event = {E.STEP: step if step is not None else last.get(R.STEP, -1), E.EVENT: E.ALARM,  # type: ignore[misc]
                        E.KIND: kind, E.MESSAGE: message, E.RANKS: list(ranks) if ranks is not None else None,
                        **details}
        if R.GLOBAL_STEP in last and event[E.STEP] == last.get(R.STEP):
            event[E.GLOBAL_STEP] = last[R.GLOBAL_STEP]  # type: ignore[literal-required]
        for sink in self.sinks:
            sink.write_event(event)
        return event

    def close(self) -> None:
        """Close every sink and disarm the hook (later backwards are plain averaging). Idempotent."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        self.state.begin_step(False, device=self.device)
        self.state.on_extra_backward = None
        self.state_check.close()
        if self.data is not None:
            self.data.close()

    # ---- internals ----------------------------------------------------------------------------
    @staticmethod
    def plan_of(plan: StepCadence, gram: bool, values: int) -> str:
        """The step's collective in words (the check-in compares it across ranks)."""
        return (f"measure={'yes' if plan.measure else 'no'},pairwise={'yes' if plan.pairwise else 'no'},"
                f"state check={'yes' if plan.check_state else 'no'},gram shares={'yes' if gram else 'no'},"
                f"values={values}")

    def _fields(self, loss: torch.Tensor | float, lr: float | None, check_state: bool) -> dict[str, torch.Tensor]:
        acc, zero = self.state.acc, torch.zeros((), dtype=torch.float64, device=self.device)
        fields = {
            LOCAL_LOSS: _scalar(loss, self.device),
            SQ_NORM: acc.sq_norm if acc is not None else zero,
            DOT_WITH_MEAN: acc.dot_with_mean if acc is not None else zero,
            LOCAL_LR: torch.tensor(math.nan if lr is None else float(lr), dtype=torch.float64, device=self.device),
        }
        if self.data is not None:
            fields[LEDGER] = self.data.payload()
        if check_state:
            fields.update(self.state_check.fields())
        return fields

    def _exchange_config(self) -> list[dict[str, Any]] | None:
        """At the first exchange: every rank's settings, and the keys whose values differ."""
        source, self.config = self.config, None
        if source is None or self.world_size < 2:
            return None
        return config_differences(rank_settings.exchange(source(), self.world_size, self.group))

    def _exact_fields(self, row: Row, gathered: Mapping[str, Any], check_state: bool,
                      config_differs: list[dict[str, Any]] | None) -> None:
        """The ledger's data fields, the per-tensor round of a state check whose totals differ, the
        settings that differ (first row)."""
        if self.data is not None and LEDGER in gathered:
            row.update(self.data.ledger.update(gathered[LEDGER]))  # type: ignore[typeddict-item]
        if check_state:
            differs = self.state_check.second_round(dict(gathered))
            if differs:
                row[R.STATE_DIFFERS] = differs  # type: ignore[literal-required]
        if config_differs:
            row[R.CONFIG_DIFFERS] = config_differs  # type: ignore[literal-required]

    def _emit(self, row: Row) -> None:
        """The row, then its non-finite events, then the alarms, to every sink; then the stop policy."""
        self.last_row = row
        for sink in self.sinks:
            sink.write_row(row)
        bad = [f for f in row.get(R.FLAGS, []) if f.get(R.FLAG_KIND) in NONFINITE_KINDS]
        for flag in bad:
            event: Event = {E.STEP: row[R.STEP], E.EVENT: flag[R.FLAG_KIND], E.RANK: flag[R.FLAG_RANK]}  # type: ignore[misc]
            for sink in self.sinks:
                sink.write_event(event)
        for found in self.alarms.check(row) if self.alarms is not None else []:
            self._raise(found)
        if bad and self.on_nonfinite == "stop":
            what = ", ".join(f"{f[R.FLAG_KIND]} on rank {f[R.FLAG_RANK]}" for f in bad)
            ranks = sorted({f[R.FLAG_RANK] for f in bad if f[R.FLAG_RANK] is not None})
            raise NonFiniteStop(f"non-finite values at step {row[R.STEP]}: {what} (on_nonfinite = 'stop')", ranks)

    def _raise(self, found: Alarm) -> None:
        self.alarm(found.kind, found.message, step=found.step, ranks=found.ranks, **found.details)

    def _extra_backward(self, backwards: int) -> None:
        """The hook saw a second synchronising backward without ``end``: tell the waiting peers."""
        if self.checkin is not None and self.step is not None:
            try:
                self.checkin.mark_extra_backward(self.step, backwards)
            except Exception:  # noqa: BLE001 - never break the user's backward over a store hiccup
                pass

    def _self_check(self) -> dict[str, Any]:
        """Test/debug only: all-gather the full local gradients and compute the metrics directly."""
        local = torch.cat([b.reshape(-1) for b in self.state.local_buckets]).double()
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        return brute_force(torch.stack(gathered).cpu().numpy())


def _scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)
