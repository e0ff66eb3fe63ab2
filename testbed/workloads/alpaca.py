"""``[data] kind = "alpaca"``: instruction records from a local JSON / JSONL file, tokenised with
the model's own tokenizer, loss on the response tokens only.

The reference study fine-tunes on tatsu-lab/alpaca, so this follows the Stanford Alpaca recipe:
the two prompt templates below (with / without an ``input``), the target ``output + EOS``, and
labels ``-100`` on every prompt and padding token. Prompt and response are tokenised separately
and concatenated, so the mask boundary is exact. Every example is truncated and right-padded to
``max_len`` (static shapes: no re-compilation per batch on NPU / GPU graph backends); a record
whose response does not survive truncation at all is dropped (its loss would be 0/0) and counted
in ``info["dropped"]``.

The template is chosen as Stanford's ``train.py`` does, ``record.get("input", "") != ""``: a record
whose ``input`` is None (possible in a parquet column) gets the with-input template, with "None".

Nothing is downloaded: ``path`` is a local file and ``tokenizer`` a local directory (usually the
model's own). ``loader = "json"`` (default) reads a JSON array or JSON lines with the standard
library; ``loader = "datasets"`` reads local files through Hugging Face ``datasets`` - parquet (the
Hub's ``tatsu-lab/alpaca`` is one parquet file with columns instruction, input, output, text), JSON /
JSON lines, arrow, or a directory of them or one written by ``Dataset.save_to_disk``.
``trust_remote_code`` lets a tokenizer that ships its own class (openPangu's ``PanguTokenizer``
through ``auto_map``) load; without it such a tokenizer is refused before any rank starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from testbed.scenario.errors import ScenarioError
from testbed.scenario.tables import DATASETS

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


class AlpacaFormatError(ValueError):
    """A record of the data file is not an alpaca record; names the file and the record."""


def prompt_for(record: dict[str, Any]) -> str:
    """The Stanford Alpaca prompt for one record, chosen by Stanford's rule ``input != ""`` (so
    ``input = None`` takes the with-input template, formatted as "None", as Stanford's code does)."""
    if record.get("input", "") != "":
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def read_records(path: str | Path, loader: Literal["json", "datasets"] = "json") -> list[dict[str, Any]]:
    """Alpaca records, validated: a JSON array or JSON lines (``json``), or local parquet / JSON /
    arrow files or a ``save_to_disk`` directory read through Hugging Face ``datasets``."""
    path = Path(path)
    if not (path.is_file() or (loader == "datasets" and path.is_dir())):
        raise FileNotFoundError(f"alpaca data file {path} does not exist (see scenarios/openpangu/README.md "
                                "for how to put alpaca_data.json on the machine)")
    if loader == "datasets":
        records = _read_with_datasets(path)
    elif path.suffix in _DATASETS_ONLY:
        raise AlpacaFormatError(f"{path}: a {path.suffix} file needs [data] loader = 'datasets' (the 'json' "
                                "loader reads JSON arrays and JSON lines)")
    else:
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
            records = loaded if isinstance(loaded, list) else [loaded]
        except json.JSONDecodeError:
            records = [_json_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for i, record in enumerate(records):
        _check_record(path, i, record)
    if not records:
        raise AlpacaFormatError(f"{path}: no records")
    return records


def _json_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise AlpacaFormatError(f"{path}:{lineno}: neither a JSON array nor JSON lines ({e})") from None


# file suffix → the ``datasets`` packaged builder that reads it (local files only, no Hub)
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_DATASETS_ONLY = (".parquet", ".arrow")


def _read_with_datasets(path: Path) -> list[dict[str, Any]]:
    """Records from local parquet / JSON / arrow files (or a ``save_to_disk`` directory) via ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ImportError("[data] loader = 'datasets' needs the Hugging Face datasets package "
                          "(pip install -e '.[hf]'), or use loader = 'json'") from None
    if path.is_dir() and (path / "dataset_info.json").is_file():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            table = table["train"]
    else:
        files = sorted(f for f in path.iterdir() if f.suffix in _BUILDERS) if path.is_dir() else [path]
        builders = {_BUILDERS.get(f.suffix) for f in files}
        if not files or None in builders or len(builders) > 1:
            raise AlpacaFormatError(f"{path}: expected parquet, JSON / JSON lines or arrow files of one kind "
                                    f"({', '.join(_BUILDERS)}) or a save_to_disk directory")
        table = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    return [dict(row) for row in table]


def _check_record(path: Path, index: int, record: Any) -> None:
    if not isinstance(record, dict):
        raise AlpacaFormatError(f"{path}: record {index}: expected an object with instruction/input/output, "
                                f"got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise AlpacaFormatError(f"{path}: record {index}: field '{key}' must be a string, got {record.get(key)!r}")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise AlpacaFormatError(f"{path}: record {index}: field 'input' must be a string, got {record['input']!r}")


def custom_tokenizer_class(path: str | Path) -> str | None:
    """The ``auto_map`` class a tokenizer directory asks ``AutoTokenizer`` to import (e.g.
    ``tokenization_openpangu.PanguTokenizer``) when transformers has no class of that name, else None."""
    file = Path(path) / "tokenizer_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = (config.get("auto_map") or {}).get("AutoTokenizer") if isinstance(config, dict) else None
    names = [n for n in (entry if isinstance(entry, list) else [entry]) if isinstance(n, str)]
    if not names:
        return None
    import transformers

    builtin = config.get("tokenizer_class")
    return None if isinstance(builtin, str) and hasattr(transformers, builtin) else names[0]


def needs_remote_code_message(path: str | Path, custom: str) -> str:
    """One line for the launcher and for a rank alike (transformers' own message is three lines)."""
    return (f"the tokenizer in {path} needs trust_remote_code: its tokenizer_config.json maps AutoTokenizer to "
            f"its own code ({custom}); set [data] trust_remote_code = true if you trust that code")


def preflight(source: str, params: dict[str, Any]) -> None:
    """Refuse, before any rank starts, a records file or tokenizer directory that is not on this
    machine, and a custom-code tokenizer without ``trust_remote_code``."""
    data, tokenizer = params.get("path"), params.get("tokenizer")
    if isinstance(data, str) and not Path(data).exists():
        raise ScenarioError(source, "data.path", "an alpaca records file (JSON / JSONL) or dataset directory on "
                            "this machine", data)
    if isinstance(tokenizer, str) and not Path(tokenizer).is_dir():
        raise ScenarioError(source, "data.tokenizer", "a tokenizer directory on this machine", tokenizer)
    if params.get("trust_remote_code") or not isinstance(tokenizer, str):
        return
    custom = custom_tokenizer_class(tokenizer)
    if custom is not None:
        raise ScenarioError(source, "data.trust_remote_code",
                            f"true ({needs_remote_code_message(tokenizer, custom)})", False)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved next to the model (local files only; never a hub download)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    custom = None if trust_remote_code else custom_tokenizer_class(path)
    if custom is not None:
        raise ValueError(needs_remote_code_message(path, custom))
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; alpaca targets end with EOS")
    return tok


def encode(records: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[tuple[list[int], int] | None]:
    """Per record ``(ids, prompt_length)`` truncated to ``max_len``, or None if no response token
    survives. Tokenises in one batched call per side (fast tokenizers parallelise it)."""
    prompts = tokenizer([prompt_for(r) for r in records], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    out: list[tuple[list[int], int] | None] = []
    for prompt_ids, response_ids in zip(prompts, responses):
        ids = (list(prompt_ids) + list(response_ids) + [tokenizer.eos_token_id])[:max_len]
        out.append((ids, len(prompt_ids)) if len(ids) > len(prompt_ids) else None)
    return out


@dataclass
class AlpacaDataset:
    """Tokenised records in one flat int32 buffer (compact on every rank); padded per example.

    Implements the testbed ``Dataset`` protocol (``size``, ``info``, ``batch``) and the torch map
    dataset protocol (``len``, ``[i]``), so the same object feeds the built-in runner and a
    Hugging Face ``Trainer``.
    """

    tokens: torch.Tensor  # int32, all examples back to back
    offsets: torch.Tensor  # int64, example i is tokens[offsets[i]:offsets[i + 1]]
    prompt_lengths: torch.Tensor  # int64
    max_len: int
    pad_token_id: int
    info: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.prompt_lengths)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].long()
        n = len(ids)
        input_ids = torch.full((self.max_len,), self.pad_token_id, dtype=torch.long)
        input_ids[:n] = ids
        attention_mask = torch.zeros(self.max_len, dtype=torch.long)
        attention_mask[:n] = 1
        labels = torch.full((self.max_len,), IGNORE_INDEX, dtype=torch.long)
        start = int(self.prompt_lengths[i])
        labels[start:n] = ids[start:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def build_alpaca(records: list[dict[str, Any]], tokenizer: Any, max_len: int) -> AlpacaDataset:
    kept = [e for e in encode(records, tokenizer, max_len) if e is not None]
    if not kept:
        raise ValueError(f"alpaca: no record keeps a response token within max_len = {max_len}")
    lengths = torch.tensor([len(ids) for ids, _ in kept], dtype=torch.long)
    offsets = torch.zeros(len(kept) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    tokens = torch.tensor([t for ids, _ in kept for t in ids], dtype=torch.int32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = {"vocab_size": len(tokenizer), "max_len": max_len, "pad_token_id": pad,
            "records": len(records), "dropped": len(records) - len(kept),
            "response_tokens": int(sum(len(ids) - p for ids, p in kept))}
    return AlpacaDataset(tokens, offsets, torch.tensor([p for _, p in kept], dtype=torch.long), max_len, pad, info)


@DATASETS.register("alpaca")
def alpaca(seed: int, *, path: str, tokenizer: str, max_len: int = 1024, limit: int = 0,
           loader: Literal["json", "datasets"] = "json", trust_remote_code: bool = False) -> AlpacaDataset:
    """Alpaca records from ``path`` (JSON array or JSONL; parquet / arrow with ``loader =
    "datasets"``), tokenised with the tokenizer in the directory ``tokenizer`` (``trust_remote_code``:
    let it run its own code, as openPangu's does); ``limit`` > 0 keeps the first ``limit`` records.
    The order is the file's; the sampler shuffles per epoch from the scenario seed."""
    if max_len < 2:
        raise ValueError("alpaca needs max_len >= 2")
    if limit < 0:
        raise ValueError("alpaca needs limit >= 0 (0 = every record)")
    records = read_records(path, loader)
    if limit:
        records = records[:limit]
    dataset = build_alpaca(records, load_tokenizer(tokenizer, trust_remote_code), max_len)
    dataset.info.update({"path": str(path), "tokenizer": str(tokenizer)})
    return dataset


alpaca.preflight = preflight  # type: ignore[attr-defined]  # run by the launcher before ranks start
alpaca.batch_keys = ("input_ids", "attention_mask", "labels")  # type: ignore[attr-defined]  # scenario/compat.py
