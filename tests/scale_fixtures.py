"""Fixtures and helpers shared by the scale-path tests (torchrun, hf + alpaca, the drop-in monitor).

Expensive things are made once per test session and shared between pytest-xdist workers through
a file lock in the session's common temp directory: the tiny checkpoints, and the built-in
runner's records that the torchrun / monitor / Trainer results are compared against.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed.record.files import read_metrics
from testbed.engine.proctree import kill_tree
from testbed.engine.runner import launch
from testbed.scenario.spec import Scenario, load_scenario, parse_scenario
from tests.helpers import tiny

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 300

# The built-in run that the Trainer callback is compared against: tiny Llama + generated alpaca.
HF_STEPS, HF_BATCH, HF_MAX_LEN, HF_SEED = 3, 4, 64, 0
# The run that the torchrun launch and the plain-DDP monitor loop are compared against (no dropout:
# a user's plain loop need not replay the runner's per-step RNG seeds).
MLP_TOML = """
name = "mlp-2rank"
description = "scale-path tests: a small synced MLP job"
world_size = 2
steps = 3
seed = 0
timeout_s = 240.0
stall_timeout_s = 60.0

[model]
kind = "mlp"
hidden = 32
depth = 2
dropout = 0.0

[data]
kind = "synthetic"
batch_size = 16
size = 1024
features = 16
classes = 4

[optim]
kind = "sgd"
lr = 0.1
momentum = 0.9

[metrics]
weight_check_every = 1
"""


def write_mlp_scenario(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mlp.toml"
    path.write_text(MLP_TOML)
    return path


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(dir)`` once per session across xdist workers; returns its JSON-able result."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(json.dumps(make(target)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama checkpoint + tokenizer + alpaca.json, and the same weights in openPangu layout."""
    def make(root: Path) -> dict[str, str]:
        from testbed.workloads.tiny_checkpoint import make_tiny_checkpoint

        llama = make_tiny_checkpoint(root / "llama")
        pangu = make_tiny_checkpoint(root / "pangu", pangu=True)
        return {"llama": str(llama), "pangu": str(pangu), "alpaca": str(llama / "alpaca.json")}

    return {k: Path(v) for k, v in _shared(tmp_path_factory, "tiny_hf", make).items()}


@pytest.fixture
def modules_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Remote code lands in this session's tmp, never in the user's cache. The ``transformers_modules``
    package transformers made for another cache directory (an earlier test in this process) is
    forgotten first, or the new cache's modules cannot be imported; the remote modules and a fake
    torch_npu imported during the test are forgotten after it, so the next test executes them again
    (a real torch_npu imported before the test stays)."""
    import transformers.dynamic_module_utils as dynamic

    def forget(names: set[str]) -> None:
        for name in names & set(sys.modules):
            del sys.modules[name]

    forget({n for n in sys.modules if n.split(".")[0] == "transformers_modules"})
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))
    before = set(sys.modules)
    yield
    forget({n for n in set(sys.modules) - before if n.split(".")[0] in ("transformers_modules", "torch_npu")})


def hf_raw(tiny_hf: dict[str, Path], **changes: Any) -> dict[str, Any]:
    """The 2-rank gloo scenario with ``kind = "hf"`` and ``kind = "alpaca"`` on the tiny checkpoint."""
    raw = tiny(name="hf-alpaca", steps=HF_STEPS, seed=HF_SEED, timeout_s=240.0,
               model={"kind": "hf", "path": str(tiny_hf["llama"])},
               data={"kind": "alpaca", "batch_size": HF_BATCH, "path": str(tiny_hf["alpaca"]),
                     "tokenizer": str(tiny_hf["llama"]), "max_len": HF_MAX_LEN},
               optim={"kind": "sgd", "lr": 0.5}, metrics={"weight_check_every": 1})
    raw.update(changes)
    return raw


def _runner_record(scenario: Scenario, out: Path) -> dict[str, Any]:
    result = launch(scenario, out)
    return {"ok": result.ok, "reason": result.reason, "out": str(out), "rows": read_metrics(out)}


@pytest.fixture(scope="session")
def hf_runner_record(tmp_path_factory: pytest.TempPathFactory, tiny_hf: dict[str, Path]) -> dict[str, Any]:
    """The built-in runner's record of the hf + alpaca scenario (2 gloo ranks)."""
    return _shared(tmp_path_factory, "hf_run", lambda out: _runner_record(parse_scenario(hf_raw(tiny_hf)), out))


@pytest.fixture(scope="session")
def mlp_runner_record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The built-in (spawn) runner's record of MLP_TOML, and the scenario file it ran."""
    def make(out: Path) -> dict[str, Any]:
        path = write_mlp_scenario(out.with_name("mlp_scenario"))
        return {**_runner_record(load_scenario(path), out), "scenario_file": str(path)}

    return _shared(tmp_path_factory, "mlp_run", make)


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, timeout: float = TORCHRUN_TIMEOUT_S) -> tuple[int, str]:
    """``python -m torch.distributed.run --standalone`` (free rendezvous port), bounded; (exit code, output)."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return run_bounded(cmd, env, timeout)


def run_bounded(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command in its own session; on timeout kill it and every descendant (torchrun's ranks
    run in sessions of their own), so it never leaves processes or hangs on their output pipe."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"{cmd[:6]}... did not finish in {timeout} s:\n{out[-4000:]}") from None
    return proc.returncode, out


def assert_rows_close(actual: list[dict[str, Any]], expected: list[dict[str, Any]], keys: tuple[str, ...],
                      rtol: float, atol: float = 0.0) -> None:
    """Same steps, and every listed metric (scalar or per-rank list) equal within tolerance."""
    import numpy as np

    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        for key in keys:
            assert a.get(key) is not None and e.get(key) is not None, (key, a.get(key), e.get(key))
            np.testing.assert_allclose(a[key], e[key], rtol=rtol, atol=atol, err_msg=f"step {e['step']} {key}")
