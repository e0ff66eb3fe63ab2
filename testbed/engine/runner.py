"""The spawn launcher: N real processes on one machine, a c10d store on a free port, every wait
bounded, and a failure report that names the rank, the step and its traceback.

The parent hosts the TCPStore (port 0 → the OS picks a free port, so parallel runs never clash)
and watches the ranks. It ends the run when all ranks exit, when one fails (after a short grace
for its peers to report), when the shared progress counters stop moving for
``stall_timeout_s`` (a hung rank), or at ``timeout_s``. Whatever happens, no rank survives it.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.diagnose.verdict import verdict_record
from testbed.record.files import (EVENTS_FILE, METRICS_FILE, RUN_FILE, environment, read_json, read_jsonl,
                                  read_metrics, write_json_atomic)
from testbed.engine.preflight import preflight
from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import Scenario

GRACE_S = 10.0  # how long peers of a failed rank get to write their own reports
POLL_S = 0.05
# Until every rank has started step 0 (imports, model build, rendezvous: slow on a loaded machine
# or with a big checkpoint) the stall limit is at least this long; timeout_s still bounds it.
STARTUP_S = 300.0
STACK_WAIT_S = 1.0  # how long a hung rank gets to dump its Python stack (faulthandler, SIGUSR1)
# What a previous run in the same directory may have left; removed so it cannot mix with this one.
STALE_RECORD = (METRICS_FILE, EVENTS_FILE, "timing.jsonl", "ranks/rank*.json", "ranks/rank*.stack",
                "ranks/rank*.final.pt")


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

    from testbed.engine import worker

    scenario = Scenario.from_dict(scenario_dict)
    ctx = worker.RankContext(rank, world_size, rank, Path(out_dir), progress=progress)
    _exit_with_parent(os.getppid())
    _stack_dump_on_signal(Path(out_dir), rank)
    try:
        # The store's timeout bounds the rendezvous, which waits for the slowest rank's start-up.
        timeout = datetime.timedelta(seconds=max(scenario.stall_timeout_s, STARTUP_S))
        ctx.store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timeout)
        worker.train(scenario, ctx)
    except BaseException as exc:  # noqa: BLE001 — every failure must reach the report
        worker.write_error_report(ctx, exc)
        sys.stderr.write(f"[testbed] rank {rank} failed at step {ctx.step}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    """A rank must never outlive its launcher (SIGKILLed, or killed by a CI timeout before its
    cleanup ran). On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG);
    elsewhere a daemon thread polls for re-parenting. (Not the thread on Linux: with a daemon
    thread alive at interpreter exit, 2 of 15 runs of scenarios/faults/nan_grad.toml had a rank
    abort in teardown with "terminate called without an active exception"; torch 2.13, Python 3.11.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the launcher died before the request took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="testbed-parent-watch", daemon=True).start()


_stack_files: list[Any] = []  # kept open for faulthandler, which writes to the raw descriptor


def _stack_dump_on_signal(out_dir: Path, rank: int) -> None:
    """On SIGUSR1 the rank writes every thread's Python stack to ``ranks/rank{r}.stack``, from a C
    signal handler, so even a rank stuck in a sleep or a collective can say where it is."""
    if not hasattr(signal, "SIGUSR1"):
        return
    path = out_dir / "ranks" / f"rank{rank}.stack"
    path.parent.mkdir(parents=True, exist_ok=True)
    _stack_files.append(open(path, "w", encoding="utf-8"))
    faulthandler.register(signal.SIGUSR1, file=_stack_files[-1], all_threads=True)


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
    """Final status; also the non-finite events (a run that goes on past a NaN is "ok" but must
    not look clean: ``nonfinite.first`` names the rank and step where it began)."""
    bad = [e for e in read_jsonl(out_dir / EVENTS_FILE) if str(e.get("event", "")).startswith("nonfinite")]
    run.update({
        "status": result.status,
        "reason": result.reason,
        "failed_rank": result.failed_rank,
        "failed_step": result.failed_step,
        "traceback": result.traceback,
        "wall_time_s": result.wall_time_s,
        "rank_reports": result.rank_reports,
        "nonfinite": {"count": len(bad), "first": bad[0] if bad else None},
        # over the completed steps, also of a failed run (docs/diagnosis.md)
        "verdict": verdict_record(read_metrics(out_dir), world_size=run.get("scenario", {}).get("world_size")),
    })
    write_json_atomic(out_dir / RUN_FILE, run)


