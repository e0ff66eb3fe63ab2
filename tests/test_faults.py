"""Crashed, killed and hung ranks, non-finite values, and an interrupted launcher: each run ends
within its timeout, says which rank failed at which step (with the traceback or stack where there
is one), keeps every completed step, records status "failed" in run.json, exits non-zero and
leaves no process behind. Runs the shipped scenarios/faults/*.toml through the real CLI entry
point (in-process, so the test can watch the launcher's children)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import cli
from testbed.cli.common import EXIT_FAILED, EXIT_OK
from testbed.engine import runner
from testbed.record.files import read_jsonl, read_metrics
from testbed.scenario.spec import load_scenario
from tests.helpers import run_json, tiny

FAULTS_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "faults"


# ---- who is alive: a /proc scan (Linux), no psutil ------------------------------------------


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19], fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid → start time."""
    parent: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parent[int(name)] = (st[0], st[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for pid, (ppid, start) in parent.items():
            if ppid == p and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


class ChildWatcher:
    """Records every descendant of this process while a run is in flight, so the test can check
    afterwards that each one is gone (a zombie counts as left behind: nobody reaped it).

    multiprocessing's resource tracker is excluded: it is one helper per interpreter, started by
    the first spawn, and ends with the interpreter itself.
    """

    def __init__(self, root: int | None = None, interval: float = 0.05):
        self.root = root or os.getpid()
        self.interval = interval
        self.seen: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self.interval)

    def scan(self) -> None:
        """Record every live descendant and refresh its command line: a child seen between fork and
        exec still shows its parent's command line (under load the window is wide enough for a
        50 ms poll to land in it, and a rank then went uncounted: "3 of 4 ranks")."""
        for pid, start in descendants(self.root).items():
            cmd = _cmdline(pid)
            if cmd or (pid, start) not in self.seen:
                self.seen[(pid, start)] = cmd or self.seen.get((pid, start), "")

    def __enter__(self) -> "ChildWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def ranks(self) -> list[int]:
        return [pid for (pid, _), cmd in self.seen.items() if "spawn_main" in cmd and "resource_tracker" not in cmd]

    def survivors(self) -> list[str]:
        out = []
        for (pid, start), cmd in self.seen.items():
            st = _stat(pid)
            if st is not None and st[1] == start and "resource_tracker" not in cmd:
                out.append(f"pid {pid} state {st[2]}: {cmd[:120]}")
        return out


def assert_no_survivors(watch: ChildWatcher, expected_ranks: int, wait_s: float = 0.0) -> None:
    assert len(watch.ranks()) >= expected_ranks, f"the watcher never saw the ranks: {watch.seen}"
    deadline = time.monotonic() + wait_s
    while watch.survivors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.survivors() == []


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    """``testbed run ...`` in this process; returns (exit code, stderr, wall seconds)."""
    started = time.monotonic()
    code = cli.main(["run", *argv])
    return code, capsys.readouterr().err, time.monotonic() - started


# ---- crash / exit / signal / hang ---------------------------------------------------------------

HARD_FAULTS = {  # scenario file → (words the reason must hold, text the traceback must hold or None)
    "crash": ("rank 1 failed at step 3: InjectedFault", "raise InjectedFault"),
    "exit": ("rank 1 died without a report at step 3 (exit code 3)", None),
    "kill": ("rank 1 died without a report at step 3 (signal SIGKILL)", None),
    "segv": ("rank 1 died without a report at step 3 (signal SIGSEGV)", None),
    "hang": ("no progress for 5 s: rank 1 stuck at step 3", "in sleep_forever"),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", sorted(HARD_FAULTS))
def test_hard_fault_ends_cleanly(fault: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = FAULTS_DIR / f"{fault}.toml"
    scenario = load_scenario(path)
    words, trace = HARD_FAULTS[fault]
    with ChildWatcher() as watch:
        code, err, wall = run_cli([str(path), "--out", str(tmp_path)], capsys)
    assert code == EXIT_FAILED
    assert wall < scenario.timeout_s
    if fault == "hang":
        assert wall >= scenario.stall_timeout_s
    run = run_json(tmp_path)
    assert run["status"] == "failed" and words in run["reason"], run["reason"]
    assert (run["failed_rank"], run["failed_step"]) == (1, 3)
    if trace is None:
        assert run["traceback"] is None
    else:
        assert trace in run["traceback"] and trace in err
    assert f"FAILED: {run['reason']}" in err and "3 completed step(s) kept" in err
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1, 2]  # every completed step
    assert_no_survivors(watch, scenario.world_size)


@pytest.mark.timeout(120)
def test_exit_zero_mid_run_is_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rank that calls sys.exit(0) half-way did not finish: the run must not pass as "ok"."""
    with ChildWatcher() as watch:
        code, err, _ = run_cli([str(FAULTS_DIR / "exit.toml"), "--out", str(tmp_path),
                                "--set", "perturbations.0.code=0"], capsys)
    run = run_json(tmp_path)
    assert code == EXIT_FAILED and run["status"] == "failed"
    assert "rank 1 exited before finishing at step 3 (exit code 0)" in run["reason"], run["reason"]
    assert_no_survivors(watch, 2)


# ---- non-finite values ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_nan_gradient_continue_is_recorded_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A stale record in the directory (rows and a rank report of an earlier run), re-used with
    # --overwrite, must not leak in.
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank0.json").write_text(json.dumps({"rank": 0, "step": 9, "error": "stale"}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 99}) + "\n")
    code, err, _ = run_cli([str(FAULTS_DIR / "nan_grad.toml"), "--out", str(tmp_path), "--overwrite"], capsys)
    run = run_json(tmp_path)
    assert code == EXIT_OK and run["status"] == "ok", (run["reason"], run["traceback"])
    assert run["nonfinite"]["first"] == {"step": 2, "event": "nonfinite_grad", "rank": 1}  # ok, yet not clean
    assert "WARNING: 13 non-finite event(s); the first: nonfinite_grad on rank 1 at step 2" in err
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))
    events = read_jsonl(tmp_path / "events.jsonl")
    first = [e for e in events if e["step"] == 2]
    assert first == [{"step": 2, "event": "nonfinite_grad", "rank": 1}]  # rank 0's own gradient was finite
    assert not [e for e in events if e["step"] < 2]
    assert {"kind": "nonfinite_grad", "rank": 1} in rows[2]["flags"] and rows[2]["grad_norm"][0] is not None
    assert not (tmp_path / "ranks" / "rank0.json").exists()


@pytest.mark.timeout(120)
def test_inf_loss_stop_fails_the_run_naming_rank_and_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ChildWatcher() as watch:
        code, err, _ = run_cli([str(FAULTS_DIR / "inf_loss_stop.toml"), "--out", str(tmp_path)], capsys)
    run = run_json(tmp_path)
    assert code == EXIT_FAILED and run["status"] == "failed"
    assert (run["failed_rank"], run["failed_step"]) == (1, 2)
    assert run["reason"].startswith("non-finite values at step 2: nonfinite_loss on rank 1"), run["reason"]
    assert "rank 0" not in run["reason"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]  # the bad step's row is kept
    events = read_jsonl(tmp_path / "events.jsonl")
    assert {"step": 2, "event": "nonfinite_loss", "rank": 1} in events and {e["rank"] for e in events} == {1}
    assert_no_survivors(watch, 2)


# ---- the launcher itself interrupted or killed ---------------------------------------------------


@pytest.mark.timeout(120)
def test_ctrl_c_in_the_launcher_records_failure_and_kills_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = runner._watch

    def interrupted(scenario: Any, procs: Any, progress: Any, *args: Any) -> Any:
        while min(progress) < 0:  # wait until every rank is training
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_watch", interrupted)
    scenario = load_scenario(FAULTS_DIR / "hang.toml")
    with ChildWatcher() as watch, pytest.raises(KeyboardInterrupt):
        runner.launch(scenario, tmp_path)
    monkeypatch.setattr(runner, "_watch", original)
    run = run_json(tmp_path)
    assert run["status"] == "failed" and run["reason"].startswith("launcher interrupted: KeyboardInterrupt")
    assert_no_survivors(watch, 2)


@pytest.mark.timeout(150)
def test_ranks_exit_when_the_launcher_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the launcher (no cleanup runs at all): its ranks notice and exit by themselves."""
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(FAULTS_DIR / "hang.toml"),
                             "--out", str(tmp_path), "--set", "stall_timeout_s=100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with ChildWatcher() as watch:
            deadline = time.monotonic() + 100
            while len(read_metrics(tmp_path)) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)  # rows 0..2 written: both ranks are up, rank 1 is hanging
            proc.kill()
            proc.wait(timeout=10)
        assert len(read_metrics(tmp_path)) == 3
        assert_no_survivors(watch, 2, wait_s=15.0)  # the parent watch polls once a second
        assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"  # honest: never finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fault_kinds_validate_their_parameters() -> None:
    from testbed.scenario.spec import ScenarioError, parse_scenario

    for bad in ({"kind": "exit", "signal": "SIGNOPE"}, {"kind": "nonfinite", "value": "big"},
                {"kind": "nonfinite", "target": "weights"}, {"kind": "hang", "seconds": 3}):
        with pytest.raises(ScenarioError):
            parse_scenario(tiny(perturbations=[bad]), source="<test>")


# ---- the launcher's decisions, on fake ranks (no processes) --------------------------------------


class FakeRank:
    def __init__(self, exitcode: int | None = None):
        self.exitcode, self.pid = exitcode, None

    def is_alive(self) -> bool:
        return self.exitcode is None


def _report(out: Path, rank: int, step: int, error: str, **extra: Any) -> None:
    (out / "ranks").mkdir(exist_ok=True)
    (out / "ranks" / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "step": step, "phase": 0, "error": error, "traceback": f"tb of rank {rank}", **extra}))


