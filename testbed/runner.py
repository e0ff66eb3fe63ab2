"""The spawn launcher: N real processes on one machine, a c10d store on a free port, every wait
bounded, and a failure report that names the rank, the step and its traceback.

The parent hosts the TCPStore (port 0 → the OS picks a free port, so parallel runs never clash)
and watches the ranks. It ends the run when all ranks exit, when one fails (after a short grace
for its peers to report), when the shared progress counters stop moving for
``stall_timeout_s`` (a hung rank), or at ``timeout_s``. Whatever happens, no rank survives it.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.record import RUN_FILE, environment, read_json, write_json_atomic
from testbed.spec import Scenario

GRACE_S = 10.0  # how long peers of a failed rank get to write their own reports
POLL_S = 0.05


@dataclass
class RunResult:
    """What the launcher learned; mirrored into run.json."""

    out_dir: Path
    status: str  # "ok" | "failed"
    reason: str = ""
    failed_rank: int | None = None
    failed_step: int | None = None
    traceback: str | None = None
    wall_time_s: float = 0.0
    rank_reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rank_main(scenario_dict: dict[str, Any], rank: int, world_size: int, port: int, out_dir: str,
               progress: Any) -> None:
    """Entry point of a spawned rank: join the store, train, report any failure to a file."""
    import torch.distributed as dist

    from testbed import worker

    scenario = Scenario.from_dict(scenario_dict)
    ctx = worker.RankContext(rank, world_size, rank, Path(out_dir), progress=progress)
    try:
        ctx.store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                                  timeout=datetime.timedelta(seconds=scenario.stall_timeout_s))
        worker.train(scenario, ctx)
    except BaseException as exc:  # noqa: BLE001 — every failure must reach the report
        worker.write_error_report(ctx, exc)
        sys.stderr.write(f"[testbed] rank {rank} failed at step {ctx.step}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(1)


def start_record(scenario: Scenario, out_dir: Path, backend: str, launcher: str) -> dict[str, Any]:
    """Write run.json with status 'running' before any rank starts (so a killed run still has one)."""
    run = {
        "scenario": scenario.to_dict(),
        "seeds": {"scenario": scenario.seed},
        "status": "running",
        "launcher": launcher,
        "started_at": time.time(),
        "environment": environment(backend, scenario.world_size, scenario.device),
    }
    write_json_atomic(out_dir / RUN_FILE, run)
    return run


def finish_record(out_dir: Path, run: dict[str, Any], result: RunResult) -> None:
    run.update({
        "status": result.status,
        "reason": result.reason,
        "failed_rank": result.failed_rank,
        "failed_step": result.failed_step,
        "traceback": result.traceback,
        "wall_time_s": result.wall_time_s,
        "rank_reports": result.rank_reports,
    })
    write_json_atomic(out_dir / RUN_FILE, run)


def launch(scenario: Scenario, out_dir: Path) -> RunResult:
    """Run the scenario with the spawn launcher; always returns (never hangs, never leaks ranks)."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = start_record(scenario, out_dir, scenario.backend, "spawn")
    started = time.monotonic()
    n = scenario.world_size
    store = dist.TCPStore("127.0.0.1", 0, n + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=scenario.stall_timeout_s))
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", [-1] * n, lock=False)
    procs = [ctx.Process(target=_rank_main, name=f"testbed-rank{r}",
                         args=(scenario.to_dict(), r, n, store.port, str(out_dir), progress))
             for r in range(n)]
    try:
        for p in procs:
            p.start()
        result = _watch(scenario, procs, progress, out_dir, started)
    finally:
        _kill_all(procs)
        del store
    result.wall_time_s = time.monotonic() - started
    finish_record(out_dir, run, result)
    return result


