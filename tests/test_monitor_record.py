"""The monitor's run record from a user's plain DDP script under torchrun (2 gloo ranks,
tests/record_scripts.py): finalized with the verdict, owned (a second launch into the same out_dir is
refused on every rank, the first record untouched), finalized when torchrun is stopped by SIGTERM,
and a rank that stops calling ``step`` ends the job in bounded time with an error naming it, no
process left behind. One launch per behaviour, shared by the checks on it."""
from __future__ import annotations

import html
import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed.cli.main import main as cli_main
from testbed.engine.proctree import descendants, kill_tree
from testbed.record.files import read_jsonl, read_metrics
from tests.scale_fixtures import REPO

SCRIPT = str(Path(__file__).with_name("record_scripts.py"))
LAUNCH_TIMEOUT_S = 300


class Launch:
    """``torchrun --standalone --nproc-per-node 2 record_scripts.py MODE OUT [STEPS]``, bounded; the
    output as it comes, the ranks' pids, the exit code."""

    def __init__(self, mode: str, out: Path, *extra: str, on_line: Callable[["Launch", str], None] | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(out.parent)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT, mode,
               str(out), *extra]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.rank_pids: set[int] = set()
        self.on_line = on_line
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        try:
            self.code = self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=60)
            pytest.fail(f"torchrun {mode} did not finish in {LAUNCH_TIMEOUT_S} s:\n{self.log[-4000:]}")
        reader.join(timeout=30)
        self.wall_s = time.monotonic() - self.started

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.rank_pids.update(descendants(self.proc.pid))
            if self.on_line is not None:
                self.on_line(self, line)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _record_files(out: Path) -> dict[str, bytes]:
    """The record's files and their bytes (run.lock holds the last locker's pid, not the record)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "run.lock"}


def _run_json(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def bugs_then_rerun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A script with two real mistakes, then a healthy script launched into the same out_dir."""
    out = tmp_path_factory.mktemp("record") / "mine"
    first = Launch("bugs", out)
    files = _record_files(out)
    second = Launch("plain", out)
    return {"out": out, "first": first, "files": files, "second": second}


@pytest.mark.timeout(600)
def test_a_user_loop_leaves_a_finalized_record_with_the_verdict(bugs_then_rerun: dict[str, Any]) -> None:
    out, first = bugs_then_rerun["out"], bugs_then_rerun["first"]
    assert first.code == 0, first.log[-4000:]
    run = _run_json(out)
    assert run["status"] == "ok" and run["client"] == "attach" and run["name"] == "record_scripts"
    assert run["world_size"] == 2 and run["launcher"]["kind"] == "torchrun" and len(run["ranks"]) == 2
    assert {r["rank"] for r in run["ranks"]} == {0, 1} and run["cadence"]["weight_check_every"] == 10
    rows = read_metrics(out)
    assert run["steps_kept"] == len(rows) == 7  # 6 steps and the state check at exit
    assert rows[0]["weights_in_sync"] is False  # rank 0 "resumed" after wrapping: caught at step 0
    assert rows[-1]["final_check"] is True and "loss" not in rows[-1]
    assert run["verdict"]["status"] == "diverged" and "not attributable" in run["verdict"]["headline"]
    alarms = {e["kind"]: e for e in read_jsonl(out / "events.jsonl") if e["event"] == "alarm"}
    # 2 ranks: no majority, so neither rank is named as the odd one (it was rank 0)
    assert alarms["weights_diverged"]["ranks"] == [0, 1] and alarms["weights_diverged"]["step"] == 0
    assert "ranks 0 and 1 hold different weights (2 ranks: no majority, not attributable" in \
        alarms["weights_diverged"]["message"]
    # rank 1 stepped its scheduler twice: every rank's lr is in the row, not rank 0's alone
    assert rows[0]["lr"] == 0.1 and rows[1]["lr"] is None and rows[1]["lr_by_rank"] == [pytest.approx(0.09),
                                                                                          pytest.approx(0.081)]
    assert alarms["lr_differs"]["step"] == 1
    assert f"testbed: {out}: ok, 7 rows; verdict: DIVERGED" in first.log


