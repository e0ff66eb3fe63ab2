"""The ``--pangu`` tiny checkpoint mirrors the released openPangu-Embedded-1B-V1.1 files (config
keys and flags, tied embeddings, per-layer ``rotary_emb.inv_freq``, ``auto_map`` code that fails as
the released code does, a slow SentencePiece ``PanguTokenizer`` behind ``trust_remote_code``), and
the testbed trains it: the Llama fallback's logits equal a forward written from the released
equations, a 2-rank gloo run writes the normal record, and without ``trust_remote_code`` the run is
refused in one line before any rank starts. Also: the parameter count and plan of the real 1B."""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from testbed import cli  # noqa: E402
from testbed.engine.runner import launch  # noqa: E402
from testbed.record.files import read_metrics  # noqa: E402
from testbed.scenario.errors import ScenarioError  # noqa: E402
from testbed.scenario.spec import load_scenario, parse_scenario  # noqa: E402
from testbed.workloads.alpaca import load_tokenizer, preflight, prompt_for  # noqa: E402
from testbed.workloads.hf import count_parameters, load_causal_lm, rope_inv_freq  # noqa: E402
from testbed.workloads.pangu_layout import RELEASED_1B_CONFIG, TINY_SIZES, write_released_config  # noqa: E402
from tests.helpers import tiny  # noqa: E402
from tests.scale_fixtures import modules_in_tmp, tiny_hf  # noqa: E402,F401

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
OPENPANGU = REPO / "scenarios" / "openpangu"


def test_config_mirrors_the_released_one_but_size(tiny_hf):
    config = json.loads((tiny_hf["pangu"] / "config.json").read_text())
    assert list(config) == list(RELEASED_1B_CONFIG)  # the released keys, in the released order
    changed = {k for k in config if config[k] != RELEASED_1B_CONFIG[k]}
    assert changed == set(TINY_SIZES) | {"vocab_size", "eos_token_id"}
    assert "head_dim" not in config and config["tie_word_embeddings"] is True and config["bias"] is True
    assert (config["rope_theta"], config["rms_norm_eps"], config["pad_token_id"], config["bos_token_id"]) == (4e6, 1e-5, 0, 1)
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 12 // 6  # GQA as released
    special = json.loads((tiny_hf["pangu"] / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert special[str(config["eos_token_id"])]["content"] == "[unused10]"  # eos as released


def test_weights_are_stored_as_released(tiny_hf):
    from safetensors.torch import load_file

    config = json.loads((tiny_hf["pangu"] / "config.json").read_text())
    weights = load_file(str(tiny_hf["pangu"] / "model.safetensors"))
    assert "lm_head.weight" not in weights and {t.dtype for t in weights.values()} == {torch.bfloat16}
    rope = [k for k in weights if "rotary_emb" in k]
    assert rope == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config["num_hidden_layers"])]
    assert torch.equal(weights[rope[0]], rope_inv_freq(config).to(torch.bfloat16))
    assert all(f"model.layers.0.self_attn.{p}_proj.bias" in weights for p in "qkvo")
    assert "model.layers.0.mlp.up_proj.bias" not in weights


def test_tokenizer_is_a_slow_sentencepiece_pangu_tokenizer(tiny_hf, modules_in_tmp):
    assert not (tiny_hf["pangu"] / "tokenizer.json").exists() and (tiny_hf["pangu"] / "tokenizer.model").is_file()
    tok = load_tokenizer(tiny_hf["pangu"], trust_remote_code=True)
    assert type(tok).__name__ == "PanguTokenizer" and not tok.is_fast
    assert (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 0)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "[unused10]"
    record = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
    ids = tok(prompt_for(record))["input_ids"]
    assert ids[0] == 1 and tok.unk_token_id not in ids  # BOS prepended; byte fallback, nothing unknown
    assert tok.decode(ids, skip_special_tokens=True) == prompt_for(record)  # newlines survive


def test_without_trust_remote_code_the_tokenizer_is_refused_in_one_line(tiny_hf):
    with pytest.raises(ValueError) as info:
        load_tokenizer(tiny_hf["pangu"])  # what a rank would do (e.g. under a bare torchrun)
    assert "needs trust_remote_code" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ScenarioError, match=r"x.toml: field 'data.trust_remote_code': expected true .*needs "
                                            r"trust_remote_code.*PanguTokenizer"):
        preflight("x.toml", {"tokenizer": str(tiny_hf["pangu"]), "trust_remote_code": False})
    preflight("x.toml", {"tokenizer": str(tiny_hf["llama"])})  # a tokenizer without custom code passes


def _fake_torch_npu(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable ``torch_npu`` with ``contrib.transfer_to_npu``, as on an NPU machine."""
    (root / "torch_npu" / "contrib").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text("")
    (root / "torch_npu" / "contrib" / "__init__.py").write_text("")
    (root / "torch_npu" / "contrib" / "transfer_to_npu.py").write_text("PATCHED = True\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(get_device_name=lambda *a: "stand-in", is_available=lambda: False),
                        raising=False)


@pytest.mark.parametrize("environment, failure", [
    ("cpu", "requires the following packages that were not found in your environment: torch_npu"),
    ("npu", "cannot import name 'LossKwargs' from 'transformers.utils'"),
    ("npu+LossKwargs", "KeyError: 'default'"),
])
def test_remote_code_fails_as_released_and_the_llama_fallback_loads(tiny_hf, tmp_path, monkeypatch, caplog,
                                                                    modules_in_tmp, environment, failure):
    """Without torch_npu the import check fails; with it, transfer_to_npu is imported (it patches the
    process on an NPU) before LossKwargs fails (transformers >= 4.54); past that, transformers 5 has no
    RoPE "default". Where the code does import (transformers <= 4.53 with torch_npu), it is the
    checkpoint's own model, and its logits equal the fallback's."""
    import transformers.utils
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if environment.startswith("npu"):
        _fake_torch_npu(tmp_path / "fake", monkeypatch)
    if environment.endswith("LossKwargs"):
        monkeypatch.setattr(transformers.utils, "LossKwargs", type("LossKwargs", (dict,), {}), raising=False)
    imports = environment != "cpu" and hasattr(transformers.utils, "LossKwargs") and "default" in ROPE_INIT_FUNCTIONS
    with caplog.at_level(logging.WARNING, logger="testbed.workloads.hf"):
        model = load_causal_lm(tiny_hf["pangu"], trust_remote_code=True)
    if environment.startswith("npu"):
        assert "torch_npu.contrib.transfer_to_npu" in sys.modules  # imported before any failure
    if imports:  # the checkpoint's own code, run where it imports
        assert type(model).__name__ == "PanguEmbeddedForCausalLM" and "remote code not usable" not in caplog.text
        fallback = load_causal_lm(tiny_hf["pangu"], trust_remote_code=False)
        ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, fallback.eval()(input_ids=ids).logits)
        return
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.attention_bias
    assert failure in caplog.text and "loading" in caplog.text


def _reference_logits(weights: dict[str, torch.Tensor], config: dict, ids: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """openPangu-Embedded's forward from the released equations, fp32: pre-norm RMSNorm blocks,
    q/k/v/o with bias, rotate-half RoPE from rope_theta, GQA, causal softmax, SwiGLU, tied head."""
    w = {k: v.float() for k, v in weights.items()}
    hidden, n_q, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, eps = hidden // n_q, config["rms_norm_eps"]
    b, t = ids.shape

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(t).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    allowed = torch.ones(t, t).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        def proj(name, y, heads):
            out = y @ w[p + f"self_attn.{name}_proj.weight"].T + w[p + f"self_attn.{name}_proj.bias"]
            return out.view(b, t, heads, d).transpose(1, 2)

        y = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = proj("q", y, n_q), proj("k", y, n_kv), proj("v", y, n_kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(n_q // n_kv, dim=1), v.repeat_interleave(n_q // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, hidden)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T + w[p + "self_attn.o_proj.bias"]
        y = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T  # tied: the embedding is the head


def test_fallback_logits_equal_the_released_equations(tiny_hf, modules_in_tmp):
    from safetensors.torch import load_file

    config = json.loads((tiny_hf["pangu"] / "config.json").read_text())
    weights = load_file(str(tiny_hf["pangu"] / "model.safetensors"))
    model = load_causal_lm(tiny_hf["pangu"], trust_remote_code=True).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied after loading
    torch.manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as the alpaca batches have
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = _reference_logits(weights, config, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], expected[keep], rtol=1e-5, atol=1e-6)  # measured: 9e-8
    assert count_parameters(tiny_hf["pangu"]) == sum(p.numel() for p in model.parameters())


def test_the_strict_key_check_still_refuses_a_foreign_tensor(tiny_hf, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(tiny_hf["pangu"], tmp_path / "ckpt")
    weights = load_file(str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
    with caplog.at_level(logging.WARNING, logger="testbed.workloads.hf"):
        load_causal_lm(ckpt)  # the stored inv_freq tells that rope_theta was changed
    assert "does not match rope_theta = 10000.0" in caplog.text
    save_file({**weights, "model.layers.0.self_attn.k_norm.weight": torch.ones(8)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit this checkpoint .*unexpected \['model.layers.0.self_attn.k_norm"):
        load_causal_lm(ckpt)


def _pangu_run(tiny_hf, trust: bool) -> dict:
    pangu = str(tiny_hf["pangu"])
    return tiny(name="pangu-alpaca", steps=2, timeout_s=240.0,
                model={"kind": "hf", "path": pangu, "trust_remote_code": True},
                data={"kind": "alpaca", "batch_size": 4, "path": str(tiny_hf["pangu"] / "alpaca.json"),
                      "tokenizer": pangu, "max_len": 48, "limit": 32, "trust_remote_code": trust},
                optim={"kind": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.03})


@pytest.mark.timeout(400)
def test_two_rank_run_on_the_pangu_checkpoint_writes_the_record(tiny_hf, tmp_path):
    result = launch(parse_scenario(_pangu_run(tiny_hf, trust=True)), tmp_path / "run")
    assert result.ok, result.reason
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1] and [r["lr"] for r in rows] == [0.0, 1e-3]  # ceil(2 × 3 %) warmup
    for row in rows:
        assert len(row["loss"]) == 2 and all(4.0 < x < 8.0 for x in row["loss"])  # ~ln(512) at random init
        assert row["weights_in_sync"] and row["flags"] == [] and all(g > 0 for g in row["grad_norm"])


def test_without_trust_remote_code_the_run_is_refused_before_any_rank(tiny_hf, tmp_path, capsys):
    scenario = tmp_path / "pangu.toml"
    raw = _pangu_run(tiny_hf, trust=False)
    scenario.write_text("\n".join(_toml(raw)))
    code = cli.main(["run", str(scenario), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.count("\n") == 0 and f"{scenario}: field 'data.trust_remote_code'" in err and "needs trust_remote_code" in err
    result = launch(parse_scenario(raw, source=str(scenario)), tmp_path / "launched")  # gate / sweep path
    assert not result.ok and result.reason.startswith("refused before the ranks started: ")


def _toml(raw: dict, prefix: str = "") -> list[str]:
    lines = [f"{k} = {json.dumps(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += [f"[{k}]", *_toml(v)]
    return lines


def test_released_1b_parameter_count():
    """1,155,912,192 = 0.920 B outside the embedding + 0.236 B embedding (tied: counted once)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert count_parameters(write_released_config(Path(d))) == 1_155_912_192
    embedding = RELEASED_1B_CONFIG["vocab_size"] * RELEASED_1B_CONFIG["hidden_size"]
    assert (embedding, 1_155_912_192 - embedding) == (235_585_536, 920_326_656)


@pytest.mark.parametrize("path", sorted(OPENPANGU.glob("*.toml")), ids=lambda p: p.stem)
def test_openpangu_scenarios_use_the_stanford_recipe(path):
    s = load_scenario(path)
    assert (s.optim.kind, s.optim.params["lr"], s.optim.params["weight_decay"]) == ("adamw", 2e-5, 0.0)
    assert (s.schedule.name, s.schedule.warmup_ratio, s.steps) == ("cosine", 0.03, 1218)
    assert s.batch_size * s.grad_accum * s.world_size == 128
    assert s.data.params["trust_remote_code"] is s.model.params["trust_remote_code"] is True
    assert round(s.model.params["params_b_hint"] * 1e9) == 1_155_912_192


def test_dry_run_plan_prints_the_real_count_and_memory(tmp_path, capsys):
    config_dir = write_released_config(tmp_path / "op1b")
    assert cli.main(["run", str(OPENPANGU / "control.toml"), "--dry-run"]) == 0
    assert "parameters      1,155,912,192 (params_b_hint;" in capsys.readouterr().out
    assert cli.main(["run", str(OPENPANGU / "control.toml"), "--dry-run", "--set", f"model.path={config_dir}"]) == 0
    text = capsys.readouterr().out
    assert f"parameters      1,155,912,192 (counted from {config_dir}/config.json)" in text
    assert "activations       12.86 GiB  (micro-batch 4 × 1024 tokens" in text and "total             34.39 GiB" in text