def launch(scenario: Scenario, out_dir: Path) -> RunResult:
    """Run the scenario with the spawn launcher; always returns (never hangs, never leaks ranks)."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_record(out_dir)
    run = start_record(scenario, out_dir, scenario.backend, "spawn")
    started = time.monotonic()
    try:
        preflight(scenario)
    except ScenarioError as e:  # bound to fail on every rank: recorded, no rank started
        result = RunResult(out_dir, "failed", f"refused before the ranks started: {e}")
        finish_record(out_dir, run, result)
        return result
    n = scenario.world_size
    store = dist.TCPStore("127.0.0.1", 0, n + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=scenario.stall_timeout_s))
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", [-1] * n, lock=False)
    procs = [ctx.Process(target=_rank_main, name=f"testbed-rank{r}",
                         args=(scenario.to_dict(), r, n, store.port, str(out_dir), progress))
             for r in range(n)]
    result = RunResult(out_dir, "failed", "the launcher stopped before the ranks finished")
    try:
        for p in procs:
            p.start()
        result = _watch(scenario, procs, progress, out_dir, started)
    except BaseException as exc:  # Ctrl-C or a launcher bug: recorded in run.json, then re-raised
        result = RunResult(out_dir, "failed", f"launcher interrupted: {type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(), rank_reports=_rank_reports(out_dir))
        raise
    finally:
        _kill_all(procs)
        del store
        result.wall_time_s = time.monotonic() - started
        finish_record(out_dir, run, result)
    return result


def _remove_stale_record(out_dir: Path) -> None:
    """A run directory holds one run: rows or error reports of an earlier run there would be
    mixed into this one's (appended metrics, a stale report taken for the root cause)."""
    for pattern in STALE_RECORD:
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _watch(scenario: Scenario, procs: list[Any], progress: Any, out_dir: Path, started: float) -> RunResult:
    exit_order: list[int] = []
    last_progress, last_change = list(progress), time.monotonic()
    failure_seen_at: float | None = None
    finished_at: float | None = None  # when every rank had done all its work (teardown left)
    finished = _finished_progress(scenario)
    while True:
        now = time.monotonic()
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in exit_order:
                exit_order.append(r)
                # leaving before finishing is a failure whatever the exit code (sys.exit(0) too)
                if progress[r] < finished and failure_seen_at is None:
                    failure_seen_at = now
        if len(exit_order) == len(procs):
            break
        if failure_seen_at is not None and now - failure_seen_at > GRACE_S:
            break
        current = list(progress)
        if current != last_progress:
            last_progress, last_change = current, now
        if min(current) >= finished:  # only teardown left: no stall check, a bounded wait
            finished_at = now if finished_at is None else finished_at
            if now - finished_at > GRACE_S:
                break
        else:
            stall_limit = scenario.stall_timeout_s if min(current) >= 0 else max(scenario.stall_timeout_s, STARTUP_S)
            if failure_seen_at is None and now - last_change > stall_limit:
                return _hang_result(out_dir, current, stall_limit, procs)
            if now - started > scenario.timeout_s:
                return _timeout_result(out_dir, current, scenario)
        time.sleep(POLL_S)
    if min(progress) >= finished:
        return _finished_result(out_dir, procs)
    return _failure_result(out_dir, procs, exit_order, list(progress), finished)


def _finished_progress(scenario: Scenario) -> int:
    """The progress value a rank writes once its last step and the final barrier are done."""
    from testbed.engine.worker import PHASE_START, PHASES

    return scenario.steps * PHASES + PHASE_START


def _finished_result(out_dir: Path, procs: list[Any]) -> RunResult:
    """Every rank finished every step and the final barrier: the record is complete, so the run
    is ok even if a rank then crashed or hung in teardown (noted in the reason)."""
    notes = [f"rank {r} {'did not exit within %g s (killed)' % GRACE_S if p.exitcode is None else _how(p.exitcode)}"
             for r, p in enumerate(procs) if p.exitcode != 0]
    reason = "all steps finished; then during teardown " + "; ".join(notes) if notes else ""
    return RunResult(out_dir, "ok", reason)


def _how(code: int) -> str:
    return f"died of signal {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


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


