"""``[optim] schedule``: refused before launch when wrong (the field named), built with transformers'
own schedulers, and recorded per step (``lr`` in every row) exactly as transformers computes it -
by the runner (``testbed run scenarios/control.toml --set optim.schedule=cosine ...``) and by the
drop-in monitor given the optimizer."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup  # noqa: E402

import testbed  # noqa: E402
from testbed import cli  # noqa: E402
from testbed.record.files import read_metrics  # noqa: E402
from testbed.scenario.errors import ScenarioError  # noqa: E402
from testbed.scenario.schedule import ScheduleSpec  # noqa: E402
from testbed.scenario.spec import Scenario, load_scenario, parse_scenario  # noqa: E402
from testbed.workloads.optim import build_scheduler  # noqa: E402
from tests.helpers import tiny  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONTROL = REPO / "scenarios" / "control.toml"


def _transformers_lrs(make, lr: float, steps: int, **kwargs) -> list[float]:
    """The lr of each step as a transformers scheduler gives it (read before its ``step()``)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer, num_training_steps=steps, **kwargs)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("optim, field, expected", [
    ({"schedule": "cosine_restarts"}, "optim.schedule", "one of 'constant', 'linear', 'cosine'"),
    ({"schedule": "cosine", "warmup_steps": -1}, "optim.warmup_steps", "an integer in 0..4"),
    ({"schedule": "cosine", "warmup_steps": 5}, "optim.warmup_steps", "an integer in 0..4"),
    ({"schedule": "cosine", "warmup_steps": 1.5}, "optim.warmup_steps", "an integer in 0..4"),
    ({"schedule": "linear", "warmup_ratio": 1.0}, "optim.warmup_ratio", "a number in [0, 1)"),
    ({"schedule": "linear", "warmup_ratio": "3%"}, "optim.warmup_ratio", "a number in [0, 1)"),
    ({"schedule": "linear", "warmup_steps": 1, "warmup_ratio": 0.1}, "optim.warmup_ratio", "not both"),
])
def test_bad_schedule_values_are_refused_with_the_field_named(optim, field, expected):
    raw = tiny(optim={"kind": "sgd", "lr": 0.1, **optim})
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw, source="x.toml")
    message = str(info.value)
    assert message.startswith(f"x.toml: field '{field}': expected ") and expected in message and "\n" not in message


def test_schedule_fields_come_from_the_optim_table_and_round_trip():
    s = load_scenario(CONTROL, {"optim.schedule": "cosine", "optim.warmup_steps": 2})
    assert s.schedule == ScheduleSpec("cosine", 2, 0.0) and "schedule" not in s.optim.params
    assert Scenario.from_dict(s.to_dict()) == s
    assert load_scenario(CONTROL).schedule.is_constant  # the default: a constant lr, as before
    ratio = parse_scenario(tiny(steps=100, optim={"kind": "adamw", "lr": 2e-5, "schedule": "cosine",
                                                  "warmup_ratio": 0.03}))
    assert ratio.schedule.warmup(100) == 3 and ratio.schedule.warmup(1218) == math.ceil(1218 * 0.03) == 37


@pytest.mark.parametrize("name, make", [("cosine", get_cosine_schedule_with_warmup),
                                        ("linear", get_linear_schedule_with_warmup)])
def test_build_scheduler_is_transformers_schedule(name, make):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = build_scheduler(optimizer, ScheduleSpec(name, warmup_ratio=0.2), 12)
    ours = []
    for _ in range(12):
        ours.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert ours == _transformers_lrs(make, 0.3, 12, num_warmup_steps=3)  # ceil(12 × 0.2)
    assert build_scheduler(optimizer, ScheduleSpec(), 12) is None  # constant without warmup: no scheduler


@pytest.mark.timeout(200)
def test_cli_run_records_transformers_cosine_lr_per_step(tmp_path, capsys):
    """The issue's check: ``testbed run scenarios/control.toml --set optim.schedule=cosine --set
    optim.warmup_steps=2`` (6 steps here) records transformers' cosine lr at every step."""
    steps = 6
    code = cli.main(["run", str(CONTROL), "--steps", str(steps), "--out", str(tmp_path / "cos"),
                     "--set", "optim.schedule=cosine", "--set", "optim.warmup_steps=2"])
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(tmp_path / "cos")
    expected = _transformers_lrs(get_cosine_schedule_with_warmup, 0.1, steps, num_warmup_steps=2)
    assert [r["step"] for r in rows] == list(range(steps))
    assert [r["lr"] for r in rows] == expected  # exact: transformers' own lambda, JSON round-trip exact
    assert expected[0] == 0.0 and expected[2] == 0.1 and expected[-1] < expected[3]
    assert all(r["weights_in_sync"] for r in rows)


def test_monitor_records_the_optimizers_lr(tmp_path):
    """One process (world size 1): the lr each ``optimizer.step()`` used, whatever the order of
    ``scheduler.step()`` and ``monitor.step()``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = DDP(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=4)
        with testbed.attach(model, optimizer=optimizer) as monitor:
            rows = []
            for _ in range(4):
                model(torch.randn(8, 4)).pow(2).mean().backward()
                optimizer.step()
                scheduler.step()  # before monitor.step: the row still has the lr the step used
                optimizer.zero_grad()
                rows.append(monitor.step(torch.tensor(1.0)))
    finally:
        dist.destroy_process_group()
    assert [r["lr"] for r in rows] == _transformers_lrs(get_cosine_schedule_with_warmup, 0.1, 4, num_warmup_steps=1)
