"""``testbed run --dry-run`` and ``testbed run --launcher torchrun``.

The dry run prints what a launch would do without touching a device: the backend and device the
scenario resolves to, which device every rank gets (from its LOCAL_RANK), the environment, the
exact torchrun command per node (multi-node flags included) and the expected memory per rank.
So an 8-NPU HCCL plan can be checked on a laptop. ``--launcher torchrun`` runs this node's
command for real and reads the record rank 0 writes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.scenario.spec import Scenario

DEFAULT_MASTER_PORT = 29500
TORCHRUN_GRACE_S = 60.0  # beyond the scenario's timeout_s, for process start-up and teardown


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The launcher options of ``testbed run``."""
    run.add_argument("--launcher", choices=("spawn", "torchrun"), default="spawn",
                     help="spawn: built-in, one node (default); torchrun: multi-device / multi-node")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved launch plan (backend, device per rank, env, command, memory); run nothing")
    run.add_argument("--nnodes", type=int, default=1, help="torchrun: number of nodes (world_size = nnodes × nproc)")
    run.add_argument("--node-rank", type=int, default=0, help="torchrun: this node's rank")
    run.add_argument("--master-addr", default="127.0.0.1", help="torchrun, multi-node: address of node 0")
    run.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help="torchrun, multi-node: port on node 0")


@dataclass
class LaunchPlan:
    scenario: Scenario
    scenario_path: Path
    launcher: str
    device_type: str
    backend: str
    nnodes: int
    nproc_per_node: int
    out_dir: str
    worker_args: list[str]
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def placements(self) -> list[tuple[int, int, int, str]]:
        """(rank, node, local_rank, device) for every rank."""
        out = []
        for rank in range(self.scenario.world_size):
            node, local = divmod(rank, self.nproc_per_node)
            out.append((rank, node, local, "cpu" if self.device_type == "cpu" else f"{self.device_type}:{local}"))
        return out

    def torchrun_args(self, node_rank: int) -> list[str]:
        if self.nnodes == 1:
            rdzv = ["--standalone"]
        else:
            rdzv = ["--nnodes", str(self.nnodes), "--node-rank", str(node_rank),
                    "--master-addr", self.master_addr, "--master-port", str(self.master_port)]
        return [*rdzv, "--nproc-per-node", str(self.nproc_per_node), "-m", "testbed.worker",
                str(self.scenario_path), "--out", self.out_dir, *self.worker_args]

    def command(self, node_rank: int) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        if self.launcher == "spawn":
            argv = ["testbed", "run", str(self.scenario_path), "--out", self.out_dir, *self.worker_args]
        else:
            argv = ["torchrun", *self.torchrun_args(node_rank)]
        return (env + " " if env else "") + shlex.join(argv)


def worker_args(args: argparse.Namespace) -> list[str]:
    """The overrides of ``testbed run`` forwarded verbatim to every rank."""
    out: list[str] = []
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    if args.world_size is not None:
        out += ["--world-size", str(args.world_size)]
    for item in args.set or []:
        out += ["--set", item]
    return out


def make_plan(scenario: Scenario, scenario_path: Path, args: argparse.Namespace, out_dir: str) -> LaunchPlan:
    from testbed.engine import device as devices

    notes: list[str] = []
    device_type = scenario.device
    if device_type == "auto":
        device_type = devices.resolve_device_type("auto")
        notes.append(f"device 'auto' resolves on each machine; here it is {device_type!r}")
    backend = devices.resolve_backend(scenario.backend, device_type)  # DeviceError on a bad pair
    nnodes = args.nnodes if args.launcher == "torchrun" else 1
    if nnodes < 1 or scenario.world_size % nnodes:
        raise ValueError(f"world_size {scenario.world_size} is not divisible by --nnodes {nnodes}")
    if not _present(device_type):
        needs = "torch_npu + the CANN toolkit" if device_type == "npu" else "a CUDA build of torch"
        notes.append(f"no {device_type!r} device on this machine: fine for --dry-run; the run itself needs {needs} "
                     f"and {scenario.world_size // nnodes} devices per node")
    plan = LaunchPlan(scenario, scenario_path, args.launcher, device_type, backend, nnodes,
                      scenario.world_size // nnodes, out_dir, worker_args(args), args.master_addr, args.master_port,
                      notes)
    plan.env = suggested_env(plan)
    notes.extend(_path_notes(scenario))
    notes.extend(_preflight_notes(scenario))
    return plan


