"""Every bad input is refused before launch: the exit code is 2 and the one line printed names the
field (or ``--out``, or the baseline key). The table is the attack list of docs/reliability.md;
each case goes through the real CLI entry point in this process, so a traceback would fail the
test, and the run directory must not exist afterwards (nothing was launched)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from testbed import cli
from testbed.cli.common import EXIT_USAGE
from testbed.engine import preflight
from testbed.engine.device import npu_available
from testbed.scenario.readers import MAX_DEPTH
from testbed.scenario.spec import load_scenario
from tests.helpers import TINY
from tests.scenario_files import to_toml


def _doc(**changes: Any) -> str:
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        table, _, field = key.rpartition(".")
        node = raw[table] if table else raw
        if value is None:
            node.pop(field)
        else:
            node[field] = value
    return to_toml(raw)


NESTED = "x = " + "[" * 500 + "]" * 500 + "\n"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: device = 'cuda' is valid")
no_npu = pytest.mark.skipif(npu_available(), reason="this machine has an NPU")

# id → (scenario text, extra arguments, what the one line must name)
CASES: dict[str, tuple[str, list[str], str]] = {
    "lr-1e308": (_doc(**{"optim.lr": 1e308}), [], "'optim.lr'"),
    "lr-nan": (_doc().replace("lr = 0.1", "lr = nan"), [], "'optim.lr'"),
    "lr-inf": (_doc().replace("lr = 0.1", "lr = inf"), [], "'optim.lr'"),
    "lr-negative": (_doc(**{"optim.lr": -0.1}), [], "'optim.lr'"),
    "lr-zero": (_doc(**{"optim.lr": 0.0}), [], "'optim.lr'"),
    "momentum-negative": (_doc(**{"optim.momentum": -0.5}), [], "'optim.momentum'"),
    "nesterov-without-momentum": (_doc(**{"optim.nesterov": True}), [], "'optim.momentum'"),
    "adamw-beta1-1": (_doc(optim={"kind": "adamw", "lr": 0.01, "beta1": 1.0}), [], "'optim.beta1'"),
    "hidden-0": (_doc(**{"model.hidden": 0}), [], "'model.hidden'"),
    "dropout-1.5": (_doc(**{"model.dropout": 1.5}), [], "'model.dropout'"),
    "features-0": (_doc(**{"data.features": 0}), [], "'data.features'"),
    "dataset-too-small": (_doc(**{"data.size": 15, "data.batch_size": 8, "world_size": 4}), [], "'data.size'"),
    "threads-per-rank-0": (_doc(threads_per_rank=0), [], "'threads_per_rank': expected a positive integer,"),
    "straggler-negative": (_doc(perturbations=[{"kind": "straggler", "delay_s": -1.0}]), [],
                           "'perturbations[0].delay_s'"),
    "label-noise-2": (_doc(perturbations=[{"kind": "label_noise", "fraction": 2.0}]), [],
                      "'perturbations[0].fraction'"),
    "backend-nccl-on-cpu": (_doc(backend="nccl"), [], "'backend'"),
    "backend-hccl-on-cpu": (_doc(backend="hccl"), [], "'backend'"),
    "name-escapes-runs": (_doc(name="../../etc/x"), [], "'name'"),
    "name-with-slash": (_doc(name="a/b"), [], "'name'"),
    "name-300000-chars": (_doc(name="n" * 300_000), [], "'name'"),
    "nested-500-deep": (_doc() + NESTED, [], "'<file>'"),
    "nested-500-deep-set": (_doc(), ["--set", "x=" + "[" * 500 + "]" * 500], "'x'"),
    "set-without-equals": (_doc(), ["--set", "optim"], "'optim'"),
    "set-empty-key": (_doc(), ["--set", "=3"], "'=3'"),
    "world-size-1": (_doc(world_size=1), [], "'world_size'"),
}
DEVICE_CASES = {  # only where the device is really absent: elsewhere these are valid scenarios
    "device-cuda": pytest.param(_doc(device="cuda"), [], "'device'", marks=no_cuda),
    "device-npu": pytest.param(_doc(device="npu"), [], "'device'", marks=no_npu),
}


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, args: list[str]) -> tuple[int, list[str]]:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    code = cli.main(["run", str(path), "--out", str(tmp_path / "out"), *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("text", "args", "needle"), [*CASES.values(), *DEVICE_CASES.values()],
                         ids=[*CASES, *DEVICE_CASES])
def test_bad_scenario_is_one_line_naming_the_field_and_nothing_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, args: list[str], needle: str) -> None:
    code, lines = _run(tmp_path, capsys, text, args)
    assert code == EXIT_USAGE, lines
    assert len(lines) == 1 and needle in lines[0], lines
    assert lines[0].startswith("testbed: scenario error: ") and "Traceback" not in lines[0]
    assert not (tmp_path / "out").exists()  # refused before the run directory, let alone a rank


def test_a_deep_document_from_the_api_is_refused_without_recursing() -> None:
    from testbed.scenario.spec import ScenarioError, parse_scenario

    deep: Any = 1
    for _ in range(5000):  # built iteratively; copy.deepcopy or a recursive walk would overflow
        deep = [deep]
    with pytest.raises(ScenarioError) as info:
        parse_scenario({**TINY, "x": deep}, source="<api>")
    assert info.value.field == "x" and f"at most {MAX_DEPTH} levels" in str(info.value)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + _doc().encode("utf-8"))  # what Windows editors save
    assert load_scenario(path).name == "tiny"


@pytest.mark.parametrize(("out", "why"), [
    ("FILE", "exists and is not a directory"),
    ("/proc/testbed-run", "cannot write there"),
    ("/proc/self/status/x", "cannot write there"),
    ("/sys/testbed-run", "cannot write there"),
])
def test_unusable_out_is_a_one_line_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                out: str, why: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    target = str(tmp_path / "file") if out == "FILE" else out
    path = tmp_path / "ok.toml"
    path.write_text(_doc(), encoding="utf-8")
    code = cli.main(["run", str(path), "--out", target])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0].startswith(f"testbed run: --out {target}: {why}"), lines


@pytest.mark.parametrize("value", ["abc", None, float("nan"), [1]])
def test_gate_refuses_a_bad_baseline_value_before_running_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(_doc(), encoding="utf-8")
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"format": "testbed-baseline/1", "scenarios": {
        "tiny": {"values": {"loss_cv.mean": value, "weights_in_sync": True}}}}))
    code = cli.main(["gate", str(scenario), "--baseline", str(baseline), "--out", str(tmp_path / "gate")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert "scenarios.tiny.values.loss_cv.mean: expected a finite number or true/false" in lines[0], lines
    assert not (tmp_path / "gate").exists()  # no scenario ran


def test_sizes_beyond_the_machine_are_warned_about() -> None:
    from testbed.scenario.spec import parse_scenario

    many = preflight.machine_warnings(parse_scenario({**TINY, "world_size": 4096,
                                                      "data": {**TINY["data"], "size": 4096 * 8}}))
    assert any("CPU core(s)" in w for w in many) and any("MB of memory is available" in w for w in many), many
    threads = preflight.machine_warnings(parse_scenario({**TINY, "threads_per_rank": 4096}))
    assert any("threads_per_rank 4096" in w or "8192 threads" in w for w in threads), threads
    assert preflight.machine_warnings(parse_scenario(TINY)) == []  # 2 ranks, 1 thread: quiet


@pytest.mark.timeout(120)
def test_the_cli_prints_no_traceback_for_a_bad_value(tmp_path: Path) -> None:
    """The same through a real process (the in-process cases cannot see interpreter-level output)."""
    path = tmp_path / "bad.toml"
    path.write_text(_doc(**{"optim.lr": 1e308}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr
