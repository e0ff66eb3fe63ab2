"""torchrun as launcher: a real 2-rank CPU launch of ``-m testbed.worker`` writes the normal record
and the same metrics as the spawn launcher; ``testbed run --launcher torchrun`` reports a failing
rank as the root cause; the entry point explains what is wrong when run outside torchrun."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from testbed import cli
from testbed.engine import torchrun as entry
from testbed.record.files import read_metrics
from tests.helpers import run_json
from tests.scale_fixtures import MLP_TOML, mlp_runner_record, run_bounded, torchrun, write_mlp_scenario  # noqa: F401

METRICS = ("loss", "grad_norm", "cos_to_mean", "noise_scale", "weight_checksum")


@pytest.mark.timeout(400)
def test_torchrun_launch_writes_the_record_and_matches_spawn(mlp_runner_record, tmp_path):
    out = tmp_path / "run"
    code, log = torchrun(["-m", "testbed.worker", mlp_runner_record["scenario_file"], "--out", str(out)], tmp_path)
    assert code == 0, log[-4000:]
    record = run_json(out)
    assert record["status"] == "ok" and record["launcher"] == "torchrun" and record["wall_time_s"] > 0
    rows = read_metrics(out)
    expected = mlp_runner_record["rows"]
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [0, 1, 2]
    for got, want in zip(rows, expected):  # same processes' arithmetic, so the same bits
        assert {k: got[k] for k in METRICS} == {k: want[k] for k in METRICS}


@pytest.mark.timeout(400)
def test_cli_torchrun_launcher_names_the_failing_rank(tmp_path):
    scenario = tmp_path / "crash.toml"
    scenario.write_text(MLP_TOML + '\n[[perturbations]]\nkind = "crash"\nranks = [1]\nstart_step = 2\n')
    out = tmp_path / "run"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code, log = run_bounded([sys.executable, "-m", "testbed", "run", str(scenario), "--launcher", "torchrun",
                             "--out", str(out), "--steps", "4"], env, timeout=300)
    assert code == 1, log[-4000:]
    record = run_json(out)
    assert record["status"] == "failed" and (record["failed_rank"], record["failed_step"]) == (1, 2)
    assert "InjectedFault" in record["reason"] and "InjectedFault" in record["traceback"]
    assert [r["step"] for r in read_metrics(out)] == [0, 1]  # completed steps are kept
    assert "FAILED: rank 1 failed at step 2" in log


def test_entry_point_outside_torchrun_says_so(monkeypatch, tmp_path):
    for var in entry.LAYOUT_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="start this entry point with torchrun"):
        entry.main.__wrapped__([str(write_mlp_scenario(tmp_path)), "--out", str(tmp_path / "out")])


def test_entry_point_refuses_a_world_size_mismatch(monkeypatch, tmp_path):
    for var, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match="world_size = 2 but torchrun started 3 processes; pass --world-size 3"):
        entry.main.__wrapped__([str(write_mlp_scenario(tmp_path)), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_dry_run_prints_a_multi_node_plan(capsys, tmp_path):
    scenario = write_mlp_scenario(tmp_path)
    code = cli.main(["run", str(scenario), "--launcher", "torchrun", "--dry-run", "--world-size", "4",
                     "--nnodes", "2", "--master-addr", "10.0.0.1", "--master-port", "29555", "--out", "/shared/run"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2 node(s) × 2 process(es) = world_size 4" in text
    assert "rank 3   node 1  LOCAL_RANK 1  cpu" in text and "backend    gloo" in text
    for node in (0, 1):
        assert (f"torchrun --nnodes 2 --node-rank {node} --master-addr 10.0.0.1 --master-port 29555 "
                f"--nproc-per-node 2 -m testbed.worker {scenario} --out /shared/run --world-size 4") in text
    assert not Path("/shared/run").exists()


def test_dry_run_rejects_an_uneven_node_split(capsys, tmp_path):
    code = cli.main(["run", str(write_mlp_scenario(tmp_path)), "--launcher", "torchrun", "--dry-run", "--nnodes", "3"])
    assert code == 2 and "not divisible by --nnodes 3" in capsys.readouterr().err


STAND_IN_TORCHRUN = """
import subprocess, sys, time
from pathlib import Path
from testbed.engine.finalize import start_record
from testbed.scenario.spec import load_scenario
scenario_path, out, pid_file = map(Path, sys.argv[1:4])
rank = subprocess.Popen(["sleep", "300"], start_new_session=True)  # as torchrun starts its ranks
pid_file.write_text(str(rank.pid))
start_record(load_scenario(scenario_path), out, "gloo", "torchrun")  # what rank 0 writes first
time.sleep(300)  # hung
"""


def test_torchrun_timeout_kills_every_rank_and_finishes_the_record(monkeypatch, tmp_path):
    """torchrun starts each rank in a session of its own: on timeout the launcher must kill them
    too (not only torchrun's session), and finish the record rank 0 could not. A stand-in torchrun
    (same Popen call) plays a hung job, so this takes seconds, not timeout_s + the 60 s grace."""
    import subprocess

    from testbed.engine import launch_plan

    scenario, out, pid_file = write_mlp_scenario(tmp_path), tmp_path / "run", tmp_path / "rank.pid"
    real_popen = subprocess.Popen

    def stand_in(cmd, **kwargs):
        if cmd[:1] == ["git"]:  # the record's environment (git rev-parse), written before torchrun starts
            return real_popen(cmd, **kwargs)
        assert cmd[1:3] == ["-m", "torch.distributed.run"] and kwargs["start_new_session"]
        return real_popen([sys.executable, "-c", STAND_IN_TORCHRUN, str(scenario), str(out), str(pid_file)], **kwargs)

    monkeypatch.setattr(launch_plan.subprocess, "Popen", stand_in)
    monkeypatch.setattr(launch_plan, "TORCHRUN_GRACE_S", 4.0)
    code = cli.main(["run", str(scenario), "--launcher", "torchrun", "--out", str(out), "--set", "timeout_s=1",
                     "--no-progress"])
    assert code == 1
    rank = int(pid_file.read_text())
    assert not Path(f"/proc/{rank}").exists() or Path(f"/proc/{rank}/stat").read_text().split()[2] == "Z"
    record = run_json(out)
    assert record["status"] == "failed" and "exceeded timeout_s + 4 s and was killed" in record["reason"]
    assert "verdict" in record and record["steps_kept"] == 0