def _failure_result(out_dir: Path, procs: list[Any], exit_order: list[int], progress: list[int],
                    finished: int) -> RunResult:
    """Pick the root cause: a rank's own error over a peer's "connection closed", then a rank that
    died without a report (os._exit, a signal), then one that exited 0 mid-run; earliest first."""
    reports = {r["rank"]: r for r in _rank_reports(out_dir)}
    unfinished = [r for r in exit_order if progress[r] < finished]  # a crash in teardown is no root cause
    failed = [r for r in unfinished if procs[r].exitcode != 0]
    early = [r for r in unfinished if procs[r].exitcode == 0]
    primary = [r for r in failed if r in reports and not _is_secondary(reports[r])]
    silent = [r for r in failed if r not in reports]
    root = (primary or silent or early or failed or [None])[0]
    if root is None:
        codes = [p.exitcode for p in procs]
        return RunResult(out_dir, "failed", f"ranks ended unfinished (exit codes {codes}, progress {progress})",
                         rank_reports=list(reports.values()))
    report = reports.get(root)
    tb: str | None = None
    if report is not None and report.get("nonfinite_ranks"):  # every rank stops: blame the flagged one
        step, root = report.get("step"), report["nonfinite_ranks"][0]
        reason = report["error"].removeprefix("NonFiniteStop: ")
    elif report is not None:
        step, tb = report.get("step"), report.get("traceback")
        reason = f"rank {root} failed at step {step}: {report['error']}"
    else:
        step, code = _step_of(progress[root]), procs[root].exitcode
        how = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        what = "exited before finishing" if root in early else "died without a report"
        reason = f"rank {root} {what} at step {step} ({how})"
    return RunResult(out_dir, "failed", reason, root, step, tb, rank_reports=list(reports.values()))


def _step_of(progress_value: int) -> int | None:
    from testbed.engine.worker import PHASES

    return progress_value // PHASES if progress_value >= 0 else None


def _laggard(progress: list[int]) -> tuple[int | None, int | None]:
    """The rank furthest behind, and its step, if it is unambiguous."""
    low = min(progress)
    behind = [r for r, v in enumerate(progress) if v == low]
    return (behind[0] if len(behind) == 1 else None), _step_of(low)


def _hang_result(out_dir: Path, progress: list[int], limit: float, procs: list[Any]) -> RunResult:
    """Name the rank furthest behind and attach its Python stack (dumped on SIGUSR1)."""
    rank, step = _laggard(progress)
    low = min(progress)
    who = f"rank {rank}" if rank is not None else "ranks " + ", ".join(
        str(r) for r, v in enumerate(progress) if v == low)
    where = f"step {step}" if step is not None else "start-up (before step 0)"
    reason = f"no progress for {limit:g} s: {who} stuck at {where} (stall_timeout_s; progress counters {progress})"
    stacks = _dump_stacks(out_dir, procs)
    stuck = [r for r, v in enumerate(progress) if v == low]
    tb = next((stacks[r] for r in stuck if stacks.get(r)), None)
    return RunResult(out_dir, "failed", reason, rank, step, tb, rank_reports=_rank_reports(out_dir))


def _dump_stacks(out_dir: Path, procs: list[Any]) -> dict[int, str]:
    """Ask every live rank for its Python stack; ``{rank: text}`` for those that answered."""
    if not hasattr(signal, "SIGUSR1"):
        return {}
    asked = []
    for r, p in enumerate(procs):
        if p.is_alive() and p.pid is not None:
            try:
                os.kill(p.pid, signal.SIGUSR1)
                asked.append(r)
            except OSError:
                continue
    deadline = time.monotonic() + STACK_WAIT_S
    stacks: dict[int, str] = {}
    while asked and time.monotonic() < deadline and len(stacks) < len(asked):
        time.sleep(POLL_S)
        for r in asked:
            text = _read_text(out_dir / "ranks" / f"rank{r}.stack")
            if text.strip():
                stacks[r] = text
    return stacks


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _timeout_result(out_dir: Path, progress: list[int], scenario: Scenario) -> RunResult:
    rank, step = _laggard(progress)
    reason = f"run exceeded timeout_s = {scenario.timeout_s:g} s (slowest rank {rank}, step {step})"
    return RunResult(out_dir, "failed", reason, rank, step, rank_reports=_rank_reports(out_dir))


def _kill_all(procs: list[Any]) -> None:
    """Terminate, then kill, then join every rank; bounded in time."""
    started = [p for p in procs if p.pid is not None]  # a failed start leaves some never started
    for p in started:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in started:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in started:
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)