def _watch(scenario: Scenario, procs: list[Any], progress: Any, out_dir: Path, started: float) -> RunResult:
    exit_order: list[int] = []
    last_progress, last_change = list(progress), time.monotonic()
    failure_seen_at: float | None = None
    while True:
        now = time.monotonic()
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in exit_order:
                exit_order.append(r)
                if p.exitcode != 0 and failure_seen_at is None:
                    failure_seen_at = now
        if len(exit_order) == len(procs):
            break
        if failure_seen_at is not None and now - failure_seen_at > GRACE_S:
            break
        current = list(progress)
        if current != last_progress:
            last_progress, last_change = current, now
        if failure_seen_at is None and now - last_change > scenario.stall_timeout_s:
            return _hang_result(out_dir, current, scenario)
        if now - started > scenario.timeout_s:
            return _timeout_result(out_dir, current, scenario)
        time.sleep(POLL_S)
    codes = [p.exitcode for p in procs]
    if all(c == 0 for c in codes):
        return RunResult(out_dir, "ok")
    return _failure_result(out_dir, procs, exit_order, list(progress))


def _rank_reports(out_dir: Path) -> list[dict[str, Any]]:
    reports = []
    for path in sorted((out_dir / "ranks").glob("rank*.json")):
        try:
            reports.append(read_json(path))
        except (OSError, ValueError):
            continue
    return reports


_SECONDARY = ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out", "timed out",
              "NCCL communicator was aborted", "recvBytes", "Socket Timeout")


def _is_secondary(report: dict[str, Any]) -> bool:
    """A rank that failed only because a peer disappeared (not the root cause)."""
    return any(marker in report.get("error", "") for marker in _SECONDARY)


def _failure_result(out_dir: Path, procs: list[Any], exit_order: list[int], progress: list[int]) -> RunResult:
    reports = {r["rank"]: r for r in _rank_reports(out_dir)}
    failed = [r for r in exit_order if procs[r].exitcode not in (0, None)]
    primary = [r for r in failed if r in reports and not _is_secondary(reports[r])]
    silent = [r for r in failed if r not in reports]  # died without a report: killed or os._exit
    root = (primary or silent or failed or [None])[0]
    if root is None:
        return RunResult(out_dir, "failed", "a rank did not exit", rank_reports=list(reports.values()))
    report = reports.get(root)
    code = procs[root].exitcode
    if report is not None:
        reason = f"rank {root} failed at step {report['step']}: {report['error']}"
        step, tb = report["step"], report["traceback"]
    else:
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        reason = f"rank {root} died without a report ({how})"
        step, tb = _step_of(progress[root]), None
    return RunResult(out_dir, "failed", reason, root, step, tb, rank_reports=list(reports.values()))


def _step_of(progress_value: int) -> int | None:
    from testbed.worker import PHASES

    return progress_value // PHASES if progress_value >= 0 else None


def _laggard(progress: list[int]) -> tuple[int | None, int | None]:
    """The rank furthest behind, and its step, if it is unambiguous."""
    low = min(progress)
    behind = [r for r, v in enumerate(progress) if v == low]
    return (behind[0] if len(behind) == 1 else None), _step_of(low)


def _hang_result(out_dir: Path, progress: list[int], scenario: Scenario) -> RunResult:
    rank, step = _laggard(progress)
    who = f"rank {rank}" if rank is not None else "ranks " + ", ".join(map(str, range(len(progress))))
    reason = (f"no progress for {scenario.stall_timeout_s:g} s: {who} stuck at step {step} "
              f"(stall_timeout_s; progress counters {progress})")
    return RunResult(out_dir, "failed", reason, rank, step, rank_reports=_rank_reports(out_dir))


def _timeout_result(out_dir: Path, progress: list[int], scenario: Scenario) -> RunResult:
    rank, step = _laggard(progress)
    reason = f"run exceeded timeout_s = {scenario.timeout_s:g} s (slowest rank {rank}, step {step})"
    return RunResult(out_dir, "failed", reason, rank, step, rank_reports=_rank_reports(out_dir))


def _kill_all(procs: list[Any]) -> None:
    """Terminate, then kill, then join every rank; bounded in time."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)