@pytest.mark.timeout(600)
def test_testbed_report_renders_the_monitors_record(bugs_then_rerun: dict[str, Any], tmp_path: Path) -> None:
    out = bugs_then_rerun["out"]
    assert cli_main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "record_scripts" in page and "DIVERGED" in page.upper()
    # rendered like a scenario's run: one explanation line (the recorded verdict) and the evidence figure
    verdict = _run_json(out)["verdict"]
    assert page.count("class='verdict") == 1 and html.escape(verdict["headline"]) in page
    assert (tmp_path / "report" / "record_scripts_evidence.png").is_file() and "record_scripts_evidence.png" in page


@pytest.mark.timeout(600)
def test_a_second_run_into_the_same_out_dir_is_refused_on_every_rank(bugs_then_rerun: dict[str, Any]) -> None:
    out, second = bugs_then_rerun["out"], bugs_then_rerun["second"]
    assert second.code != 0
    line = (f"RunDirError: {out}: holds an earlier run (status 'ok', 7 metric row(s)); pass "
            "overwrite=True to replace it, or choose another directory")
    for rank in (0, 1):  # the one-line error, as the rank's last traceback line (the class lives in record/)
        assert re.search(rf"\[rank{rank}\]: testbed\.record\.\w+\.{re.escape(line)}", second.log), second.log[-4000:]
    assert _record_files(out) == bugs_then_rerun["files"]


@pytest.mark.timeout(600)
def test_sigterm_to_torchrun_finalizes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "mine"

    def stop_at_step_20(launch: Launch, line: str) -> None:
        if line.startswith("step 20"):
            launch.proc.send_signal(signal.SIGTERM)

    launch = Launch("long", out, "100000", on_line=stop_at_step_20)
    run = _run_json(out)
    assert run["status"] == "failed", launch.log[-4000:]
    assert run["reason"].startswith("stopped by SIGTERM at step ") and run["steps_kept"] >= 20
    assert run["verdict"]["status"] == "consistent" and run["wall_time_s"] > 0
    assert len(read_metrics(out)) == run["steps_kept"]
    assert launch.rank_pids and not [p for p in launch.rank_pids if _alive(p)]


@pytest.mark.timeout(600)
def test_a_rank_that_stops_calling_step_ends_the_job_with_its_name(tmp_path: Path) -> None:
    """The "log on rank 0 only" mistake: rank 1 stops calling ``monitor.step`` after step 1 and goes
    on training. Before, every rank hung until killed; now rank 0 names rank 1 within seconds."""
    out = tmp_path / "mine"
    launch = Launch("rank0_only", out)
    assert launch.code != 0
    message = "rank 1 did not call monitor.step for step 2: it began the next backward pass without it"
    assert message in launch.log, launch.log[-4000:]
    run = _run_json(out)
    assert run["status"] == "failed" and message in run["reason"] and run["failed_rank"] == 1
    assert run["failed_step"] == 2 and run["steps_kept"] == 2
    assert launch.wall_s < 120  # the whole launch; the default deadline alone is 60 s
    assert launch.rank_pids and not [p for p in launch.rank_pids if _alive(p)]


@pytest.mark.timeout(600)
def test_a_rank_that_fails_is_named_as_the_root_cause(tmp_path: Path) -> None:
    """Rank 1 raises; rank 0 only sees gloo's "connection closed". The record names rank 1's error."""
    out = tmp_path / "mine"
    launch = Launch("rank1_raises", out)
    assert launch.code != 0
    run = _run_json(out)
    assert run["status"] == "failed" and run["failed_rank"] == 1, run["reason"]
    assert run["reason"].startswith("rank 1 failed at step 4: ValueError: bad batch on rank 1 (then rank 0: ")
    assert run["steps_kept"] == 4 and [m["rank"] for m in run["rank_reports"]] == [1]
