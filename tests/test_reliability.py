"""No run loses or mixes data, however the launcher ends: a stop signal (SIGTERM, SIGHUP), a
second run into the same directory, a full disk. Each ends with a finalized run.json (status,
reason, steps kept), whole-line JSONL files and no process left behind. Then the readers (they say
which lines they skipped) and the smaller fixes, on fake data (no processes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from testbed import cli
from testbed.cli.common import EXIT_FAILED, EXIT_USAGE
from testbed.diagnose.summary import summarize
from testbed.engine import runner
from testbed.engine.device import resolve_backend
from testbed.engine.finalize import finish_record
from testbed.record.files import JsonlWriter, RecordWarning, read_jsonl, read_metrics, write_json_atomic
from tests.helpers import run_json, tiny
from tests.scenario_files import to_toml
from tests.test_faults import FAULTS_DIR, ChildWatcher, FakeRank, assert_no_survivors

HANG = FAULTS_DIR / "hang.toml"  # 2 ranks; rank 1 hangs at step 3, so steps 0..2 are recorded


def _wait_for_rows(out: Path, n: int, proc: subprocess.Popen[Any], limit_s: float = 150.0) -> None:
    deadline = time.monotonic() + limit_s
    while len(read_metrics(out)) < n:
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "the run never recorded its first steps"
        time.sleep(0.1)


# ---- a stop signal to the launcher; a second run into its directory ---------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_finalizes_the_record_and_the_dir_stays_the_runs_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(HANG), "--out", str(out),
                             "--set", "stall_timeout_s=200", "--set", "timeout_s=300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with ChildWatcher(root=proc.pid) as watch:
            _wait_for_rows(out, 3, proc)
            # a second run into the busy directory: refused, with or without --overwrite
            for extra in ([], ["--overwrite"]):
                assert cli.main(["run", str(HANG), "--out", str(out), *extra]) == EXIT_USAGE
                line = capsys.readouterr().err.strip()
                assert line.startswith(f"testbed run: --out {out}: in use by another run (pid {proc.pid})"), line
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert err.strip().splitlines()[-2:] == [
            f"FAILED: launcher stopped by {sig.name}",
            f"3 completed step(s) kept in {out}/metrics.jsonl; run.json status 'failed'"], err
        assert "Traceback" not in err
        run = run_json(out)
        assert (run["status"], run["reason"], run["steps_kept"]) == ("failed", f"launcher stopped by {sig.name}", 3)
        assert run["wall_time_s"] > 0
        assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
        assert_no_survivors(watch, 2, wait_s=5.0)
        # the finished run's directory is not silently re-used: its rows stay
        assert cli.main(["run", str(HANG), "--out", str(out)]) == EXIT_USAGE
        line = capsys.readouterr().err.strip()
        assert "holds an earlier run (status 'failed', 3 metric row(s)); pass --overwrite" in line, line
        assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_prints_the_steps_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI side of Ctrl-C (the launcher side: tests/test_faults.py::test_ctrl_c_in_the_launcher_...)."""
    def interrupted(scenario: Any, out_dir: Path, **kwargs: Any) -> Any:
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
        write_json_atomic(out_dir / "run.json", {"status": "failed", "steps_kept": 4,
                                                 "reason": "launcher interrupted: KeyboardInterrupt"})
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "launch", interrupted)
    assert cli.main(["run", str(HANG), "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["FAILED: launcher interrupted: KeyboardInterrupt",
                   f"4 completed step(s) kept in {tmp_path / 'run'}/metrics.jsonl; run.json status 'failed'"]


# ---- a full disk --------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent('''
    """Runs `testbed run`; in every process (the spawned ranks import this file as __mp_main__)
    rank 0's 4th metrics row meets a full disk after half of it was written, as ENOSPC does."""
    import errno, os, sys
    from testbed.record import files

    real, calls = files.JsonlWriter._write_all, [0]

    def full_disk(self, data):
        if self.path.name == "metrics.jsonl":
            calls[0] += 1
            if calls[0] > 3:
                os.write(self._fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    files.JsonlWriter._write_all = full_disk
    if __name__ == "__main__":
        from testbed.cli.main import main
        sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.timeout(240)
def test_a_full_disk_fails_the_run_cleanly_with_whole_lines(tmp_path: Path) -> None:
    driver = tmp_path / "full_disk.py"
    driver.write_text(FULL_DISK)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(to_toml(tiny(steps=6, timeout_s=200.0)), encoding="utf-8")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(driver), "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ChildWatcher(root=proc.pid) as watch:
        _, err = proc.communicate(timeout=200)
    assert proc.returncode == EXIT_FAILED, err
    run = run_json(out)
    assert run["status"] == "failed" and (run["failed_rank"], run["failed_step"]) == (0, 3), run["reason"]
    assert "No space left on device" in run["reason"] and run["steps_kept"] == 3
    assert f"FAILED: {run['reason']}" in err and "3 completed step(s) kept" in err
    assert err.count("Traceback") <= 1 and len(err.splitlines()) < 40, err  # the root cause's, once
    data = (out / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n") and [json.loads(x)["step"] for x in data.splitlines()] == [0, 1, 2]
    assert_no_survivors(watch, 2, wait_s=5.0)


def test_a_failed_write_leaves_only_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = JsonlWriter(tmp_path / "m.jsonl")
    writer.write({"step": 0})

    def torn(data: bytes) -> None:
        os.write(writer._fd, data[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_all", torn)
    with pytest.raises(OSError):
        writer.write({"step": 1})
    writer.close()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 0}\n'


def test_the_launcher_cuts_a_torn_tail_and_counts_what_is_kept(tmp_path: Path) -> None:
    """A rank SIGKILLed mid-line: finish_record leaves whole lines and says so in run.json."""
    torn = '{"step": 2, "lo'
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n' + torn)
    result = runner.RunResult("failed", "rank 0 died")
    finish_record(tmp_path, {"status": "running"}, result)
    run = run_json(tmp_path)
    assert (run["status"], run["steps_kept"], run["torn_bytes_removed"]) == ("failed", 2, {"metrics.jsonl": len(torn)})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'
    assert oct((tmp_path / "run.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- readers say what they skipped ------------------------------------------------------------------


def test_readers_name_the_lines_they_skip(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n[3]\n{"step": 4')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 2]
    assert [str(w.message) for w in seen if issubclass(w.category, RecordWarning)] == [
        f"{path}: skipped 3 of 5 line(s): line 2 (not valid JSON), line 4 (not a JSON object), "
        "line 5 (incomplete last line)"]


def test_report_prints_the_skipped_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli import report as report_cli
    from testbed.report.html import load_inputs

    def tables_only(paths: list[Path], out: Path) -> dict[str, Any]:  # the real readers, no figures (slow)
        load_inputs(paths)
        return {"sweeps": [], "runs": [], "figures": []}

    monkeypatch.setattr(report_cli, "write_report", tables_only)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "loss": [1.0, 1.1], "global_loss": 1.05, "loss_cv": 0.05} for s in range(3)]
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1][:20]  # torn mid-file: the step must not vanish silently
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_json_atomic(run_dir / "run.json", {"status": "ok", "scenario": {"name": "x"}})
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"testbed: warning: {run_dir / 'metrics.jsonl'}: skipped 1 of 3 line(s): line 2 (not valid JSON)" in err


# ---- the smaller fixes ------------------------------------------------------------------------------


def test_final_is_the_last_steps_value_even_when_it_is_not_finite() -> None:
    rows = [{"step": 0, "loss": [1.0], "global_loss": 2.0}, {"step": 1, "loss": [None], "global_loss": None}]
    final = summarize(rows)["global_loss"]["final"]
    assert final != final  # NaN: not the finite 2.0 of step 0


def test_a_rank_between_steps_is_not_stuck_at_the_step_it_finished(tmp_path: Path) -> None:
    result = runner._hang_result(tmp_path, [55, 56], 5.0, [FakeRank(), FakeRank()])  # 55 = step 13, done
    assert "rank 0 stuck after computing step 13 (step 14 not started)" in result.reason, result.reason
    assert result.failed_step == 13


def test_a_start_up_death_says_start_up_not_step_none(tmp_path: Path) -> None:
    result = runner._failure_result(tmp_path, [FakeRank(-9), FakeRank(1)], [0, 1], [-1, -1], finished=24)
    assert result.reason == "rank 0 died without a report during start-up (before step 0) (signal SIGKILL)"
    assert "None" not in result.reason and result.failed_step is None


def test_messages_have_no_doubled_words() -> None:
    with pytest.raises(Exception) as info:
        resolve_backend("nccl", "cpu")
    assert str(info.value).endswith("use 'gloo' or 'auto'"), str(info.value)


def test_teardown_is_waited_for_while_a_rank_still_uses_cpu() -> None:
    """6 ranks on 2 cores spent ~1.5 CPU-s each exiting (~26 s of wall time under load): a rank
    that still gains CPU time is not killed after a fixed 10 s; an idle one is, and the cap holds."""
    from testbed.engine.teardown_wait import TeardownWait

    class Busy:  # this very process: it spins below, so its CPU time grows
        exitcode, pid = None, os.getpid()

    class Unknown:  # no /proc entry to read: the old fixed grace
        exitcode, pid = None, None

    def spin(seconds: float, wait: TeardownWait) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if wait.expired(time.monotonic()):
                return True
        return False

    busy = TeardownWait([Busy()], idle_s=1.0, cap_s=4.0)
    assert not spin(2.5, busy)  # past idle_s, still working: waited for
    assert spin(3.0, busy) and 3.9 < busy.waited < 6.0  # the cap ends it
    idle = TeardownWait([Unknown()], idle_s=1.0, cap_s=60.0)
    time.sleep(1.2)
    assert idle.expired(time.monotonic())
