"""The drop-in monitor's API in one process (world size 1, no launch): micro-batch losses and the
accumulation warning, alarms, TensorBoard, logger scalars, the noise-scale flag, and the Trainer
callback's loss reader on tiny random transformers models (no hub)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.integrations.hf_loss import LossReader
from testbed.integrations.scalars import flat_values
from testbed.record.files import read_jsonl, read_metrics


def _model() -> tuple[DDP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _micro_steps(model: DDP, optimizer: torch.optim.Optimizer, accum: int) -> list[torch.Tensor]:
    losses = []
    for micro in range(accum):
        model.require_backward_grad_sync = micro == accum - 1
        loss = model(torch.randn(8, 4)).pow(2).mean()
        (loss / accum).backward()
        losses.append(loss.detach())
    optimizer.step()
    optimizer.zero_grad()
    return losses


def test_micro_batch_losses_are_averaged_and_one_loss_after_accumulation_warns(one_rank: None, tmp_path: Path) -> None:
    model, optimizer = _model()
    with testbed.attach(model, out_dir=tmp_path, batch_size=16) as monitor:
        losses = _micro_steps(model, optimizer, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a list: no warning
            row = monitor.step(losses)
        assert row["loss"] == [pytest.approx(float(torch.stack(losses).double().mean()), rel=1e-12)]
        last = _micro_steps(model, optimizer, 2)[-1]
        with pytest.warns(UserWarning, match="one loss for a step of 2 training forwards"):
            row = monitor.step(last / 2)  # the scaled last micro-batch loss: recorded as given, warned
        assert row["loss"] == [pytest.approx(float(last) / 2)]
        _micro_steps(model, optimizer, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per monitor
            monitor.step(last)
        with pytest.raises(ValueError, match="empty list"):
            monitor.step([])


def test_alarms_reach_the_file_the_logger_tensorboard_and_listeners(one_rank: None, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, optimizer = _model()
    heard: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING, logger="testbed"):
        with testbed.attach(model, out_dir=tmp_path, tensorboard=tmp_path / "tb") as monitor:
            monitor.on_alarm.append(heard.append)
            monitor.on_row.append(rows.append)
            for loss in (1.0, float("nan"), float("nan")):  # NaN twice: the built-in alarm fires once
                model(torch.randn(8, 4)).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                monitor.step(loss)
            event = monitor.alarm("drift", "rank 0 drifts", ranks=[0], p_value=0.001)
    assert [(e["kind"], e["step"]) for e in heard] == [("nonfinite", 1), ("drift", 2)]
    assert event["p_value"] == 0.001 and event["ranks"] == [0] and len(rows) == 3
    events = read_jsonl(tmp_path / "events.jsonl")  # the runner's per-rank non-finite events, and the alarms
    assert [(e["event"], e.get("kind"), e["step"]) for e in events] == [
        ("nonfinite_loss", None, 1), ("alarm", "nonfinite", 1), ("nonfinite_loss", None, 2), ("alarm", "drift", 2)]
    assert "testbed alarm at step 2: drift: rank 0 drifts" in caplog.text
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"testbed/alarm/drift", "testbed/alarm/nonfinite", "testbed/global_loss", "testbed/flags"} <= tags
    assert [e.step for e in acc.Scalars("testbed/global_loss")] == [0]  # None (NaN) values are left out
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_logger_scalars_leave_out_none_and_group_ranks() -> None:
    row = {"step": 4, "global_loss": 1.5, "cos_min": None, "loss_cv": float("nan"), "weights_in_sync": False,
           "loss": [1.0, 2.0], "cos_to_mean": [0.5, None], "flags": [{"rank": 1, "kind": "zero_grad"}]}
    assert flat_values(row) == {"testbed/global_loss": 1.5, "testbed/weights_in_sync": 0.0, "testbed/flags": 1.0,
                                "testbed/loss/rank0": 1.0, "testbed/loss/rank1": 2.0, "testbed/cos_to_mean/rank0": 0.5}


def test_undefined_noise_scale_is_flagged(one_rank: None) -> None:
    model, optimizer = _model()
    with testbed.attach(model, batch_size=8) as monitor:
        model(torch.randn(8, 4)).pow(2).mean().backward()
        row = monitor.step(0.0)
    assert row["noise_scale"] is None and {"rank": None, "kind": "noise_scale_undefined"} in row["flags"]


# ---- the Trainer callback's loss reader --------------------------------------------------------

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
LM_LABELS = torch.tensor([[5, 6, 7, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])  # 7 labels, 6 after the shift


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32, num_labels=3))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=32, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_loss_reader_returns_the_models_own_loss(kind: str) -> None:
    """The model's own loss on the micro-batch whatever ``num_items_in_batch`` the Trainer passed
    (here 40: other micro-batches and ranks hold the rest of the labels)."""
    model = _tiny(kind).train()
    frozen = list(model.modules())[-1]
    frozen.eval()  # a submodule the user keeps in eval mode stays there after the reader's probes
    labels = torch.tensor([0, 2]) if kind == "bert" else LM_LABELS
    reader = LossReader()
    for _ in range(2):  # the second micro-batch uses what the first one found out
        kwargs = {"input_ids": IDS, "labels": labels, "num_items_in_batch": torch.tensor(40)}
        out = model(**kwargs)
        own = (F.cross_entropy(out.logits, labels) if kind == "bert" else
               F.cross_entropy(out.logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1), ignore_index=-100))
        got = reader(model, kwargs, out.loss.detach().double())
        assert float(got) == pytest.approx(float(own.detach()), rel=1e-5)
    assert reader.uses_num_items is (kind != "bert")
    assert reader.layout == (None if kind == "bert" else "shifted")
    assert model.training and not frozen.training


def test_loss_reader_without_num_items_takes_the_loss_as_is() -> None:
    reader = LossReader()
    assert float(reader(torch.nn.Identity(), {"labels": LM_LABELS}, torch.tensor(2.5))) == 2.5
    assert reader.uses_num_items is None


def test_the_online_consistency_test_alarms_on_an_offset_rank_and_not_on_exchangeable_ones(one_rank: None) -> None:
    """The verdict's sequential test runs inside the monitor: rows where rank 3's loss sits 10 %
    above the others raise ``inconsistent`` alarms naming rank 3 and no other; exchangeable rows raise none."""
    import numpy as np

    from testbed.engine.alarms import BuiltinAlarms

    def rows(offset: float, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for step in range(80):
            loss = 2.0 * np.exp(rng.normal(0, 0.02, 4))
            loss[3] *= 1 + offset
            norm = np.exp(rng.normal(0, 0.05, 4))
            out.append({"step": step, "loss": loss.tolist(), "grad_norm": norm.tolist(),
                        "cos_to_mean": (0.6 + rng.normal(0, 0.02, 4)).tolist(), "flags": []})
        return out

    for offset, seed in ((0.0, 1), (0.0, 2), (0.10, 3)):
        model, _ = _model()  # a DDP model takes one comm hook: a fresh one per monitor
        with testbed.attach(model) as monitor:
            monitor.path.alarms = BuiltinAlarms(4, 0.01)  # the rows below come from 4 simulated ranks
            heard: list[dict[str, Any]] = []
            monitor.on_alarm.append(heard.append)
            for row in rows(offset, seed):
                for found in monitor.path.alarms.check(row):
                    monitor.alarm(found.kind, found.message, step=found.step, ranks=found.ranks, **found.details)
        if offset == 0:
            assert heard == []
        else:
            # the alarm, then (closed testing needs more evidence) the alarm that names rank 3
            assert {e["kind"] for e in heard} == {"inconsistent"} and heard[-1]["ranks"] == [3]
            assert all(set(e["ranks"]) <= {3} and e["metric"] == "loss" for e in heard)
            assert heard[0]["step"] < 40 and heard[0]["e_value"] >= 100
            assert "rank 3's loss is higher than the others'" in heard[-1]["message"]
