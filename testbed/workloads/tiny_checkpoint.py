"""Tiny random-weight checkpoints, a tokenizer and alpaca records, made here (nothing downloaded).

Used by the tests, and by anyone who wants to smoke-test the ``hf`` + ``alpaca`` path on a new
machine (NPU, GPU) in seconds before pointing it at real weights::

    python -m testbed.tiny_checkpoint /tmp/tiny            # Llama-style model + tokenizer + alpaca.json
    python -m testbed.tiny_checkpoint /tmp/tiny --pangu    # the same weights laid out as openPangu

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the alpaca templates
and the generated records, saved as a ``PreTrainedTokenizerFast`` (BOS prepended, EOS ``</s>``).
The ``--pangu`` layout copies openPangu-Embedded's checkpoint shape: ``model_type =
"PanguEmbedded"``, an ``auto_map`` to ``configuration_openpangu_dense`` /
``modeling_openpangu_dense``, a ``bias`` flag, and a modeling file that fails to import the way the
real one does without ``torch_npu`` - so loading it exercises the Llama fallback in ``testbed.workloads.hf``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Sequence

from testbed.workloads.alpaca import prompt_for

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "tree", "bird", "fish", "moon", "rain", "book")

_PANGU_CONFIG_CODE = '''"""Stand-in for openPangu's configuration_openpangu_dense.py (written by testbed.tiny_checkpoint)."""
from transformers import PretrainedConfig


class PanguEmbeddedConfig(PretrainedConfig):
    model_type = "PanguEmbedded"

    def __init__(self, bias=True, rope_theta=10000.0, **kwargs):
        self.bias = bias
        self.rope_theta = rope_theta
        super().__init__(**kwargs)
'''

_PANGU_MODELING_CODE = '''"""Stand-in for openPangu's modeling_openpangu_dense.py (written by testbed.tiny_checkpoint): the
real file's first imports, which fail without torch_npu and, on transformers >= 5, at LossKwargs."""
import torch_npu  # noqa: F401
from transformers.utils import LossKwargs  # noqa: F401
'''


def alpaca_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` small, learnable alpaca records (about a third without ``input``)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            records.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
        elif kind == 1:
            words = rng.sample(_WORDS, rng.randint(2, 5))
            records.append({"instruction": "Reverse the order of the words.", "input": " ".join(words),
                            "output": " ".join(reversed(words))})
        else:
            word = rng.choice(_WORDS)
            records.append({"instruction": f"Name a word that rhymes with {word}.", "input": "",
                            "output": f"A word like {word}s rhymes with {word}."})
    return records


def write_alpaca(path: Path, records: list[dict[str, str]], jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_llama_config(vocab_size: int, tokenizer: Any, attention_bias: bool = False) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, attention_bias=attention_bias,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def make_tiny_checkpoint(out: Path, *, pangu: bool = False, seed: int = 0, records: int = 96) -> Path:
    """Write model + tokenizer to ``out`` and ``alpaca.json`` next to them; returns ``out``."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = alpaca_records(records, seed)
    write_alpaca(out / "alpaca.json", data)
    corpus = [prompt_for(r) + " " + r["output"] for r in data]
    tokenizer = train_tokenizer(corpus)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), tokenizer, attention_bias=pangu)
    model = LlamaForCausalLM(config)
    if pangu:
        _write_pangu_layout(out, model, config)
    else:
        model.save_pretrained(str(out))
    return out


def _write_pangu_layout(out: Path, model: Any, config: Any) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    pangu_config = {
        "architectures": ["PanguEmbeddedForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
                     "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM"},
        "model_type": "PanguEmbedded",
        "bias": True,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
    }
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "pad_token_id", "bos_token_id",
                "eos_token_id"):
        pangu_config[key] = getattr(config, key)
    (out / "config.json").write_text(json.dumps(pangu_config, indent=2), encoding="utf-8")
    (out / "configuration_openpangu_dense.py").write_text(_PANGU_CONFIG_CODE, encoding="utf-8")
    (out / "modeling_openpangu_dense.py").write_text(_PANGU_MODELING_CODE, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.tiny_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pangu", action="store_true", help="openPangu layout (remote code that fails to import)")
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_checkpoint(args.out, pangu=args.pangu, seed=args.seed, records=args.records)
    print(f"wrote {'openPangu-style ' if args.pangu else ''}tiny checkpoint, tokenizer and alpaca.json to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
