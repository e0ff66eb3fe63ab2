"""The released openPangu-Embedded-1B-V1.1 checkpoint layout, mirrored in a tiny checkpoint.

``python -m testbed.tiny_checkpoint DIR --pangu`` writes a checkpoint that differs from the
released one only in size, so the loader meets what the real files hold:

- ``config.json``: the released keys and flags (``model_type = "PanguEmbedded"``, ``auto_map`` for
  AutoConfig / AutoModel / AutoModelForCausalLM, ``bias = true``, ``tie_word_embeddings = true``,
  ``rope_theta = 4e6``, ``rms_norm_eps = 1e-5``, no ``head_dim``, pad 0 / bos 1 / eos = the id of
  ``[unused10]``, GQA 2:1 like 12 q / 6 kv heads, bf16); only the size keys are smaller;
- ``model.safetensors`` in bf16 with Llama's parameter names, per-layer
  ``self_attn.rotary_emb.inv_freq`` buffers as the released files carry, and no ``lm_head.weight``
  (tied to the embedding);
- the ``auto_map`` Python files of :mod:`testbed.workloads.pangu_remote_code`;
- a slow SentencePiece tokenizer: ``tokenizer.model`` trained here with ``sentencepiece`` on the
  given texts (no normalisation, byte fallback, the released ``[unusedN]`` and chat markers as user
  symbols),
  ``tokenizer_config.json`` mapping ``AutoTokenizer`` to ``tokenization_openpangu.PanguTokenizer``
  (so loading it needs ``trust_remote_code``), ``special_tokens_map.json``; no ``tokenizer.json``.

The 1B values are those of REFERENCE-SETUP.md (checked against the released config); the key set
and the tokenizer files follow the released 7B V1.1 export (GitHub wujing215/OpenPangu7B-on-NVIDIA).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from testbed.workloads import pangu_remote_code

# openPangu-Embedded-1B-V1.1 config.json: the 1B values of REFERENCE-SETUP.md, in the key set and
# order of the released V1.1 export read (7B); initializer_range, use_cache, torch_dtype and
# transformers_version are that export's values.
RELEASED_1B_CONFIG: dict[str, Any] = {
    "architectures": ["PanguEmbeddedForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
                 "AutoModel": "modeling_openpangu_dense.PanguEmbeddedModel",
                 "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM"},
    "bias": True,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "pad_token_id": 0,
    "eos_token_id": 45892,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 32768,
    "model_type": "PanguEmbedded",
    "num_attention_heads": 12,
    "num_hidden_layers": 26,
    "num_key_value_heads": 6,
    "rms_norm_eps": 1e-05,
    "rope_theta": 4000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.53.2",
    "use_cache": True,
    "vocab_size": 153376,
}
#: the only keys the tiny checkpoint changes (vocab_size and eos_token_id come from its tokenizer)
TINY_SIZES: dict[str, int] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

# Special tokens of the released tokenizer (ids 0/1/2 are SentencePiece's unk/bos/eos there too).
UNK, BOS, EOS_SP = "<unk>", "<s>", "</s>"
EOS = "[unused10]"
USER_SYMBOLS = ["<|User|>:", "<|Bot|>:", *(f"[unused{i}]" for i in range(34))]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '[unused9]系统：[unused10]' }}{% endif %}{% if message['role'] == 'system' %}"
    "{{ '[unused9]系统：' + message['content'] + '[unused10]' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{'[unused9]助手：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'user' %}{{'[unused9]用户：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)


def write_released_config(out: Path) -> Path:
    """Only the released 1B ``config.json`` (full size, no weights): enough for ``--dry-run`` to count
    the parameters exactly and estimate activations on a machine without the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(RELEASED_1B_CONFIG, indent=2), encoding="utf-8")
    return out


def tiny_pangu_config(vocab_size: int, eos_token_id: int) -> dict[str, Any]:
    """The released 1B config with only the size keys (and the tokenizer's ids) replaced."""
    return {**RELEASED_1B_CONFIG, **TINY_SIZES, "vocab_size": vocab_size, "eos_token_id": eos_token_id}


def train_sentencepiece(texts: Sequence[str], vocab_size: int = 512) -> bytes:
    """A SentencePiece BPE model (serialized) trained on ``texts``; deterministic (one thread).
    Text is not normalised (newlines and spaces survive, unknown characters fall back to bytes)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # keep newlines (as <0x0A>)
        user_defined_symbols=USER_SYMBOLS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS_SP, num_threads=1, minloglevel=2)
    return out.getvalue()


def write_tokenizer(out: Path, model_proto: bytes) -> dict[str, int]:
    """The released tokenizer files around ``model_proto``; returns the special-token ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    (out / "tokenizer.model").write_bytes(model_proto)
    (out / "tokenization_openpangu.py").write_text(pangu_remote_code.TOKENIZATION, encoding="utf-8")
    special = [UNK, BOS, EOS_SP, *USER_SYMBOLS]
    decoder = {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in special}
    config = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "added_tokens_decoder": decoder,
        "auto_map": {"AutoTokenizer": ["tokenization_openpangu.PanguTokenizer", None]},
        "bos_token": BOS, "clean_up_tokenization_spaces": False, "eos_token": EOS, "legacy": True,
        "model_max_length": 1000000000000000019884624838656, "pad_token": UNK, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "PanguTokenizer", "unk_token": UNK,
        "use_default_system_prompt": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"bos_token": {"content": BOS, **token}, "eos_token": {"content": EOS, **token},
                   "pad_token": {"content": UNK, **token}, "unk_token": {"content": UNK, **token}}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return {"vocab_size": sp.get_piece_size(), "pad": sp.piece_to_id(UNK), "bos": sp.bos_id(),
            "eos": sp.piece_to_id(EOS)}


def released_state_dict(llama_state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Llama's state dict as the released files store it: bf16, per-layer ``rotary_emb.inv_freq``,
    no ``lm_head.weight`` when the embeddings are tied."""
    import torch

    from testbed.workloads.hf import rope_inv_freq

    out = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llama_state.items()
           if not (k == "lm_head.weight" and config["tie_word_embeddings"])}
    inv_freq = rope_inv_freq(config).to(torch.bfloat16)
    for layer in range(config["num_hidden_layers"]):
        out[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def write_pangu_checkpoint(out: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """Tokenizer (trained on ``texts``), config, remote code and random weights in the released layout."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from testbed.workloads.hf import pangu_as_llama_config

    ids = write_tokenizer(out, train_sentencepiece(texts))
    config = tiny_pangu_config(ids["vocab_size"], ids["eos"])
    assert (config["pad_token_id"], config["bos_token_id"]) == (ids["pad"], ids["bos"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(pangu_as_llama_config(config))
    with torch.no_grad():  # non-trivial biases and norm weights, so a test sees whether they are applied
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_file(released_state_dict(model.state_dict(), config), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "configuration_openpangu_dense.py").write_text(pangu_remote_code.CONFIGURATION, encoding="utf-8")
    (out / "modeling_openpangu_dense.py").write_text(pangu_remote_code.MODELING, encoding="utf-8")
    return out
