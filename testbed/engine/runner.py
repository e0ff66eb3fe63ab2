"""The spawn launcher: N real processes on one machine, a c10d store on a free port, every wait
bounded, and a failure report that names the rank, the step and its traceback.

The parent hosts the TCPStore on a socket it binds to 127.0.0.1 itself (port 0 → the OS picks a
free port, so parallel runs never clash; TCPStore alone would listen on every interface, where any
host could read and set the rendezvous keys mid-run), and the ranks' gloo transport is pinned to
the loopback interface: a single-node run opens no port beyond loopback. It watches the ranks. It ends the run when all ranks exit, when one fails (after a short grace
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
from pathlib import Path
from typing import Any

from testbed.engine.finalize import Ending, finish_record, remove_stale_record, start_record
from testbed.engine.preflight import check_components, check_devices
from testbed.engine.loopback import loopback_interface, loopback_store
from testbed.engine.signals import LauncherStopped, StopOnSignals, check_stop
from testbed.engine.teardown_wait import TeardownWait
from testbed.record.files import read_json
from testbed.record.rundir import DirLock, claim_run_dir
from testbed.record.safeio import open_record
from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import Scenario

__all__ = ["RunResult", "launch", "start_record", "finish_record", "LauncherStopped"]

GRACE_S = 10.0  # how long peers of a failed rank get to write their own reports
# After the last step a rank still exiting (using CPU) is waited for up to this long; one idle for
# GRACE_S is killed (engine/teardown_wait.py). timeout_s bounds it too.
TEARDOWN_MAX_S = 120.0
POLL_S = 0.05
# Until every rank has started step 0 (imports, model build, rendezvous: slow on a loaded machine
# or with a big checkpoint) the stall limit is at least this long; timeout_s still bounds it.
STARTUP_S = 300.0
STACK_WAIT_S = 1.0  # how long a hung rank gets to dump its Python stack (faulthandler, SIGUSR1)
_remove_stale_record = remove_stale_record  # the name torchrun.py imports


RunResult = Ending  # what the launcher learned, mirrored into run.json (engine/finalize.py)


def _rank_main(scenario_dict: dict[str, Any], rank: int, world_size: int, port: int, out_dir: str,
               progress: Any) -> None:
    """Entry point of a spawned rank: join the store, train, report any failure to a file."""
    import torch.distributed as dist

    from testbed.engine import worker

    scenario = Scenario.from_dict(scenario_dict)
    ctx = worker.RankContext(rank, world_size, rank, Path(out_dir), progress=progress)
    _exit_with_parent(os.getppid())
    loopback = loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:  # one node: gloo listens on loopback only
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    _stack_dump_on_signal(Path(out_dir), rank)
    try:
        # The store's timeout bounds the rendezvous, which waits for the slowest rank's start-up.
        timeout = datetime.timedelta(seconds=max(scenario.stall_timeout_s, STARTUP_S))
        ctx.store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timeout)
        worker.train(scenario, ctx)
    except BaseException as exc:  # noqa: BLE001 — every failure must reach the report
        try:
            worker.write_error_report(ctx, exc)
        except OSError:  # a full disk: the stderr line below is all there is (no second traceback)
            pass
        where = f"at step {ctx.step}" if ctx.step >= 0 else "during start-up (before step 0)"
        first = (str(exc).strip().splitlines() or [""])[0]  # one line each: gloo errors carry a trace
        sys.stderr.write(f"[testbed] rank {rank} failed {where}: {type(exc).__name__}: {first}\n")
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
    _stack_files.append(os.fdopen(open_record(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8"))
    faulthandler.register(signal.SIGUSR1, file=_stack_files[-1], all_threads=True)


def launch(scenario: Scenario, out_dir: Path, overwrite: bool = False, claim: DirLock | None = None) -> RunResult:
    """Run the scenario with the spawn launcher; always returns (never hangs, never leaks ranks).

    Before any process starts: the device and backend are checked (ScenarioError naming the field)
    and ``out_dir`` is claimed for this run alone (RunDirError: unusable, in use by another run, or
    holding an earlier run unless ``overwrite``); pass ``claim`` if the caller already holds it.
    A stop signal, Ctrl-C or a launcher error still finalizes run.json, then is re-raised.
    """
    out_dir = Path(out_dir)
    check_devices(scenario)
    lock = claim or claim_run_dir(out_dir, overwrite)
    try:
        with StopOnSignals() as signals:
            return _launch_claimed(scenario, out_dir, signals)
    finally:
        if claim is None:
            lock.release()


def _launch_claimed(scenario: Scenario, out_dir: Path, signals: StopOnSignals) -> RunResult:
    started = time.monotonic()
    n = scenario.world_size
    run: dict[str, Any] = {}
    procs: list[Any] = []
    store = None
    result = RunResult("failed", "the launcher stopped before the ranks finished")
    try:
        remove_stale_record(out_dir)
        run = start_record(scenario, out_dir, scenario.backend, "spawn")
        try:
            check_components(scenario)
        except ScenarioError as e:  # bound to fail on every rank: recorded, no rank started
            result = RunResult("failed", f"refused before the ranks started: {e}")
            return result
        store = loopback_store(n, scenario.stall_timeout_s)
        ctx = mp.get_context("spawn")
        progress = ctx.Array("q", [-1] * n, lock=False)
        procs = [ctx.Process(target=_rank_main, name=f"testbed-rank{r}",
                             args=(scenario.to_dict(), r, n, store.port, str(out_dir), progress))
                 for r in range(n)]
        for p in procs:
            check_stop()  # a gate or a sweep asked every launcher to stop
            p.start()
        result = _watch(scenario, procs, progress, out_dir, started)
    except LauncherStopped as exc:  # SIGTERM / SIGHUP: recorded, ranks killed, then re-raised
        result = RunResult("failed", f"launcher stopped by {exc.signame}",
                           rank_reports=_rank_reports(out_dir))
        raise
    except BaseException as exc:  # Ctrl-C, a full disk, a launcher bug: recorded in run.json, then re-raised
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        result = RunResult("failed", f"launcher {what}: {text}",
                           traceback=traceback.format_exc(), rank_reports=_rank_reports(out_dir))
        raise
    finally:
        signals.hold()  # a second signal must not cut the cleanup short
        _kill_all(procs)
        del store
        result.wall_time_s = time.monotonic() - started
        finish_record(out_dir, run or {"scenario": scenario.to_dict(), "launcher": "spawn"}, result)
    return result


def _watch(scenario: Scenario, procs: list[Any], progress: Any, out_dir: Path, started: float) -> RunResult:
    exit_order: list[int] = []
    last_progress, last_change = list(progress), time.monotonic()
    failure_seen_at: float | None = None
    teardown: TeardownWait | None = None  # from when every rank has done all its work
    finished = _finished_progress(scenario)
    while True:
        check_stop()
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
            if teardown is None:
                left = scenario.timeout_s - (now - started)
                teardown = TeardownWait(procs, GRACE_S, min(TEARDOWN_MAX_S, left))
            if teardown.expired(now):
                break
        else:
            stall_limit = scenario.stall_timeout_s if min(current) >= 0 else max(scenario.stall_timeout_s, STARTUP_S)
            if failure_seen_at is None and now - last_change > stall_limit:
                return _hang_result(out_dir, current, stall_limit, procs)
            if now - started > scenario.timeout_s:
                return _timeout_result(out_dir, current, scenario)
        time.sleep(POLL_S)
    if min(progress) >= finished:
        return _finished_result(procs, teardown.waited if teardown is not None else 0.0)
    return _failure_result(out_dir, procs, exit_order, list(progress), finished)


def _finished_progress(scenario: Scenario) -> int:
    """The progress value a rank writes once its last step and the final barrier are done."""
    from testbed.engine.worker import PHASE_START, PHASES

    return scenario.steps * PHASES + PHASE_START


def _finished_result(procs: list[Any], waited: float = GRACE_S) -> RunResult:
    """Every rank finished every step and the final barrier: the record is complete, so the run
    is ok even if a rank then crashed or hung in teardown (noted in the reason)."""
    notes = [f"rank {r} {'did not exit within %.0f s (killed)' % waited if p.exitcode is None else _how(p.exitcode)}"
             for r, p in enumerate(procs) if p.exitcode != 0]
    reason = "all steps finished; then during teardown " + "; ".join(notes) if notes else ""
    return RunResult("ok", reason)


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
        return RunResult("failed", f"ranks ended unfinished (exit codes {codes}, progress {progress})",
                         rank_reports=list(reports.values()))
    report = reports.get(root)
    tb: str | None = None
    if report is not None and report.get("nonfinite_ranks"):  # every rank stops: blame the flagged one
        step, root = report.get("step"), report["nonfinite_ranks"][0]
        reason = report["error"].removeprefix("NonFiniteStop: ")
    elif report is not None:
        step, tb = report.get("step"), report.get("traceback")
        if not isinstance(step, int) or step < 0:  # failed while building the model, joining the group
            step, where = None, "during start-up (before step 0)"
        else:
            where = f"at step {step}"
        reason = f"rank {root} failed {where}: {report['error']}"
    else:
        (step, where), code = _where(progress[root]), procs[root].exitcode
        how = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        what = "exited before finishing" if root in early else "died without a report"
        reason = f"rank {root} {what} {where} ({how})"
    return RunResult("failed", reason, root, step, tb, rank_reports=list(reports.values()))


def _where(progress_value: int) -> tuple[int | None, str]:
    """(step, words) for a progress counter. A rank whose step N is computed is *between* steps
    (writing the row, or waiting to start N + 1) and must not read "stuck at step N"."""
    from testbed.engine.worker import PHASE_DONE, PHASES

    if progress_value < 0:
        return None, "during start-up (before step 0)"
    step, phase = divmod(progress_value, PHASES)
    if phase == PHASE_DONE:
        return step, f"after computing step {step} (step {step + 1} not started)"
    return step, f"at step {step}"


def _laggard(progress: list[int]) -> tuple[int | None, int | None, str, str]:
    """The rank furthest behind (None if several are), its step, who in words, where in words."""
    low = min(progress)
    behind = [r for r, v in enumerate(progress) if v == low]
    who = f"rank {behind[0]}" if len(behind) == 1 else "ranks " + ", ".join(map(str, behind))
    step, where = _where(low)
    return (behind[0] if len(behind) == 1 else None), step, who, where


def _hang_result(out_dir: Path, progress: list[int], limit: float, procs: list[Any]) -> RunResult:
    """Name the rank furthest behind and attach its Python stack (dumped on SIGUSR1)."""
    rank, step, who, where = _laggard(progress)
    reason = f"no progress for {limit:g} s: {who} stuck {where} (stall_timeout_s; progress counters {progress})"
    stacks = _dump_stacks(out_dir, procs)
    stuck = [r for r, v in enumerate(progress) if v == min(progress)]
    tb = next((stacks[r] for r in stuck if stacks.get(r)), None)
    return RunResult("failed", reason, rank, step, tb, rank_reports=_rank_reports(out_dir))


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
    rank, step, who, where = _laggard(progress)
    reason = f"run exceeded timeout_s = {scenario.timeout_s:g} s (slowest: {who} {where})"
    return RunResult("failed", reason, rank, step, rank_reports=_rank_reports(out_dir))


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
