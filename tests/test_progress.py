"""Live progress of ``testbed run`` / ``testbed sweep`` (engine/progress.py): the file tail, the two
displays, a sweep's level lines, and a real 200-step run that prints progress lines while it runs."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.engine import runner
from testbed.engine.progress import ProgressDisplay, RunTail, Snapshot
from testbed.engine.sweep import run_sweep
from tests.helpers import tiny
from tests.test_scenario_fuzz import toml_document

REPO = Path(__file__).resolve().parents[1]


def _append(path: Path, *rows: dict[str, Any], end: str = "\n") -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + end)


def test_tail_ignores_a_previous_runs_files_and_reads_whole_lines(tmp_path: Path) -> None:
    _append(tmp_path / "timing.jsonl", {"step": 99, "seconds": 5.0})  # an earlier run in the same directory
    tail = RunTail(tmp_path)
    assert tail.poll().steps_done == 0
    (tmp_path / "timing.jsonl").unlink()  # the launcher removes it before the ranks start
    assert tail.poll().steps_done == 0
    _append(tmp_path / "timing.jsonl", {"step": 0, "seconds": 0.5}, {"step": 1, "seconds": 0.25})
    _append(tmp_path / "timing.jsonl", {"step": 2, "seconds": 0.75}, end="")  # rank 0 is mid-line
    _append(tmp_path / "metrics.jsonl", {"step": 0, "global_loss": 2.0, "cos_min": 0.9, "weights_in_sync": True},
            {"step": 1, "global_loss": 1.5, "cos_min": None})
    s = tail.poll()
    assert (s.steps_done, s.seconds_per_step) == (2, 0.375)
    assert (s.global_loss, s.cos_min, s.weights_in_sync) == (1.5, None, True)
    with open(tmp_path / "timing.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")  # rank 0 finishes the line
    _append(tmp_path / "timing.jsonl", {"step": 3, "seconds": 0.5})
    assert tail.poll().steps_done == 4


def test_terminal_bar_is_redrawn_in_place_and_plain_lines_are_periodic() -> None:
    s = Snapshot(steps_done=50, global_loss=1.23456, cos_min=0.81234, weights_in_sync=False)
    s.recent.extend([0.1, 0.2])
    tty = io.StringIO()
    bar = ProgressDisplay(200, stream=tty, tty=True)
    bar.update(s)
    bar.close()
    assert "\r" in tty.getvalue() and "50/200" in tty.getvalue()
    assert "0.150 s/step, ETA 23 s | global_loss 1.235 cos_min 0.8123 | weights DIVERGED" in tty.getvalue()
    plain = io.StringIO()
    lines = ProgressDisplay(200, stream=plain, tty=False, every_s=3600.0)
    lines.update(s)  # not yet due
    lines.last_line -= 3600.0
    lines.update(s)
    lines.update(s)  # due, but no new step
    assert plain.getvalue() == ("testbed: step 50/200 | 0.150 s/step, ETA 23 s | global_loss 1.235 cos_min 0.8123 "
                                "| weights DIVERGED\n")
    assert "\r" not in plain.getvalue() and "\033" not in plain.getvalue()


def test_sweep_shows_each_levels_progress_and_the_levels_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_launch(scenario: Any, out_dir: Path) -> runner.RunResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        for step in range(scenario.steps):
            _append(out_dir / "timing.jsonl", {"step": step, "seconds": 0.01})
            time.sleep(0.05)
        return runner.RunResult(out_dir, "ok", wall_time_s=0.1)

    monkeypatch.setattr(runner, "launch", fake_launch)
    path = tmp_path / "ladder.toml"
    path.write_text(toml_document(tiny(steps=6, sweep={"parameter": "optim.lr", "values": [0.1, 0.2]})))
    stream = io.StringIO()
    _, _, status = run_sweep(path, tmp_path / "out", stream=stream, every_s=0.0)
    text = stream.getvalue()
    assert list(status.values()) == ["ok", "ok"]
    assert "level 1/2 '0.1': ok in 0.1 s (levels done: 1/2)" in text
    assert "level 2/2 '0.2': ok in 0.1 s (levels done: 2/2)" in text
    assert re.search(r"level 2/2 '0.2': step [1-6]/6 \|", text), text


@pytest.mark.timeout(300)
def test_testbed_run_prints_progress_lines_while_it_runs(tmp_path: Path) -> None:
    """200 steps of a 2-rank job (rank 1 a 10 ms straggler, so the run lasts >= 2 s), stderr a pipe."""
    scenario = tmp_path / "long.toml"
    scenario.write_text(toml_document(tiny(name="long", steps=200, timeout_s=240.0, metrics={"weight_check_every": 10},
                                           perturbations=[{"kind": "straggler", "ranks": [1], "delay_s": 0.01}])))
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(scenario), "--out", str(tmp_path / "run"),
                             "--progress-every", "0.5"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen: list[tuple[float, str]] = []

    def read(stream: Any) -> None:
        for line in stream:
            seen.append((time.monotonic(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("testbed run did not finish in 240 s:\n" + "\n".join(line for _, line in seen[-40:]))
    for t in readers:
        t.join(timeout=10)
    text = "\n".join(line for _, line in seen)
    assert proc.returncode == 0, text[-4000:]
    progress = [(t, int(m.group(1)), line) for t, line in seen
                if (m := re.match(r"testbed: step (\d+)/200 \| \d+\.\d+ s/step, ETA \d+ s \| global_loss \S+ "
                                  r"cos_min \S+ \| weights (in sync|-)$", line))]
    done_at = next(t for t, line in seen if line.startswith("ok in "))
    mid_run = [p for p in progress if p[1] < 200 and p[0] < done_at]
    assert len(mid_run) >= 2, text[-4000:]
    assert [p[1] for p in progress] == sorted(p[1] for p in progress)
