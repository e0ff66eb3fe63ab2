"""Checks that need this machine, done in the launcher before any process starts.

``scenario/`` validates a file without torch; whether ``device = "cuda"`` exists, whether
``backend = "nccl"`` works with the device, and whether ``world_size`` ranks fit the cores and
the memory can only be answered here. A wrong device or backend used to surface as a traceback
in every rank at "step -1"; now it is one ``ScenarioError`` naming the field. Sizes beyond the
machine are warnings (a run may still be meant: a stress test), never silent.

Components too: a registered model / data / optimizer function may carry a ``preflight(source,
params)`` attribute that raises ``ScenarioError`` for a setting that is valid in the file but bound
to fail on every rank with these files (e.g. a tokenizer that needs ``trust_remote_code``). Files
that are not on this machine are not checked (a plan may be made on a laptop). An lr schedule
needs transformers (``testbed.workloads.optim.build_scheduler``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from testbed.engine import device as devices
from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import Scenario
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS

#: resident memory of one CPU rank of a small scenario (torch, gloo, the model): measured on this
#: 2-core machine, see docs/reliability.md ("Machine warnings") for the command and the numbers
RANK_MEMORY_MB = 312
#: more ranks × threads than this many per core time-share so much that steps crawl and start-up or
#: teardown can outlast the launcher's limits (6 ranks on 2 cores: see docs/reliability.md)
OVERSUBSCRIPTION = 2


def check_devices(scenario: Scenario, launcher: str = "spawn") -> str:
    """The device type this run will use; ScenarioError naming ``device``/``backend``/``world_size``."""
    try:
        device_type = devices.resolve_device_type(scenario.device)
    except devices.DeviceError as e:
        raise ScenarioError(scenario.source, "device", f"a device present on this machine ({e})",
                            scenario.device) from None
    try:
        devices.resolve_backend(scenario.backend, device_type)
    except devices.DeviceError as e:
        raise ScenarioError(scenario.source, "backend", f"a backend for device {device_type!r} ({e})",
                            scenario.backend) from None
    if launcher == "spawn" and device_type != "cpu":  # one node: a device per rank
        count = devices.device_count(device_type)
        if scenario.world_size > count:
            raise ScenarioError(scenario.source, "world_size", f"at most {count} here (one {device_type} "
                                "device per rank; more ranks need more nodes: --launcher torchrun)",
                                scenario.world_size)
    return device_type


def machine_warnings(scenario: Scenario, device_type: str = "cpu") -> list[str]:
    """Sizes this machine cannot hold comfortably: cores and memory (one line each)."""
    out = []
    cores = cpu_cores()
    threads = scenario.world_size * scenario.threads_per_rank
    if device_type == "cpu" and threads > OVERSUBSCRIPTION * cores:
        out.append(f"world_size {scenario.world_size} × threads_per_rank {scenario.threads_per_rank} = {threads} "
                   f"threads on {cores} CPU core(s): the ranks will time-share (slow steps; raise stall_timeout_s "
                   "and timeout_s, or use fewer ranks)")
    elif scenario.threads_per_rank > cores:
        out.append(f"threads_per_rank {scenario.threads_per_rank} is more than the {cores} CPU core(s) here")
    available = available_memory_mb()
    need = scenario.world_size * RANK_MEMORY_MB
    if available is not None and need > available:
        out.append(f"world_size {scenario.world_size} × ~{RANK_MEMORY_MB} MB per rank = ~{need} MB, but only "
                   f"{available} MB of memory is available here (ranks may be killed by the OOM killer)")
    return out


def check_components(scenario: Scenario) -> None:
    """Run every component's ``preflight`` and the size check (``engine.memory.check_fits``);
    raises ScenarioError naming the file and field."""
    from testbed.engine.memory import check_fits

    check_fits(scenario)
    if not scenario.schedule.is_constant and importlib.util.find_spec("transformers") is None:
        raise ScenarioError(scenario.source, "optim.schedule", "'constant' without warmup, or transformers installed "
                            "(pip install -e '.[hf]'): warmup and decay use transformers' schedulers",
                            scenario.schedule.name)
    for component, registry in ((scenario.model, MODELS), (scenario.data, DATASETS), (scenario.optim, OPTIMIZERS)):
        check = getattr(registry.get(component.kind), "preflight", None)
        if check is not None:
            check(scenario.source, component.params)


def preflight(scenario: Scenario, launcher: str = "spawn") -> list[str]:
    """Every check before launch: raises ScenarioError on what cannot run here, returns the warnings."""
    check_components(scenario)
    return machine_warnings(scenario, check_devices(scenario, launcher))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory_mb() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no warning rather than a guess)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
