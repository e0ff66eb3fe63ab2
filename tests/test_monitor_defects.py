"""Issue 21's smaller defects, each pinned by a test that failed before its fix: the 2-rank alarms
(not attributable; which rank is higher), every rank's learning rate, report labels of same-named
runs, the accumulation warning's stack level, the Trainer callback's global_step in events.jsonl and
its console, the Lightning alarm's step, what is documented, and the cadence's one set of defaults."""
from __future__ import annotations

import inspect
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.report.html import load_inputs
from testbed.scenario.spec import MetricsSpec

REPO = Path(__file__).resolve().parents[1]


def _rows(n: int, offset: float, seed: int, steps: int = 80) -> list[dict[str, Any]]:
    """Rows of ``n`` simulated ranks; the last rank's loss ``offset`` (relative) above the others'."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        loss = 2.0 * np.exp(rng.normal(0, 0.02, n))
        loss[-1] *= 1 + offset
        out.append({"step": step, "loss": loss.tolist(), "grad_norm": np.exp(rng.normal(0, 0.05, n)).tolist(),
                    "cos_to_mean": (0.6 + rng.normal(0, 0.02, n)).tolist(), "flags": []})
    return out


def test_two_rank_weight_divergence_names_no_rank() -> None:
    """With 2 ranks the odd one cannot be told: the alarm named rank 1 when the bug was on rank 0."""
    from testbed.engine.alarms import BuiltinAlarms

    alarms = BuiltinAlarms(2, None)
    (found,) = alarms.check({"step": 0, "weight_checksum": [5, 7], "weights_in_sync": False})
    assert found.ranks == [0, 1] and "not attributable" in found.message and "rank(s) [1]" not in found.message
    three = BuiltinAlarms(3, None).check({"step": 4, "weight_checksum": [5, 7, 5], "weights_in_sync": False})
    assert three[0].ranks == [1] and "rank(s) [1] differ from the majority" in three[0].message


@pytest.mark.parametrize("n,expected", [(2, "rank 1's loss is higher than rank 0's (2 ranks"),
                                        (4, "rank 3's loss is higher than the others'")])
def test_the_statistical_alarm_says_which_way(n: int, expected: str) -> None:
    from testbed.engine.alarms import BuiltinAlarms

    alarms = BuiltinAlarms(n, 0.01)
    found = [a for row in _rows(n, 0.10, seed=3) for a in alarms.check(row)]
    # the first alarm may come before closed testing can name anybody; the naming one says which way
    assert {a.kind for a in found} == {"inconsistent"} and expected in found[-1].message, found[-1].message
    assert found[-1].ranks == ([0, 1] if n == 2 else [n - 1])


def test_every_ranks_learning_rate_is_recorded() -> None:
    from testbed.engine.alarms import BuiltinAlarms
    from testbed.metrics.row import lr_fields

    assert lr_fields([0.1, 0.1]) == {"lr": 0.1}
    assert lr_fields([0.09, 0.081]) == {"lr": None, "lr_by_rank": [0.09, 0.081]}
    assert lr_fields([0.1, math.nan]) == {"lr": None, "lr_by_rank": [0.1, None]}
    assert lr_fields([math.nan, math.nan]) == {}
    (found,) = BuiltinAlarms(2, None).check({"step": 3, "lr": None, "lr_by_rank": [0.09, 0.081]})
    assert found.kind == "lr_differs" and found.ranks == [0, 1] and "rank 1 0.081" in found.message


def test_report_labels_same_named_runs_by_their_paths(tmp_path: Path) -> None:
    for parent in ("A", "B"):
        run = tmp_path / parent / "testbed"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 0, "loss": [1.0, 1.1]}\n')
    _, runs = load_inputs([tmp_path / "A" / "testbed", tmp_path / "B" / "testbed"])
    assert [r.label for r in runs] == ["testbed (A/testbed)", "testbed (B/testbed)"]


def test_the_accumulation_warning_points_at_the_callers_line(one_rank: None) -> None:
    model = DDP(torch.nn.Linear(4, 1))
    with testbed.attach(model) as monitor:
        for _ in range(2):
            model(torch.randn(8, 4)).pow(2).mean().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor.step(0.5)
    (warning,) = [w for w in caught if "one loss for a step of 2" in str(w.message)]
    assert warning.filename == __file__, warning.filename


# ---- the framework callbacks ------------------------------------------------------------------

class _Recorder:
    """A report_to integration: what its ``on_log`` received."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


