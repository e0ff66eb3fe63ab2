"""The monitor's run record in one process: written at attach, finalized at close / at exit / on an
exception / on SIGTERM (with the script's own handlers chained, an ignored SIGHUP left ignored),
owned (a second attach refused, ``overwrite`` replaces), and anchored where it was attached."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.engine import teardown
from testbed.record.files import RunDirError, read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(__file__).with_name("lifecycle_script.py"))


def _train(monitor: Any, model: DDP, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(0.5)


def _run(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def test_run_json_at_attach_then_finalized_at_close(one_rank: None, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    model = DDP(torch.nn.Linear(4, 1))
    monitor = testbed.attach(model, out_dir=out, name="my-job", batch_size=8)
    run = _run(out)
    assert run["status"] == "running" and run["name"] == "my-job" and run["client"] == "attach"
    assert run["world_size"] == 1 and run["cadence"] == {"every": 1, "pairwise_every": 0, "weight_check_every": 10}
    assert run["ranks"][0]["rank"] == 0 and run["ranks"][0]["pid"] == os.getpid() and run["alpha"] == 0.01
    _train(monitor, model, 3)
    monitor.close()
    run = _run(out)
    assert run["status"] == "ok" and run["steps_kept"] == 3 == len(read_metrics(out)) and run["wall_time_s"] > 0
    assert run["verdict"]["status"] == "consistent" and run["verdict"]["headline"]


def test_an_out_dir_with_a_record_is_refused_and_overwrite_replaces_it(one_rank: None, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    first = DDP(torch.nn.Linear(4, 1))
    with testbed.attach(first, out_dir=out) as monitor:
        _train(monitor, first, 2)
    before = (out / "metrics.jsonl").read_bytes()
    second = DDP(torch.nn.Linear(4, 1))
    with pytest.raises(RunDirError, match=r"holds an earlier run \(status 'ok', 2 metric row\(s\)\); pass "
                                          r"overwrite=True to replace it") as e:
        testbed.attach(second, out_dir=out)
    assert "\n" not in str(e.value) and (out / "metrics.jsonl").read_bytes() == before
    with testbed.attach(second, out_dir=out, overwrite=True) as monitor:  # refused before its hook went in
        assert (out / "metrics.jsonl").read_bytes() == b"" and _run(out)["status"] == "running"  # the old rows gone
        _train(monitor, second, 1)
    assert [r["step"] for r in read_metrics(out)] == [0] and _run(out)["status"] == "ok"


def test_an_exception_in_the_loop_finalizes_as_failed(one_rank: None, tmp_path: Path) -> None:
    model = DDP(torch.nn.Linear(4, 1))
    with pytest.raises(ZeroDivisionError):
        with testbed.attach(model, out_dir=tmp_path / "mine") as monitor:
            _train(monitor, model, 2)
            1 / 0
    run = _run(tmp_path / "mine")
    assert run["status"] == "failed" and run["reason"] == "rank 0 failed at step 2: ZeroDivisionError: division by zero"
    assert "1 / 0" in run["traceback"] and run["steps_kept"] == 2 and run["verdict"]["headline"]


def test_the_exit_handler_finalizes_as_failed_after_an_uncaught_exception(one_rank: None, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = DDP(torch.nn.Linear(4, 1))
    monitor = testbed.attach(model, out_dir=tmp_path / "mine")
    _train(monitor, model, 1)
    monkeypatch.setattr(sys, "last_value", RuntimeError("CUDA out of memory"), raising=False)
    teardown.at_exit()  # what the interpreter runs after printing the uncaught exception
    run = _run(tmp_path / "mine")
    assert run["status"] == "failed" and run["reason"] == "rank 0 failed at step 1: RuntimeError: CUDA out of memory"


def test_the_record_stays_where_it_was_attached(one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative out_dir, then the script changes directory: close() finalized the wrong place."""
    monkeypatch.chdir(tmp_path)
    model = DDP(torch.nn.Linear(4, 1))
    monitor = testbed.attach(model, out_dir="runs/mine")
    _train(monitor, model, 1)
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")
    monitor.close()
    assert _run(tmp_path / "runs" / "mine")["status"] == "ok" and not (tmp_path / "elsewhere" / "runs").exists()


