"""Tiny random-weight checkpoints, a tokenizer and alpaca records, made here (nothing downloaded).

Used by the tests, and by anyone who wants to smoke-test the ``hf`` + ``alpaca`` path on a new
machine (NPU, GPU) in seconds before pointing it at real weights::

    python -m testbed.tiny_checkpoint /tmp/tiny            # Llama-style model + tokenizer + alpaca.json
    python -m testbed.tiny_checkpoint /tmp/tiny --pangu    # the released openPangu layout, tiny
    python -m testbed.tiny_checkpoint /tmp/op1b --pangu --config-only   # the released 1B config.json only

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the alpaca templates
and the generated records, saved as a ``PreTrainedTokenizerFast`` (BOS prepended, EOS ``</s>``).
The ``--pangu`` checkpoint mirrors the released openPangu-Embedded-1B-V1.1 files in everything but
size (:mod:`testbed.workloads.pangu_layout`): its config keys and flags (tied embeddings, ``bias``,
``rope_theta``, no ``head_dim``), per-layer ``rotary_emb.inv_freq`` tensors, ``auto_map`` code that
fails under transformers 5 the way the released code does (so loading exercises the Llama fallback
in ``testbed.workloads.hf``), and a slow SentencePiece ``PanguTokenizer`` loaded through ``auto_map``
(needs ``trust_remote_code``), its ``tokenizer.model`` trained here on the generated records.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Sequence

from testbed.workloads.alpaca import prompt_for
from testbed.workloads.pangu_layout import write_pangu_checkpoint, write_released_config

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "tree", "bird", "fish", "moon", "rain", "book")

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
    """Write model + tokenizer to ``out`` and ``alpaca.json`` next to them; returns ``out``.
    ``pangu``: the released openPangu-Embedded layout instead (:mod:`testbed.workloads.pangu_layout`)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = alpaca_records(records, seed)
    write_alpaca(out / "alpaca.json", data)
    corpus = [prompt_for(r) + " " + r["output"] for r in data]
    if pangu:
        return write_pangu_checkpoint(out, corpus, seed)
    tokenizer = train_tokenizer(corpus)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer)).save_pretrained(str(out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.tiny_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pangu", action="store_true",
                        help="the released openPangu-Embedded layout (tied, remote code, SentencePiece PanguTokenizer)")
    parser.add_argument("--config-only", action="store_true",
                        help="with --pangu: only the released 1B config.json, full size, no weights (for --dry-run plans)")
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.config_only:
        if not args.pangu:
            parser.error("--config-only needs --pangu")
        print(f"wrote the released openPangu-Embedded-1B-V1.1 config.json to {write_released_config(args.out)}")
        return 0
    out = make_tiny_checkpoint(args.out, pangu=args.pangu, seed=args.seed, records=args.records)
    print(f"wrote {'openPangu-style ' if args.pangu else ''}tiny checkpoint, tokenizer and alpaca.json to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
