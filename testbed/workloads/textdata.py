"""Synthetic alpaca-style instruction data, generated from the seed and tokenised byte by byte.

The reference study fine-tunes on tatsu-lab/alpaca (instruction / input / output records, loss on
the response tokens only). Nothing can be downloaded here, so the project writes its own records
from small template vocabularies: arithmetic, reversing words, copying, sentiment labels,
upper-casing, counting words. Each task is learnable and checkable, so a tiny causal LM makes
real progress in tens of steps and a perturbation has something to disturb.

Layout contract (used by the ``shard_skew`` perturbation): record ``i`` belongs to task group
``i % len(tasks)``. Tokenizer: bytes 0..255, then PAD = 256, EOS = 257 (vocabulary 258).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping

import torch

from testbed.scenario.bounds import Bounds
from testbed.workloads.data import TensorDataset
from testbed.perturb.perturbations import derive_seed
from testbed.scenario.tables import DATASETS

PAD, EOS = 256, 257
VOCAB_SIZE = 258
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

_WORDS = ("red", "blue", "cat", "dog", "sun", "tree", "bird", "fish", "moon", "rain", "book", "milk",
          "door", "lamp", "star", "road")
_SUBJECTS = ("the food", "the film", "this book", "the hotel", "the game", "our trip")
_POSITIVE = ("great", "lovely", "wonderful", "fun", "excellent")
_NEGATIVE = ("awful", "boring", "terrible", "dull", "bad")


@dataclass(frozen=True)
class Record:
    """One alpaca-style example."""

    task: str
    instruction: str
    input: str
    output: str

    def prompt(self) -> str:
        return PROMPT.format(instruction=self.instruction, input=self.input)


def _words(rng: random.Random, lo: int = 2, hi: int = 4) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Record("add", "Add the two numbers.", f"{a} and {b}", str(a + b))


def _reverse(rng: random.Random) -> Record:
    w = _words(rng)
    return Record("reverse", "Reverse the order of the words.", " ".join(w), " ".join(reversed(w)))


def _copy(rng: random.Random) -> Record:
    text = " ".join(_words(rng))
    return Record("copy", "Repeat the input exactly.", text, text)


def _sentiment(rng: random.Random) -> Record:
    positive = rng.random() < 0.5
    adjective = rng.choice(_POSITIVE if positive else _NEGATIVE)
    return Record("sentiment", "Is the sentiment positive or negative?",
                  f"{rng.choice(_SUBJECTS)} was {adjective}", "positive" if positive else "negative")


def _upper(rng: random.Random) -> Record:
    text = " ".join(_words(rng, 1, 3))
    return Record("upper", "Write the input in capital letters.", text, text.upper())


def _count(rng: random.Random) -> Record:
    w = _words(rng, 1, 6)
    return Record("count", "How many words are there?", " ".join(w), str(len(w)))


TASKS: dict[str, Callable[[random.Random], Record]] = {
    "add": _add, "reverse": _reverse, "copy": _copy, "sentiment": _sentiment, "upper": _upper, "count": _count,
}


def generate_records(seed: int, size: int, tasks: list[str]) -> list[Record]:
    """``size`` records, record ``i`` of task ``tasks[i % len(tasks)]``; a pure function of its arguments."""
    rng = random.Random(derive_seed("alpaca-synthetic", seed))
    return [TASKS[tasks[i % len(tasks)]](rng) for i in range(size)]


def encode(record: Record, seq_len: int) -> tuple[list[int], list[int], list[bool]]:
    """Byte-tokenise ``prompt + output + EOS`` into (inputs, next-token targets, loss mask).

    The mask is True exactly where the target is a response token (the output bytes and EOS), as
    in alpaca fine-tuning where the prompt is not trained on. Pads to ``seq_len`` with PAD.
    """
    prompt = list(record.prompt().encode("utf-8"))
    tokens = prompt + list(record.output.encode("utf-8")) + [EOS]
    if len(tokens) - 1 > seq_len:
        raise ValueError(f"record of {len(tokens) - 1} tokens does not fit seq_len {seq_len}")
    inputs, targets = tokens[:-1], tokens[1:]
    mask = [i + 1 >= len(prompt) for i in range(len(targets))]
    pad = seq_len - len(inputs)
    return inputs + [PAD] * pad, targets + [PAD] * pad, mask + [False] * pad


def decode(ids: list[int]) -> str:
    """Bytes back to text, stopping at EOS and skipping PAD (for looking at data and samples)."""
    out = bytearray()
    for i in ids:
        if i == EOS:
            break
        if i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def _known_tasks(params: Mapping[str, Any]) -> tuple[str, str] | None:
    tasks = params.get("tasks", list(TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        return "tasks", f"a non-empty list of distinct tasks from {', '.join(TASKS)}"
    return None


@DATASETS.register("alpaca_synthetic", check=_known_tasks)
def alpaca_synthetic(seed: int, *, size: Annotated[int, Bounds(ge=1)] = 2048,
                     seq_len: Annotated[int, Bounds(ge=2)] = 128, tasks: list[str] = list(TASKS)) -> TensorDataset:
    """Alpaca-style records from the seed: ``input_ids``, ``targets``, ``loss_mask`` of shape [size, seq_len].

    ``info`` gives the model builder ``vocab_size`` and ``seq_len``, and ``groups`` (the task
    count: record ``i`` is task ``i % groups``) for perturbations that skew shards by task.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"alpaca_synthetic tasks must be a non-empty list of {', '.join(TASKS)}; got {tasks}")
    if size < 1:
        raise ValueError("alpaca_synthetic needs size >= 1")
    records = generate_records(seed, size, list(tasks))
    longest = max(len(r.prompt().encode()) + len(r.output.encode()) for r in records)
    if longest > seq_len:
        raise ValueError(f"alpaca_synthetic: the longest record needs seq_len >= {longest}, got {seq_len}")
    encoded = [encode(r, seq_len) for r in records]
    tensors = {
        "input_ids": torch.tensor([e[0] for e in encoded], dtype=torch.long),
        "targets": torch.tensor([e[1] for e in encoded], dtype=torch.long),
        "loss_mask": torch.tensor([e[2] for e in encoded], dtype=torch.bool),
    }
    return TensorDataset(tensors, {"vocab_size": VOCAB_SIZE, "seq_len": seq_len, "groups": len(tasks),
                                   "tasks": list(tasks)})


alpaca_synthetic.batch_keys = ("input_ids", "targets", "loss_mask")  # type: ignore[attr-defined]  # scenario/compat.py
# three [size, seq_len] tensors (int64, int64, bool) built whole in every rank (engine/memory.py)
alpaca_synthetic.memory_bytes = (  # type: ignore[attr-defined]
    lambda p: int(p.get("size", 2048)) * int(p.get("seq_len", 128)) * 17)