def _preflight_notes(scenario: Scenario) -> list[str]:
    from testbed.engine.preflight import preflight
    from testbed.scenario.errors import ScenarioError

    try:
        preflight(scenario)
    except ScenarioError as e:
        return [f"the run would be refused: {e}"]
    return []


def _present(device_type: str) -> bool:
    import torch

    from testbed.engine import device as devices

    if device_type == "cuda":
        return torch.cuda.is_available()
    return devices.npu_available() if device_type == "npu" else True


def suggested_env(plan: LaunchPlan) -> dict[str, str]:
    """Per-node environment beyond what torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)."""
    s = plan.scenario
    env = {"OMP_NUM_THREADS": str(s.threads_per_rank)}
    visible = ",".join(str(i) for i in range(plan.nproc_per_node))
    if plan.device_type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = visible
    if plan.device_type == "npu":
        env["ASCEND_RT_VISIBLE_DEVICES"] = visible
    if plan.backend == "hccl":
        # Collective timeouts in seconds, matched to the scenario's own (worker: max(2 × stall, 30)).
        env["HCCL_CONNECT_TIMEOUT"] = str(int(max(120, s.stall_timeout_s)))
        env["HCCL_EXEC_TIMEOUT"] = str(int(max(s.stall_timeout_s * 2, 30)))
    return env


def _path_notes(scenario: Scenario) -> list[str]:
    notes = []
    for table, component in (("model", scenario.model), ("data", scenario.data)):
        for key in ("path", "tokenizer"):
            value = component.params.get(key)
            if isinstance(value, str) and not Path(value).exists():
                notes.append(f"[{table}] {key} = {value!r} does not exist on this machine (edit it, or copy the "
                             "files there before the run)")
    return notes


