"""Issue 23 attacks that need real ranks (docs/reliability.md, "Attacked again"): what listens during
a run, SIGTERM / Ctrl-C to ``testbed gate``, SIGTERM to ``testbed sweep``, and torchrun jobs that
never reach rank 0. Each is 2-rank, a few steps; the hang fault keeps a run in flight until the
signal (rank 1 sleeps at step 3, so steps 0..2 are recorded)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import cli
from testbed.record.files import read_metrics
from testbed.gate.gate import slug as segment
from tests.attack_fixtures import scenario_file
from tests.helpers import tiny
from tests.scenario_files import to_toml
from tests.test_faults import ChildWatcher, assert_no_survivors

HANG = [{"kind": "hang", "ranks": [1], "start_step": 3}]


def _hang_file(path: Path, name: str, sweep: bool = False) -> Path:
    raw = tiny(name=name, steps=6, stall_timeout_s=200.0, timeout_s=300.0, perturbations=HANG)
    if sweep:
        raw["sweep"] = {"parameter": "seed", "values": [0, 1]}
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


def _wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen[Any], limit_s: float = 150.0) -> None:
    deadline = time.monotonic() + limit_s
    while len(read_metrics(run_dir)) < n:
        assert proc.poll() is None, f"ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {n} rows in {run_dir}"
        time.sleep(0.1)


# ---- 2. no port beyond loopback -------------------------------------------------------------------

def _listening() -> dict[int, tuple[str, int]]:
    """socket inode -> (hex address, port) of every TCP socket in LISTEN state (/proc/net/tcp{,6})."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].split(":")
                out[int(fields[9])] = (address, int(port, 16))
    return out


def _sockets(pid: int) -> set[int]:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    except OSError:
        pass
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net/tcp{,6} write them


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
@pytest.mark.timeout(240)
def test_a_run_listens_on_loopback_only(tmp_path: Path) -> None:
    """The launcher's store listened on *:PORT (IPv4 and IPv6); now every listening socket of the
    launcher and its ranks is on 127.0.0.1, sampled every 0.1 s while the run is in flight."""
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(_hang_file(tmp_path / "h.toml", "h")),
                             "--out", str(tmp_path / "run"), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    try:
        with ChildWatcher(root=proc.pid) as watch:
            deadline = time.monotonic() + 150
            while len(read_metrics(tmp_path / "run")) < 3 and time.monotonic() < deadline and proc.poll() is None:
                listening = _listening()
                for pid in [proc.pid, *(p for (p, _) in watch.seen)]:
                    seen |= {listening[i] for i in _sockets(pid) if i in listening}
                time.sleep(0.1)
            assert len(read_metrics(tmp_path / "run")) >= 3, proc.stderr
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ports = {port for _, port in seen}
    assert len(ports) >= 2, seen  # the store and the ranks' gloo listeners were seen
    assert {address for address, _ in seen} <= LOOPBACK, seen


# ---- 3. signals to the gate and the sweep finalize the running records --------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_the_gate_stops_the_scenarios_in_flight_and_finalizes_them(tmp_path: Path,
                                                                               sig: signal.Signals) -> None:
    """SIGTERM: exit 143 with nothing printed and the scenario left 'running'; Ctrl-C waited for
    every in-flight scenario to finish. Now each in-flight run is stopped within a poll and
    finalized, gate.json says 'stopped', and the exit status is the signal's."""
    names = ["hang-a"] if sig == signal.SIGTERM else ["hang-a", "hang-b"]
    files = [str(_hang_file(tmp_path / f"{n}.toml", n)) for n in names]
    out = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "gate", *files, "--baseline", str(tmp_path / "b.json"),
                             "--update-baseline", "--out", str(out), "--jobs", str(len(files))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with ChildWatcher(root=proc.pid) as watch:
            for n in names:
                _wait_for_rows(out / segment(n), 3, proc)
            signalled = time.monotonic()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=90)
            stopped_in = time.monotonic() - signalled
        assert proc.returncode == 128 + sig, err
        assert stopped_in < 60, stopped_in  # the hung scenarios would have run 200 s more
        assert "Traceback" not in err and f"testbed gate: stopped by {sig.name}" in err, err
        for n in names:
            run = json.loads((out / segment(n) / "run.json").read_text())
            assert run["status"] == "failed" and run["steps_kept"] >= 3, run["reason"]
            assert "stopped by SIG" in run["reason"] or "interrupted" in run["reason"], run["reason"]
        assert json.loads((out / "gate.json").read_text())["status"] == "stopped"
        assert_no_survivors(watch, 2 * len(names), wait_s=10.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(240)
def test_sigterm_to_a_sweep_finalizes_the_level_and_exits_143(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "sweep", str(_hang_file(tmp_path / "s.toml", "s", True)),
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with ChildWatcher(root=proc.pid) as watch:
            _wait_for_rows(out / "level-00-0", 3, proc)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        level = json.loads((out / "level-00-0" / "run.json").read_text())
        assert (level["status"], level["reason"]) == ("failed", "launcher stopped by SIGTERM")
        assert [lv["status"] for lv in json.loads((out / "sweep.json").read_text())["levels"]] == ["pending", "pending"]
        assert "Traceback" not in err
        assert_no_survivors(watch, 2, wait_s=10.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- 3. torchrun jobs that never reach rank 0 still end with a final run.json ---------------------

@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["port-in-use", "second-node-never-comes"])
def test_torchrun_that_never_starts_rank_0_leaves_a_final_record(tmp_path: Path, case: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from testbed.engine import launch_plan

    monkeypatch.setattr(launch_plan, "TORCHRUN_GRACE_S", 10.0)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    if case == "port-in-use":
        holder.listen()
    else:
        holder.close()  # free: torchrun binds it and waits for node 1
    try:
        code = cli.main(["run", str(scenario_file(tmp_path / "s.toml", timeout_s=1.0)), "--launcher", "torchrun",
                         "--nnodes", "2", "--master-port", str(port), "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        holder.close()
    capsys.readouterr()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 1 and run["status"] == "failed" and run["steps_kept"] == 0 and "verdict" in run
    expected = "EADDRINUSE" if case == "port-in-use" else "exceeded timeout_s + 10 s and was killed (waiting for 2 nodes"
    assert expected in run["reason"], run["reason"]