GLOO_PEER_GONE = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:7374"


@pytest.mark.parametrize(("codes", "order", "reports", "progress", "expected"), [
    # a rank's own error beats the peer that only saw the connection drop, even if the peer exited first
    ([1, 1], [0, 1], {0: GLOO_PEER_GONE, 1: "ValueError: boom"}, [14, 12], (1, "rank 1 failed at step 3: ValueError")),
    # a silent death (no report: os._exit / signal) beats the peer's "connection closed"
    ([1, -9], [0, 1], {0: GLOO_PEER_GONE}, [14, 12], (1, "rank 1 died without a report at step 3 (signal SIGKILL)")),
    # sys.exit(0) mid-run is named, not the peer that failed because of it
    ([1, 0], [1, 0], {0: GLOO_PEER_GONE}, [14, 12], (1, "rank 1 exited before finishing at step 3 (exit code 0)")),
    # a rank that finished everything and then crashed in teardown is not the root cause
    ([-6, 1], [0, 1], {1: "ValueError: late"}, [24, 20], (1, "rank 1 failed at step 5: ValueError")),
])
def test_root_cause_selection(tmp_path: Path, codes: list[int], order: list[int], reports: dict[int, str],
                              progress: list[int], expected: tuple[int, str]) -> None:
    for rank, error in reports.items():
        _report(tmp_path, rank, progress[rank] // 4, error)
    result = runner._failure_result(tmp_path, [FakeRank(c) for c in codes], order, progress, finished=24)
    assert result.status == "failed" and result.failed_rank == expected[0]
    assert result.reason.startswith(expected[1]), result.reason


def test_nonfinite_stop_blames_the_flagged_rank(tmp_path: Path) -> None:
    for rank in (0, 1):
        _report(tmp_path, rank, 2, "NonFiniteStop: non-finite values at step 2: nonfinite_loss on rank 1",
                nonfinite_ranks=[1])
    result = runner._failure_result(tmp_path, [FakeRank(1), FakeRank(1)], [0, 1], [10, 10], finished=24)
    assert (result.failed_rank, result.failed_step) == (1, 2)
    assert result.reason == "non-finite values at step 2: nonfinite_loss on rank 1" and result.traceback is None


def test_teardown_trouble_after_the_last_step_keeps_the_run_ok() -> None:
    result = runner._finished_result([FakeRank(0), FakeRank(-6)])
    assert result.ok and result.reason == "all steps finished; then during teardown rank 1 died of signal SIGABRT"
    assert runner._finished_result([FakeRank(0), FakeRank(0)]).reason == ""


@pytest.mark.parametrize(("progress", "limit", "where"), [([-1, -1], 0.6, "start-up (before step 0)"),
                                                          ([13, 12], 0.2, "rank 1 stuck at step 3")])
def test_stall_limit_is_longer_during_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               progress: list[int], limit: float, where: str) -> None:
    monkeypatch.setattr(runner, "STARTUP_S", 0.6)
    scenario = load_scenario(FAULTS_DIR / "hang.toml", {"stall_timeout_s": 0.2})
    started = time.monotonic()
    result = runner._watch(scenario, [FakeRank(), FakeRank()], list(progress), tmp_path, started)
    assert time.monotonic() - started >= limit
    assert result.status == "failed" and f"no progress for {limit:g} s" in result.reason and where in result.reason


def test_child_watcher_counts_a_rank_it_first_saw_before_its_exec() -> None:
    """A child seen between fork and exec shows its parent's command line; the watcher must still
    count it as a rank once it has exec'd (test_two_runs_at_once... saw "3 of 4 ranks" under load)."""
    with ChildWatcher(interval=0.02) as watch:
        pid = os.fork()
        if pid == 0:  # the child: seen by several polls with pytest's command line, then exec
            time.sleep(0.3)
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(0.3)", "spawn_main"])
        os.waitpid(pid, 0)
    assert len(watch.ranks()) == 1, watch.seen
