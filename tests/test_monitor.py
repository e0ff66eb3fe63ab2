"""The drop-in monitor: a user's plain 2-rank DDP loop and a 2-rank Hugging Face Trainer run, both
launched with torchrun, record per-step metrics equal to the built-in runner's on the same data,
seed and initial weights (tests/monitor_scripts.py builds both so that they see the same batches)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import testbed
from testbed.engine import teardown
from testbed.record.files import read_metrics
from testbed.scenario.spec import load_scenario, parse_scenario
from tests.scale_fixtures import (HF_STEPS, assert_rows_close, hf_raw, hf_runner_record, mlp_runner_record,  # noqa: F401
                                  tiny_hf, torchrun)

SCRIPT = str(Path(__file__).with_name("monitor_scripts.py"))
METRICS = ("loss", "global_loss", "loss_std", "grad_norm", "grad_norm_std", "mean_grad_norm", "cos_to_mean",
           "cos_mean", "noise_scale")


def _launch(mode: str, scenario_dict: dict, tmp_path: Path) -> list[dict]:
    spec = tmp_path / "scenario.json"
    spec.write_text(json.dumps(scenario_dict))
    out = tmp_path / "out"
    code, log = torchrun([SCRIPT, mode, str(spec), str(out)], tmp_path)
    assert code == 0, log[-4000:]
    return read_metrics(out)


@pytest.mark.timeout(400)
def test_plain_ddp_loop_records_the_runners_metrics(mlp_runner_record, tmp_path):
    assert mlp_runner_record["ok"], mlp_runner_record["reason"]
    rows = _launch("ddp", load_scenario(mlp_runner_record["scenario_file"]).to_dict(), tmp_path)
    # Same weights, batches and arithmetic as the runner: equal to the last bit in practice.
    assert_rows_close(rows, mlp_runner_record["rows"], METRICS, rtol=1e-12)
    assert [r["weight_checksum"] for r in rows] == [r["weight_checksum"] for r in mlp_runner_record["rows"]]
    # one step path: the same fields on the same steps (the cadence, the lr, the state check, the flags,
    # the data ledger); only the runner knows the sample indices, hence data_coverage (issue 22)
    runner_only = {"data_coverage"}
    assert [sorted(r) for r in rows] == [sorted(set(r) - runner_only) for r in mlp_runner_record["rows"]]
    assert [r["data_digest"] for r in rows] == [r["data_digest"] for r in mlp_runner_record["rows"]]
    assert [(r["lr"], r["flags"]) for r in rows] == [(r["lr"], r["flags"]) for r in mlp_runner_record["rows"]]


@pytest.mark.timeout(500)
def test_trainer_callback_records_the_runners_metrics(hf_runner_record, tiny_hf, tmp_path):
    """Equal within float round-off when the Trainer is set up to do what the runner does: the same
    batches per rank (sequential sampler over the runner's order), SGD at a constant rate, no
    clipping, grad_accum 1 and ``average_tokens_across_devices=False`` (docs/monitor.md says why)."""
    assert hf_runner_record["ok"], hf_runner_record["reason"]
    rows = _launch("trainer", parse_scenario(hf_raw(tiny_hf)).to_dict(), tmp_path)
    assert len(rows) == HF_STEPS and all(r["weights_in_sync"] for r in rows)
    assert_rows_close(rows, hf_runner_record["rows"], METRICS, rtol=1e-5, atol=1e-7)


def test_attach_says_what_is_wrong_with_one_process_or_an_unwrapped_model():
    """``accelerate launch --cpu`` starts one process: no process group, a plain model. The error must
    say that, not only that the model is not a DDP model (issue 21)."""
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised - this is a single process"):
        testbed.attach(torch.nn.Linear(2, 2))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"only one process \(world size 1\), and the model is a plain Linear"):
            testbed.attach(torch.nn.Linear(2, 2))
    finally:
        dist.destroy_process_group()


def test_monitor_measures_every_kth_step_and_closes_its_file(tmp_path):
    """One process (world size 1): the mean gradient is the local one, so cos = 1 and std = 0."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = DDP(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with testbed.attach(model, out_dir=tmp_path, every=2, weight_check_every=3, batch_size=8) as monitor:
            rows = []
            for _ in range(4):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                rows.append(monitor.step(loss))
        assert monitor.path.sinks == []  # files closed
    finally:
        dist.destroy_process_group()
    assert rows[1] is None and rows[3] is None  # odd steps unmeasured, no weight check due
    assert rows[0]["cos_to_mean"] == [pytest.approx(1.0)] and rows[0]["loss_std"] == 0.0
    assert rows[0]["noise_scale"] is None  # one rank: no second batch size to compare
    assert rows[2]["weights_in_sync"] and "cos_mean" in rows[2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2]


def _gloo_thread_count() -> int:
    threads = teardown.gloo_threads()
    assert threads is not None, "needs Linux /proc to see the gloo threads"
    return len(threads)


@pytest.mark.parametrize("script_destroys", [False, True])
def test_exit_handler_joins_gloo_threads(script_destroys, tmp_path):
    """Issue 17: gloo's worker threads must be gone before the interpreter finalizes (a worker thread
    waiting for the GIL then aborts the process). ``attach`` registers ``teardown.at_exit``; here it
    is called directly, with the model still referenced (a script's global, a Trainer), after a
    script that ends with or without ``destroy_process_group()``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    before = _gloo_thread_count()  # an earlier test in this process may have left a group behind
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = DDP(torch.nn.Linear(4, 1))  # imports torch.distributed.nn.functional: its defaults hold the group
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = testbed.attach(model, out_dir=tmp_path)
    for _ in range(2):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(loss)
    assert _gloo_thread_count() > before
    if script_destroys:
        dist.destroy_process_group()
        assert _gloo_thread_count() > before  # destroy_process_group alone does not join them
    teardown.at_exit()
    assert not dist.is_initialized() and monitor.path.sinks == []
    assert _gloo_thread_count() <= before
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_a_freed_model_never_destroys_its_gloo_group_holding_the_gil(tmp_path):
    """Issue 17, the deadlock: a script that calls ``destroy_process_group()`` and then lets its DDP
    model go (its training function returns) must not leave the DDP reducer as the group's last
    owner - a reducer is freed with the GIL held, so ``~ProcessGroupGloo`` would join the worker
    threads while one of them waits for the GIL (seen: 3 hung ranks over 14 runs of this file). The group
    must survive the model and be destroyed by the exit handler, which releases the GIL."""
    import gc

    import torch.distributed.nn.functional  # noqa: F401 - imported first, its defaults do not hold the group
    from torch.nn.parallel import DistributedDataParallel as DDP

    before = _gloo_thread_count()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = DDP(torch.nn.Linear(4, 1))
    monitor = testbed.attach(model, out_dir=tmp_path)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    monitor.step(0.0)
    monitor.close()
    dist.destroy_process_group()
    del model, monitor
    gc.collect()
    assert _gloo_thread_count() > before  # the reducer was not the last owner
    teardown.at_exit()
    assert _gloo_thread_count() <= before


def test_closed_monitor_lets_go_of_the_model(tmp_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = DDP(torch.nn.Linear(4, 1))
        monitor = testbed.attach(model)
        monitor.close()
        monitor.close()  # idempotent
        assert monitor.model is None and monitor.state.acc is None  # disarmed: later backwards only all-reduce
        model(torch.randn(8, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="closed"):
            monitor.step(0.0)
    finally:
        dist.destroy_process_group()
