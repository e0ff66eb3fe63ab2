"""``[model] kind = "hf"`` and ``[data] kind = "alpaca"`` on a tiny random checkpoint made here:
prompt templates and the response-only loss mask, the masked mean loss, precision options, the
openPangu → Llama fallback, the memory estimate, and a real 2-rank gloo run producing the record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from testbed.workloads.alpaca import (IGNORE_INDEX, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, AlpacaFormatError, alpaca,  # noqa: E402
                            load_tokenizer, prompt_for, read_records)
from testbed.workloads.hf import count_parameters, hf, load_causal_lm  # noqa: E402
from testbed.scenario.spec import parse_scenario  # noqa: E402
from testbed.workloads.tiny_checkpoint import write_alpaca  # noqa: E402
from tests.helpers import run_json  # noqa: E402
from tests.scale_fixtures import HF_STEPS, hf_raw, hf_runner_record, modules_in_tmp, tiny_hf  # noqa: E402,F401

pytestmark = pytest.mark.timeout(300)

WITH_INPUT = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "A colour like red."}


def _dataset(tiny_hf, records, tmp_path, max_len=64):
    path = write_alpaca(tmp_path / "data.json", records)
    return alpaca(0, path=str(path), tokenizer=str(tiny_hf["llama"]), max_len=max_len)


def test_prompt_templates_are_stanford_alpacas():
    assert prompt_for(WITH_INPUT) == PROMPT_WITH_INPUT.format(**WITH_INPUT)
    assert prompt_for(NO_INPUT) == PROMPT_NO_INPUT.format(**NO_INPUT)
    assert prompt_for({"instruction": "x", "output": "y"}).endswith("### Instruction:\nx\n\n### Response:")
    assert "### Input:\n2 and 3\n\n### Response:" in prompt_for(WITH_INPUT)


def test_loss_mask_covers_exactly_the_response_and_eos(tiny_hf, tmp_path):
    tok = load_tokenizer(tiny_hf["llama"])
    ds = _dataset(tiny_hf, [WITH_INPUT, NO_INPUT], tmp_path)
    for i, record in enumerate([WITH_INPUT, NO_INPUT]):
        item = ds[i]
        prompt = tok(prompt_for(record))["input_ids"]
        response = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(response)
        assert item["input_ids"][:n].tolist() == prompt + response
        assert prompt[0] == tok.bos_token_id
        assert item["labels"][:len(prompt)].eq(IGNORE_INDEX).all()
        assert item["labels"][len(prompt):n].tolist() == response
        assert item["labels"][n:].eq(IGNORE_INDEX).all() and item["input_ids"][n:].eq(tok.pad_token_id).all()
        assert item["attention_mask"].tolist() == [1] * n + [0] * (64 - n)
    batch = ds.batch(torch.tensor([1, 0]))
    assert batch["input_ids"].shape == (2, 64) and torch.equal(batch["labels"][1], ds[0]["labels"])


def test_truncation_keeps_partial_responses_and_drops_empty_ones(tiny_hf, tmp_path):
    tok = load_tokenizer(tiny_hf["llama"])
    prompt_len = len(tok(prompt_for(WITH_INPUT))["input_ids"])
    long = dict(WITH_INPUT, output="red blue green cat dog sun tree bird")
    ds = _dataset(tiny_hf, [long, WITH_INPUT], tmp_path, max_len=prompt_len + 2)
    assert ds.size == 2 and ds.info["dropped"] == 0
    assert ds[0]["labels"].ne(IGNORE_INDEX).sum() == 2  # cut after two response tokens
    dropped = _dataset(tiny_hf, [long, NO_INPUT], tmp_path, max_len=prompt_len)
    assert dropped.info["dropped"] == 1 and dropped.size == 1  # the long record kept no response token


def test_json_and_jsonl_read_the_same_and_bad_records_are_named(tmp_path):
    records = [WITH_INPUT, NO_INPUT]
    assert read_records(write_alpaca(tmp_path / "a.json", records)) == records
    assert read_records(write_alpaca(tmp_path / "a.jsonl", records, jsonl=True)) == records
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(WITH_INPUT) + "\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(AlpacaFormatError, match=r"bad.jsonl: record 1: field 'output'"):
        read_records(bad)
    with pytest.raises(FileNotFoundError, match="alpaca data file"):
        read_records(tmp_path / "missing.json")


def test_template_choice_is_stanfords_rule_also_for_input_none():
    """Stanford's train.py: ``example.get("input", "") != ""`` - None is not "", so the with-input
    template, formatted with "None" (truthiness would pick the no-input template)."""
    none = {"instruction": "x", "input": None, "output": "y"}
    assert prompt_for(none) == PROMPT_WITH_INPUT.format_map(none) and "### Input:\nNone\n" in prompt_for(none)
    assert prompt_for({"instruction": "x", "input": "", "output": "y"}) == PROMPT_NO_INPUT.format(instruction="x")
    assert prompt_for({"instruction": "x", "output": "y"}) == PROMPT_NO_INPUT.format(instruction="x")


# The Hub's tatsu-lab/alpaca: one parquet file, columns instruction, input, output, text.
HUB_ROWS = [dict(r, text=prompt_for(r) + r["output"]) for r in (WITH_INPUT, NO_INPUT, {**NO_INPUT, "input": None})]


@pytest.fixture
def datasets_in_tmp(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # its Arrow cache lands in tmp
    return datasets


def test_datasets_loader_reads_the_hub_parquet_layout(tmp_path, datasets_in_tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: [r[k] for r in HUB_ROWS] for k in ("instruction", "input", "output", "text")})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    records = read_records(tmp_path / "data" / "train-00000-of-00001.parquet", "datasets")
    assert records == HUB_ROWS and records[2]["input"] is None
    assert read_records(tmp_path / "data", "datasets") == HUB_ROWS  # the directory (a Hub snapshot's data/)
    with pytest.raises(AlpacaFormatError, match=r"train-00000-of-00001.parquet: a .parquet file needs \[data\] loader"):
        read_records(tmp_path / "data" / "train-00000-of-00001.parquet")


def test_datasets_loader_reads_json_arrow_and_save_to_disk(tmp_path, datasets_in_tmp):
    path = write_alpaca(tmp_path / "a.jsonl", [WITH_INPUT, NO_INPUT], jsonl=True)
    assert read_records(path, "datasets") == read_records(path, "json") == [WITH_INPUT, NO_INPUT]
    ds = datasets_in_tmp.Dataset.from_list(HUB_ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "saved", "datasets") == HUB_ROWS
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrow) == 1 and read_records(arrow[0], "datasets") == HUB_ROWS


def test_forward_returns_the_masked_token_mean(tiny_hf, tmp_path):
    ds = _dataset(tiny_hf, [WITH_INPUT, NO_INPUT, WITH_INPUT], tmp_path)
    model = hf(ds, path=str(tiny_hf["llama"]))
    batch = ds.batch(torch.arange(3))
    logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep])
    torch.testing.assert_close(model(**batch), expected, rtol=1e-5, atol=1e-6)


def test_precision_and_gradient_checkpointing(tiny_hf, tmp_path):
    ds = _dataset(tiny_hf, [WITH_INPUT, NO_INPUT], tmp_path)
    batch = ds.batch(torch.arange(2))
    plain = hf(ds, path=str(tiny_hf["llama"]))
    ref = plain(**batch)
    ref.backward()
    assert {p.dtype for p in hf(ds, path=str(tiny_hf["llama"]), dtype="bf16").parameters()} == {torch.bfloat16}
    mixed = hf(ds, path=str(tiny_hf["llama"]), dtype="bf16-mixed")
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    assert abs(mixed(**batch).item() - ref.item()) < 0.05 * ref.item()
    checkpointed = hf(ds, path=str(tiny_hf["llama"]), gradient_checkpointing=True)
    lm = checkpointed.lm
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    checkpointed(**batch).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_pangu_checkpoint_falls_back_to_llama_with_attention_bias(tiny_hf, modules_in_tmp, trust_remote_code):
    from safetensors.torch import load_file

    model = load_causal_lm(tiny_hf["pangu"], trust_remote_code=trust_remote_code)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.attention_bias
    assert all(getattr(model.model.layers[0].self_attn, f"{p}_proj").bias is not None for p in "qkvo")
    weights = load_file(str(tiny_hf["pangu"] / "model.safetensors"))  # bf16, as released
    state = model.state_dict()
    rope = {k for k in weights if k.endswith(".self_attn.rotary_emb.inv_freq")}  # released files carry them
    assert rope and set(weights) - rope == set(state) - {"lm_head.weight"}  # tied: no head in the files
    for name in set(weights) - rope:
        assert torch.equal(state[name], weights[name].float()), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert count_parameters(tiny_hf["pangu"]) == sum(p.numel() for p in model.parameters())


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_hf, tmp_path):
    ds = _dataset(tiny_hf, [WITH_INPUT], tmp_path)
    ds.info["vocab_size"] = 10**6
    with pytest.raises(ValueError, match="point \\[data\\] tokenizer at this model's own tokenizer"):
        hf(ds, path=str(tiny_hf["llama"]))


def test_hf_needs_token_batches(tiny_hf):
    from testbed.workloads.data import synthetic_classification

    with pytest.raises(ValueError, match="needs batches with input_ids, attention_mask and labels"):
        hf(synthetic_classification(0, size=8), path=str(tiny_hf["llama"]))


def test_memory_estimate_counts_the_checkpoint(tiny_hf):
    from testbed.engine.memory import estimate

    raw = hf_raw(tiny_hf, optim={"kind": "adamw", "lr": 1e-3})
    raw["model"]["dtype"] = "bf16-mixed"
    est = estimate(parse_scenario(raw))
    p = count_parameters(tiny_hf["llama"])
    assert est.params == p and "config.json" in est.params_source
    assert (est.weights, est.gradients, est.ddp_buckets, est.optimizer) == (4 * p, 4 * p, 4 * p, 8 * p)
    assert est.activations > 0 and est.total > 20 * p


def test_two_rank_gloo_run_of_hf_and_alpaca_writes_the_record(hf_runner_record):
    assert hf_runner_record["ok"], hf_runner_record["reason"]
    rows = hf_runner_record["rows"]
    assert [r["step"] for r in rows] == list(range(HF_STEPS))
    for row in rows:
        assert len(row["loss"]) == 2 and all(3.0 < x < 9.0 for x in row["loss"])  # ~ln(512) at random init
        assert len(row["grad_norm"]) == 2 and all(g > 0 for g in row["grad_norm"])
        assert all(-1.0 <= c <= 1.0 for c in row["cos_to_mean"]) and row["weights_in_sync"]
        assert row["flags"] == []
    record = run_json(Path(hf_runner_record["out"]))
    assert record["status"] == "ok" and record["scenario"]["model"]["kind"] == "hf"
    assert record["scenario"]["data"]["kind"] == "alpaca"
