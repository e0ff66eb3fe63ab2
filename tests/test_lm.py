"""The causal-LM model kind and the alpaca-style synthetic data it trains on (no processes)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from testbed.workloads.lm import transformer
from testbed.scenario.tables import DATASETS, MODELS
from testbed.scenario.spec import ScenarioError, parse_scenario
from testbed.workloads.textdata import EOS, PAD, TASKS, VOCAB_SIZE, alpaca_synthetic, decode, encode, generate_records
from tests.helpers import tiny


@pytest.fixture(scope="module")
def data():
    return alpaca_synthetic(0, size=96, seq_len=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Intra-op threads on a shared 2-core machine slow these small kernels down ~20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(data, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformer(data, d_model=32, layers=2, heads=4, dropout=dropout)


def test_registered_and_info_feeds_the_model_builder(data) -> None:
    assert "transformer" in MODELS and "alpaca_synthetic" in DATASETS
    assert data.info["vocab_size"] == VOCAB_SIZE and data.info["seq_len"] == 128
    assert data.info["groups"] == len(TASKS)
    with pytest.raises(ValueError, match="token dataset"):
        MODELS.get("transformer")(DATASETS.get("synthetic")(0, size=16))


def test_records_are_deterministic_correct_and_laid_out_by_task() -> None:
    a, b = generate_records(3, 60, list(TASKS)), generate_records(3, 60, list(TASKS))
    assert a == b and a != generate_records(4, 60, list(TASKS))
    for i, r in enumerate(a):
        assert r.task == list(TASKS)[i % len(TASKS)]
        if r.task == "add":
            x, y = map(int, r.input.split(" and "))
            assert r.output == str(x + y)
        elif r.task == "reverse":
            assert r.output.split() == r.input.split()[::-1]
        elif r.task == "count":
            assert r.output == str(len(r.input.split()))
        elif r.task == "upper":
            assert r.output == r.input.upper()


def test_encoding_masks_exactly_the_response_and_eos() -> None:
    record = generate_records(0, 1, ["add"])[0]
    inputs, targets, mask = encode(record, 128)
    assert len(inputs) == len(targets) == len(mask) == 128
    response = [t for t, m in zip(targets, mask) if m]
    assert response == list(record.output.encode()) + [EOS]
    assert decode(inputs) == record.prompt() + record.output  # inputs: everything but the final EOS
    assert inputs[-1] == PAD and targets[-1] == PAD and not mask[-1]
    assert targets[:-1][: len(record.prompt()) - 1] == inputs[1 : len(record.prompt())]  # shifted by one
    with pytest.raises(ValueError, match="seq_len"):
        alpaca_synthetic(0, size=8, seq_len=40)


def test_loss_is_the_mean_over_masked_targets_only(data) -> None:
    model = small_model(data).eval()
    batch = data.batch(torch.arange(8))
    loss = model(**batch)
    logits = model.logits(batch["input_ids"])
    per_token = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    assert torch.allclose(loss, per_token[mask].mean(), atol=1e-6)
    scrambled = dict(batch, targets=torch.where(batch["loss_mask"], batch["targets"], 0))
    assert torch.equal(model(**scrambled), loss)  # prompt / padding targets do not count


def test_attention_is_causal(data) -> None:
    model = small_model(data).eval()
    ids = data.batch(torch.arange(2))["input_ids"]
    changed = ids.clone()
    changed[:, 60:] = 65
    assert torch.equal(model.logits(ids)[:, :60], model.logits(changed)[:, :60])
    assert not torch.equal(model.logits(ids)[:, 60:], model.logits(changed)[:, 60:])


def test_dropout_follows_the_torch_seed(data) -> None:
    model = small_model(data, dropout=0.2).train()
    batch = data.batch(torch.arange(4))

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model(**batch)

    assert torch.equal(loss(1), loss(1)) and not torch.equal(loss(1), loss(2))
    model.eval()
    assert torch.equal(loss(1), loss(2))


def test_learns_the_synthetic_tasks(data) -> None:
    model = small_model(data).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        loss = model(**data.batch(torch.arange(8) + 8 * (step % 12)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < 0.7 * losses[0]


def test_scenario_validation_of_the_new_kinds() -> None:
    raw = tiny(model={"kind": "transformer", "d_model": 16, "layers": 1, "heads": 2},
               data={"kind": "alpaca_synthetic", "batch_size": 4, "size": 64})
    assert parse_scenario(raw).model.params["d_model"] == 16
    with pytest.raises(ScenarioError, match="data.tasks"):
        parse_scenario(tiny(data={"kind": "alpaca_synthetic", "batch_size": 4, "tasks": "add"}))