def _launch(mode: str, out: Path, signals: tuple[int, ...] = ()) -> tuple[int, str]:
    """Run lifecycle_script.py; after its step 3, send ``signals`` one by one (a step apart)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, SCRIPT, mode, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, pending = [], list(signals)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if pending and line.startswith("step ") and int(line.split()[1]) >= 3 + 2 * (len(signals) - len(pending)):
            proc.send_signal(pending.pop(0))
        if time.monotonic() > deadline:
            proc.kill()
            break
    return proc.wait(timeout=60), "".join(lines)


@pytest.mark.timeout(300)
def test_sigterm_finalizes_then_ends_the_process_by_the_signal(tmp_path: Path) -> None:
    code, log = _launch("default", tmp_path / "mine", (signal.SIGTERM,))
    assert code == -signal.SIGTERM, log[-3000:]  # the default action, after the record
    run = _run(tmp_path / "mine")
    assert run["status"] == "failed" and run["reason"].startswith("stopped by SIGTERM at step ")
    assert run["steps_kept"] >= 4 and run["verdict"]["headline"]


@pytest.mark.timeout(300)
def test_the_scripts_own_handlers_are_chained_and_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    code, log = _launch("handlers", tmp_path / "mine", (signal.SIGHUP, signal.SIGTERM))
    assert code == 3 and "own handler ran" in log, log[-3000:]
    run = _run(tmp_path / "mine")
    assert run["status"] == "failed" and run["reason"].startswith("stopped by SIGTERM at step ")
    assert run["steps_kept"] >= 6  # SIGHUP at step 3 changed nothing: SIGTERM came two steps later


@pytest.mark.timeout(300)
def test_an_uncaught_exception_finalizes_the_record(tmp_path: Path) -> None:
    code, log = _launch("raise", tmp_path / "mine")
    assert code == 1 and "ValueError: boom" in log
    run = _run(tmp_path / "mine")
    assert run["status"] == "failed" and run["reason"] == "rank 0 failed at step 4: ValueError: boom"
    assert run["steps_kept"] == 4 and "raise ValueError" in run["traceback"]


def test_a_finished_testbed_run_directory_is_refused(one_rank: None, tmp_path: Path) -> None:
    """Attaching into a `testbed run` directory appended foreign rows under its run.json's count."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "ok", "steps_kept": 1}))
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(RunDirError, match=r"holds an earlier run \(status 'ok', 1 metric row\(s\)\)"):
        testbed.attach(DDP(torch.nn.Linear(4, 1)), out_dir=run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_monitors_left_open_are_closed_at_exit_in_attach_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank must close its open monitors in the same order at exit, or their close() barriers
    wait for each other until the check-in deadline (seen: a script with six monitors took 130 s
    instead of 10 s to exit, 60 s per mismatched barrier)."""
    closed: list[int] = []

    class FakeMonitor:
        def __init__(self, n: int) -> None:
            self.n, self.state = n, types.SimpleNamespace(process_group=None)

        def close(self) -> None:
            closed.append(self.n)

    class FakeModel(torch.nn.Module):
        pass

    monkeypatch.setattr(teardown, "_monitors", type(teardown._monitors)())  # empty, of the module's own kind
    monkeypatch.setattr(teardown, "_attached", weakref.WeakSet())
    monkeypatch.setattr(teardown, "_registered", True)  # no real atexit registration from a test
    monkeypatch.setattr(teardown, "release_gloo", lambda models=(): None)
    keep = [(FakeModel(), FakeMonitor(n)) for n in range(64)]
    for model, monitor in keep:
        teardown.register(model, monitor)
    teardown.at_exit()
    assert closed == list(range(64))