def format_plan(plan: LaunchPlan) -> str:
    from testbed.engine.memory import estimate

    s = plan.scenario
    per_rank = s.batch_size * s.grad_accum
    lines = [f"launch plan for {s.name!r} ({plan.scenario_path})",
             f"  launcher   {plan.launcher}: {plan.nnodes} node(s) × {plan.nproc_per_node} process(es) = "
             f"world_size {s.world_size}",
             f"  device     {plan.device_type} (asked: {s.device})",
             f"  backend    {plan.backend} (asked: {s.backend})",
             f"  model      {s.model.kind} {_params(s.model.params)}",
             f"  data       {s.data.kind} {_params(s.data.params)}",
             f"  batch      {s.batch_size} per micro-batch × grad_accum {s.grad_accum} = {per_rank} per rank per step; "
             f"{per_rank * s.world_size} per step in all",
             f"  optimizer  {s.optim.kind} {_params(s.optim.params)}; {s.steps} steps, seed {s.seed}",
             f"  lr         {s.schedule.name} schedule, {s.schedule.warmup(s.steps)} warmup step(s) (transformers' "
             "schedulers)" if not s.schedule.is_constant else "  lr         constant",
             "ranks"]
    lines += [f"  rank {r:<3} node {n}  LOCAL_RANK {lr}  {dev}" for r, n, lr, dev in plan.placements()]
    lines.append("environment (per node)")
    if plan.launcher == "torchrun":
        lines.append("  set by torchrun: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    else:
        lines.append("  set by the spawn launcher: rank layout via a TCPStore on a free port (no env needed)")
    lines += [f"  {k}={v}" for k, v in plan.env.items()]
    lines.append("command")
    lines += [f"  node {n}: {plan.command(n)}" for n in range(plan.nnodes)]
    memory = estimate(s) if s.parallel.kind == "ddp" else None
    lines.append("expected memory per rank")
    lines += ["  " + line for line in memory.lines()] if memory else [
        "  n/a (estimated for DDP only; fsdp2 shards weights, gradients and optimizer state)" if s.parallel.kind != "ddp"
        else "  n/a (estimated for [model] kind = 'hf' only)"]
    if plan.notes:
        lines.append("notes")
        lines += [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def default_out_dir(scenario: Scenario, args: argparse.Namespace) -> str:
    return args.out or f"runs/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_plan(scenario: Scenario, scenario_path: Path, args: argparse.Namespace) -> int:
    from testbed.engine.device import DeviceError

    try:
        plan = make_plan(scenario, scenario_path, args, default_out_dir(scenario, args))
    except (DeviceError, ValueError) as e:
        print(f"testbed: cannot plan this launch: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


def launch_torchrun(scenario: Scenario, scenario_path: Path, out_dir: Path, args: argparse.Namespace) -> Any:
    """Run this node's torchrun command (bounded by timeout_s) and return the RunResult rank 0 recorded.

    On node 0 the record is started here, before torchrun (status ``running``), and finished here
    whenever rank 0 could not: torchrun failing to bind a port in use, waiting for a second node
    that never comes (``--nnodes 2`` on one machine) until ``timeout_s``, or killed. So every ending
    leaves a final run.json (there was none before), with torchrun's last words as the reason.
    """
    from testbed.record.files import RUN_FILE, read_json
    from testbed.engine.finalize import finish_record, start_record
    from testbed.engine.proctree import kill_tree
    from testbed.engine.runner import RunResult

    plan = make_plan(scenario, scenario_path, args, str(out_dir))
    env = {**os.environ, **{k: v for k, v in plan.env.items() if k not in os.environ}}
    cmd = [sys.executable, "-m", "torch.distributed.run", *plan.torchrun_args(args.node_rank)]
    started = time.monotonic()
    run = start_record(scenario, out_dir, plan.backend, "torchrun") if args.node_rank == 0 else {}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    tail = _forward_stderr(proc)
    try:
        code = proc.wait(timeout=scenario.timeout_s + TORCHRUN_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun and its ranks (each rank runs in a session of its own)
        proc.wait()
        code = None
    tail.join(timeout=5.0)
    try:
        run = read_json(out_dir / RUN_FILE) if (out_dir / RUN_FILE).exists() else run
    except (OSError, ValueError):
        pass
    wall = time.monotonic() - started
    if run.get("status") in ("ok", "failed") and (code is not None or run["status"] == "failed"):
        return RunResult(run["status"], run.get("reason", ""), run.get("failed_rank"), run.get("failed_step"),
                         run.get("traceback"), run.get("wall_time_s") or wall, run.get("rank_reports", []))
    if code == 0 and args.node_rank != 0:
        return RunResult("ok", f"node {args.node_rank} finished; rank 0 writes the record on node 0",
                         wall_time_s=wall)
    last = next((line for line in reversed(tail.lines) if line.strip()), "")
    reason = (f"torchrun exceeded timeout_s + {TORCHRUN_GRACE_S:g} s and was killed" if code is None
              else f"torchrun exited with code {code} before rank 0 finished the record")
    if code is None and plan.nnodes > 1:
        reason += f" (waiting for {plan.nnodes} nodes at {plan.master_addr}:{plan.master_port}?)"
    result = RunResult("failed", reason + (f": {last.strip()[:300]}" if last and code is not None else ""),
                       wall_time_s=wall)
    if run.get("status") == "running":  # rank 0 never started, died, or was killed here
        finish_record(out_dir, run, result)
    return result


class _StderrTail:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.thread: Any = None

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def _forward_stderr(proc: Any, keep: int = 20) -> _StderrTail:
    """Copy torchrun's stderr to ours as it comes, keeping its last ``keep`` lines for the reason."""
    import threading

    tail = _StderrTail()

    def pump() -> None:
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            tail.lines = (tail.lines + [line])[-keep:]
            sys.stderr.write(line)
            sys.stderr.flush()

    tail.thread = threading.Thread(target=pump, name="torchrun-stderr", daemon=True)
    tail.thread.start()
    return tail
