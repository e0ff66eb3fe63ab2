"""Live progress of ``testbed run`` / ``testbed sweep`` (engine/progress.py): the file tail, the two
displays, a sweep's level lines, and a real 200-step run that prints progress lines while it runs."""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import termios
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


class Pty:
    """A real pseudo-terminal: ``slave`` is what a program writes to, ``read()`` what a person sees.
    ``size``: (columns, rows) set on the terminal, or None to leave it unset (0 x 0: ``script``
    without a terminal, ``docker run -t``, ``pty.openpty()``)."""

    def __init__(self, size: tuple[int, int] | None = None):
        self.master, self.slave_fd = pty.openpty()
        if size is not None:
            fcntl.ioctl(self.slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        self.slave = os.fdopen(self.slave_fd, "w", encoding="utf-8", closefd=False)
        self.seen = b""

    def read(self) -> str:
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen.decode("utf-8", "replace")

    def close(self) -> None:
        self.slave.close()
        for fd in (self.slave_fd, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)


def _snapshot() -> Snapshot:
    s = Snapshot(steps_done=50, global_loss=1.23456, cos_min=0.81234, weights_in_sync=False)
    s.recent.extend([0.1, 0.2])
    return s


@pytest.mark.parametrize("size,expected", [
    (None, "50/200, ETA 23s loss 1.23 cos_min 0.812 DIVERGED"),  # no window size: assumed 100 columns
    ((160, 40), "50/200, 0.150 s/step, ETA 23 s | global_loss 1.235 cos_min 0.8123 | weights DIVERGED"),
    ((60, 20), "testbed 50/200, ETA 23s loss 1.23 cos_min 0.812 DIVERGED"),  # narrow: no bar graphic
])
def test_the_bar_is_drawn_on_a_real_pty_of_any_size(size: tuple[int, int] | None, expected: str) -> None:
    """Issue 21: on a pty whose window size was never set, tqdm took 0 - 1 columns and rows and
    drew nothing. The display is asked through a real terminal here, not a fake stream."""
    term = Pty(size)
    try:
        bar = ProgressDisplay(200, stream=term.slave)
        assert bar.tty
        bar.update(_snapshot())
        bar.close()
        term.slave.flush()
        seen = term.read()
    finally:
        term.close()
    assert "\r" in seen and expected in seen, repr(seen)
    width = size[0] if size else 100
    assert all(len(part) <= width for part in seen.replace("\n", "\r").split("\r")), repr(seen)


def test_plain_lines_are_periodic_when_not_a_terminal() -> None:
    s = _snapshot()
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
    term: Pty | None = None

    def fake_launch(scenario: Any, out_dir: Path) -> runner.RunResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        for step in range(scenario.steps):
            _append(out_dir / "timing.jsonl", {"step": step, "seconds": 0.01})
            time.sleep(0.05)
            deadline = time.monotonic() + 60
            while term is not None and step == 2 and f" 3/6, ETA" not in term.read()[-300:]:
                assert time.monotonic() < deadline, "the terminal never showed step 3/6"
                time.sleep(0.02)  # the level goes on once its mid-run state was drawn (no race)
        return runner.RunResult("ok", wall_time_s=0.1)

    monkeypatch.setattr(runner, "launch", fake_launch)
    path = tmp_path / "ladder.toml"
    path.write_text(toml_document(tiny(steps=6, sweep={"parameter": "optim.lr", "values": [0.1, 0.2]})))
    plain = io.StringIO()  # a pipe or a CI log: a plain line per level and per progress tick
    _, _, status = run_sweep(path, tmp_path / "out", stream=plain, every_s=0.0)
    text = plain.getvalue()
    assert list(status.values()) == ["ok", "ok"]
    assert "level 1/2 '0.1': ok in 0.1 s (levels done: 1/2)" in text
    assert "level 2/2 '0.2': ok in 0.1 s (levels done: 2/2)" in text
    assert re.search(r"level 2/2 '0.2': step [1-6]/6 \|", text), text
    term = Pty()  # a real terminal without a window size: each level's bar is redrawn in place
    try:
        run_sweep(path, tmp_path / "out-tty", stream=term.slave, every_s=0.0)
        term.slave.flush()
        seen = term.read()
    finally:
        term.close()
    assert re.search(r"\rlevel 1/2 '0.1' [^\r]* 3/6, ETA", seen), repr(seen)  # drawn mid-level
    assert re.search(r"\rlevel 2/2 '0.2' [^\r]* 3/6, ETA", seen), repr(seen)
    assert "level 2/2 '0.2': ok in 0.1 s (levels done: 2/2)" in seen


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


@pytest.mark.timeout(300)
def test_testbed_run_draws_live_progress_on_a_real_pty(tmp_path: Path) -> None:
    """Issue 21: ``testbed run`` on a pseudo-terminal without a window size (``script -q -c`` from a
    pipe, ``docker run -t``) printed nothing between its first line and the verdict. The whole CLI
    runs here with stdin, stdout and stderr on a real pty; the bar must be redrawn mid-run."""
    scenario = tmp_path / "long.toml"
    scenario.write_text(toml_document(tiny(name="long", steps=200, timeout_s=240.0, metrics={"weight_check_every": 10},
                                           perturbations=[{"kind": "straggler", "ranks": [1], "delay_s": 0.01}])))
    term = Pty()
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(scenario), "--out", str(tmp_path / "run")],
                            cwd=REPO, stdin=term.slave_fd, stdout=term.slave_fd, stderr=term.slave_fd,
                            start_new_session=True)
    seen = ""
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            seen = term.read()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("testbed run did not finish in 240 s:\n" + seen[-4000:])
        seen = term.read()
    finally:
        term.close()
    assert proc.returncode == 0, seen[-4000:]
    before_verdict = seen[:seen.index("verdict:")]
    drawn = [int(m.group(1)) for m in re.finditer(r"\rtestbed [^\r\n]*?(\d+)/200, ETA", before_verdict)]
    assert any(0 < k < 200 for k in drawn), repr(before_verdict[-2000:])
    assert drawn == sorted(drawn)
