"""What ``attach`` checks and builds before a ``Monitor`` exists: a model it can measure (or an error
that says what is wrong), the check-in over the job's store, the output sinks, and the stack level
that makes a warning point at the user's call."""
from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.engine import fsdp
from testbed.engine.checkin import CheckIn, default_store
from testbed.engine.sinks import JsonlSink, LoggerSink, Sink
from testbed.integrations.run_record import MonitorRecord

_PACKAGE_DIR = os.path.dirname(os.path.abspath(testbed.__file__))
_attach_count = itertools.count()  # the same sequence on every rank: the monitors' store prefixes agree


def checked_model(model: torch.nn.Module, process_group: dist.ProcessGroup | None) -> torch.nn.Module:
    """``model`` if ``attach`` can measure it; else an error that names the cause."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "testbed.attach: torch.distributed is not initialised - this is a single process, so there are no ranks "
            "to compare. Start the script with several processes (torchrun --nproc-per-node N, accelerate launch "
            "--num_processes N; `accelerate launch --cpu` alone starts one) and wrap the model in "
            "DistributedDataParallel or fully_shard before attaching")
    if fsdp.is_sharded(model) or isinstance(model, DDP):
        return model
    if dist.get_world_size(process_group) == 1:
        raise RuntimeError(f"testbed.attach: only one process (world size 1), and the model is a plain "
                           f"{type(model).__name__} (not wrapped in DistributedDataParallel): start more processes "
                           "(torchrun --nproc-per-node N, accelerate launch --num_processes N)")
    raise TypeError("attach needs a torch.nn.parallel.DistributedDataParallel model or an FSDP2 model "
                    f"(torch.distributed.fsdp.fully_shard), got {type(model).__name__} (with Accelerate: the model "
                    "accelerator.prepare returned)")


@dataclass
class Owned:
    """What ``attach`` holds before the hook goes in: the check-in and the claimed run record."""

    checkin: CheckIn | None
    record: MonitorRecord | None


def claim(group: dist.ProcessGroup | None, out_dir: str | Path | None, overwrite: bool,
          step_timeout_s: float | None) -> Owned:
    """The check-in over the job's store and, with ``out_dir``, the claimed record (RunDirError on
    every rank when it is not free). ``out_dir`` becomes absolute: a script that changes directory
    later still finalizes this record."""
    checkin = attach_checkin(default_store(group), group, step_timeout_s)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    record = MonitorRecord(Path(out_dir).absolute(), rank, world_size, checkin) if out_dir is not None else None
    if record is not None:
        record.claim(overwrite)
    return Owned(checkin, record)


def attach_checkin(store: Any, group: dist.ProcessGroup | None, step_timeout_s: float | None) -> CheckIn | None:
    """The monitor's check-in (engine/checkin.py), or None with one rank or no store.
    ``step_timeout_s``: None = derived from the step times; 0 = no per-step check-in (the
    attach-time exchanges still use the store, with the default deadline)."""
    if step_timeout_s is not None and step_timeout_s < 0:
        raise ValueError(f"step_timeout_s must be >= 0 (0 = no check-in), got {step_timeout_s}")
    n = next(_attach_count)
    world_size = dist.get_world_size(group)
    if world_size == 1 or store is None:
        return None
    tag = getattr(group, "group_name", None) or "default"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
    return CheckIn(store, f"testbed/monitor/{restart}/{tag}/{n}", dist.get_rank(group), world_size,
                   timeout_s=step_timeout_s or None)


def build_sinks(monitor: Any, tensorboard: str | Path | None) -> list[Sink]:
    """Rank 0's outputs: the record's jsonl files, the ``testbed`` logger, TensorBoard."""
    if monitor.rank != 0:
        return []
    sinks: list[Sink] = [JsonlSink(monitor.out_dir)] if monitor.out_dir is not None else []
    sinks.append(LoggerSink())
    if tensorboard is not None:
        from testbed.integrations.tensorboard import TensorBoardSink  # torch.utils.tensorboard only when asked for

        sinks.append(TensorBoardSink(tensorboard))
    return sinks


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made inside testbed that names the first frame
    outside it - the user's ``monitor.step(...)`` line, however many testbed calls lie between."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
