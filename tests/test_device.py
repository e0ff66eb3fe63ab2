"""Device and backend resolution (cpu→gloo, cuda→nccl, npu→hccl), a clear DeviceError for a missing
device - in-process and from a real launch - and the 8-rank HCCL plan of the openPangu scenarios
printed by ``--dry-run`` on a machine without any NPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testbed import cli
from testbed.engine.device import BACKEND_FOR, DeviceError, local_device, npu_available, resolve_backend, resolve_device_type
from testbed.scenario.spec import ScenarioError, load_scenario
from tests.helpers import run, tiny

REPO = Path(__file__).resolve().parent.parent
OPENPANGU = REPO / "scenarios" / "openpangu"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
no_npu = pytest.mark.skipif(npu_available(), reason="this machine has an NPU")


@pytest.mark.parametrize("device", ["cpu", "cuda", "npu"])
def test_auto_backend_is_the_devices_native_one(device):
    assert resolve_backend("auto", device) == BACKEND_FOR[device] == {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device]
    assert resolve_backend("gloo", device) == "gloo"  # CPU-side collectives work with any device


@pytest.mark.parametrize("backend,device", [("nccl", "npu"), ("hccl", "cuda"), ("nccl", "cpu"), ("hccl", "cpu")])
def test_mismatched_backend_is_refused(backend, device):
    with pytest.raises(DeviceError, match=f"backend '{backend}' does not work with device '{device}'"):
        resolve_backend(backend, device)


@no_cuda
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="device 'cuda' was asked for but torch.cuda.is_available\\(\\) is False"):
        resolve_device_type("cuda")
    with pytest.raises(DeviceError, match="LOCAL_RANK 0 but only 0 cuda device"):
        local_device("cuda", 0)


@no_npu
def test_missing_npu_is_a_clear_error():
    with pytest.raises(DeviceError, match="torch_npu is not importable"):
        resolve_device_type("npu")


@no_cuda
@no_npu
def test_auto_device_on_a_cpu_machine_is_cpu():
    assert resolve_device_type("auto") == "cpu" and local_device("cpu", 3) == torch.device("cpu")


@no_cuda
def test_a_run_that_asks_for_cuda_is_refused_before_any_rank_starts(tmp_path):
    with pytest.raises(ScenarioError) as info:
        run(tiny(device="cuda", steps=1), tmp_path / "out")
    assert info.value.field == "device" and "device 'cuda' was asked for" in str(info.value)
    assert not (tmp_path / "out").exists()  # the launcher refused it: no run directory, no rank


@pytest.mark.parametrize("path", sorted(OPENPANGU.glob("*.toml")), ids=lambda p: p.stem)
def test_openpangu_scenarios_are_the_reference_setup(path):
    s = load_scenario(path)
    assert (s.world_size, s.device, s.backend) == (8, "npu", "hccl")
    assert s.model.kind == "hf" and s.model.params["dtype"] == "bf16-mixed" and s.model.params["trust_remote_code"]
    assert s.data.kind == "alpaca" and s.data.params["max_len"] == 1024
    assert s.data.params["tokenizer"] == s.model.params["path"]  # the model's own tokenizer


@no_npu
def test_dry_run_prints_the_8_rank_hccl_plan_without_an_npu(capsys):
    code = cli.main(["run", str(OPENPANGU / "control.toml"), "--launcher", "torchrun", "--dry-run",
                     "--out", "runs/op"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "1 node(s) × 8 process(es) = world_size 8" in text
    assert "device     npu (asked: npu)" in text and "backend    hccl (asked: hccl)" in text
    assert all(f"rank {r}   node 0  LOCAL_RANK {r}  npu:{r}" in text for r in range(8))
    assert "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in text and "HCCL_CONNECT_TIMEOUT=" in text
    assert (f"torchrun --standalone --nproc-per-node 8 -m testbed.worker {OPENPANGU / 'control.toml'} "
            "--out runs/op") in text
    assert "expected memory per rank" in text and "optimizer" in text and "GiB" in text
    assert "no 'npu' device on this machine: fine for --dry-run" in text
    assert not Path("runs/op").exists()


def test_dry_run_of_an_impossible_pair_explains(capsys):
    code = cli.main(["run", str(OPENPANGU / "control.toml"), "--dry-run", "--set", 'backend="nccl"'])
    assert code == 2 and "backend 'nccl' does not work with device 'npu'" in capsys.readouterr().err