def test_trainer_callback_logs_to_integrations_not_the_console_and_alarms_carry_global_step(
        one_rank: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With ``logging_steps=1`` the Trainer's console printed ~16 testbed values per step, and
    events.jsonl had the monitor's 0-based step where the Trainer's logs use ``global_step``."""
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import PrinterCallback

    model = DDP(torch.nn.Linear(4, 1))
    recorder = _Recorder()
    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1)
    state, control = TrainerState(max_steps=3), TrainerControl()
    trainer = SimpleNamespace(model_wrapped=model, args=args, state=state, control=control)
    callback = testbed.TestbedCallback(trainer, out_dir=tmp_path / "mine")
    trainer.callback_handler = SimpleNamespace(callbacks=[PrinterCallback(), recorder, callback], model=model)

    def log(logs: dict[str, float]) -> None:  # what Trainer.log does: every callback's on_log, the console's too
        for cb in trainer.callback_handler.callbacks:
            cb.on_log(args, state, control, logs=dict(logs))

    trainer.log = log
    callback.on_train_begin(args, state, control)
    assert callback.monitor is not None and callback.monitor.alpha == 0.01
    for step in range(3):
        callback.on_step_begin(args, state, control)
        out = model(torch.randn(8, 4)).pow(2).mean()
        callback._losses.append(out.detach().double())
        out.backward()
        state.global_step += 1
        control.should_log = True  # logging_steps=1
        callback.on_step_end(args, state, control)
        if step == 1:
            callback.monitor.alarm("mine", "something")
    callback.on_train_end(args, state, control)
    assert "testbed/" not in capsys.readouterr().out  # the console printer got nothing
    assert [sorted(k for k in logs if k == "testbed/global_loss") for logs in recorder.logs if
            "testbed/global_loss" in logs] == [["testbed/global_loss"]] * 3
    assert {"testbed/alarm/mine": 1.0} in recorder.logs
    events = [e for e in _events(tmp_path / "mine") if e.get("kind") == "mine"]
    assert [(e["step"], e["global_step"]) for e in events] == [(1, 2)]


def _events(out: Path) -> list[dict[str, Any]]:
    from testbed.record.files import read_jsonl

    return read_jsonl(out / "events.jsonl")


def _capture_logger() -> Any:
    """A Lightning logger that keeps every ``log_metrics`` call: (metrics, step)."""
    from lightning.pytorch.loggers.logger import Logger

    class Capture(Logger):
        name, version = "capture", 0

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[dict[str, float], int | None]] = []

        @property
        def experiment(self) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.calls.append((dict(metrics), step))

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Capture()


@pytest.mark.timeout(300)
def test_lightning_alarm_lands_at_the_step_of_its_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning logs a batch's ``log_dict`` at ``global_step - 1``; the alarm went out at
    ``global_step``, one step late in TensorBoard. One process, Lightning's own DDP strategy."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)  # Lightning sets them; restored after the test

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            return ((self.lin(x).squeeze(-1) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = testbed.TestbedLightningCallback(out_dir=tmp_path / "mine", alpha=0.05)

    class RaiseAt3(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            if trainer.global_step == 3:
                callback.monitor.alarm("mine", "raised in the step of global_step 3")

    logger = _capture_logger()
    data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.randn(64))
    trainer = L.Trainer(strategy="ddp", devices=1, accelerator="cpu", max_steps=5, logger=logger, log_every_n_steps=1,
                        callbacks=[callback, RaiseAt3()], enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    try:
        trainer.fit(Lit(), DataLoader(data, batch_size=8))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert callback.monitor.alpha == 0.05
    row_step = {row["global_step"]: step for step, row in enumerate(callback.rows)}
    logged = {step: metrics for metrics, step in logger.calls if "testbed/global_loss" in metrics}
    alarm_steps = [step for metrics, step in logger.calls if "testbed/alarm/mine" in metrics]
    assert alarm_steps == [row_step[3]] and row_step[3] in logged  # the row of global_step 3, the same step


# ---- documented, and defined once --------------------------------------------------------------

def test_every_option_and_every_builtin_alarm_is_documented() -> None:
    from testbed.schema.event import BUILTIN_ALARMS

    doc = (REPO / "docs" / "monitor.md").read_text()
    options = [p for p in inspect.signature(testbed.attach).parameters if not p.startswith("_") and p != "model"]
    missing = [p for p in options if f"`{p}`" not in doc]
    assert not missing, missing
    assert not [kind for kind in BUILTIN_ALARMS if f"`{kind}`" not in doc]
    assert "run.json" in doc and "verdict" in doc


def test_the_cadence_defaults_are_one_definition() -> None:
    """The scenario's [metrics], attach and both callbacks take their defaults from scenario/cadence.py
    (the weight check was 10 steps in a scenario and off in the monitor)."""
    from testbed import TestbedCallback, TestbedLightningCallback
    from testbed.scenario import cadence as cadence_rule
    from testbed.scenario.cadence import Cadence

    defaults = Cadence()
    spec = MetricsSpec()
    assert (spec.every, spec.pairwise_every, spec.weight_check_every) == \
        (defaults.every, defaults.pairwise_every, defaults.weight_check_every)
    for fn in (testbed.attach, TestbedCallback.__init__, TestbedLightningCallback.__init__):
        params = inspect.signature(fn).parameters
        assert params["every"].default == cadence_rule.EVERY
        assert params["pairwise_every"].default == cadence_rule.PAIRWISE_EVERY
        assert params["weight_check_every"].default == cadence_rule.WEIGHT_CHECK_EVERY > 0
        assert params["alpha"].default == 0.01


@given(every=st.integers(1, 7), pairwise=st.integers(0, 7), k=st.integers(0, 7), last=st.integers(0, 40))
def test_the_cadence_rule(every: int, pairwise: int, k: int, last: int) -> None:
    from testbed.scenario.cadence import Cadence

    cadence = Cadence(every, pairwise, k)
    plans = [cadence.plan(step, last) for step in range(last + 1)]
    assert plans[last].measure and plans[0].measure  # the first and the last step are measured
    assert [p.measure for p in plans[:last]] == [s % every == 0 for s in range(last)]
    assert [p.pairwise for p in plans] == [pairwise > 0 and s % pairwise == 0 for s in range(last + 1)]
    checked = [s for s, p in enumerate(plans) if p.check_state]
    if k == 0:
        assert checked == []
    else:  # the first step, after every k optimizer steps, and the last
        assert checked == sorted({0, last, *range(k - 1, last + 1, k)})
    assert cadence.plan(last + 1, None).measure == ((last + 1) % every == 0)  # unknown end: no last step


def test_bad_cadence_values_are_refused_by_name() -> None:
    from testbed.scenario.cadence import Cadence

    with pytest.raises(ValueError, match=re.escape("weight_check_every must be an integer >= 0 (0 = off), got -1")):
        Cadence(weight_check_every=-1)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        Cadence(every=0)
