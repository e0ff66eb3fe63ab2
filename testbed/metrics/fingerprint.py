"""Per-sample fingerprints of what a model consumes, computed on the inputs' own device.

A forward's inputs (positional and keyword arguments, nested in tuples, lists and dicts, as a
Hugging Face model or a LightningModule takes them) are flattened to named tensors. The batch
dimension is dim 0 of the tensors that share the most common leading size; other tensors
(scalars, a ``[1, L]`` position table) are left out. Each sample's fingerprint is a
**multilinear hash** of its bytes:

    h(x) = mix64( Σ_key Σ_j m_key[j] · w_key[j] )   (int64 arithmetic, wrapping mod 2**64)

where ``w_key[j]`` are the sample's words (its tensor's bytes read as 8/16/32-bit integers, never
converted) and ``m_key[j]`` fixed pseudo-random 64-bit multipliers (splitmix64 of a per-key seed
and the position), ``mix64`` the splitmix64 finalizer (a bijection). For two different samples
the chance that they share a fingerprint is at most 2**-33 when the multipliers are random
(a word difference ``d`` with ``|d| < 2**32`` has at most 31 trailing zero bits, so ``m·d`` hits a
given value mod 2**64 with probability <= 2**(31-64)); the splitmix64 multipliers stand in for
random ones (an adversary who knows them can build collisions; training data does not).

Padding: when the inputs hold an ``attention_mask`` of shape ``[B, L]``, the word positions of
every ``[B, L, ...]`` tensor are numbered among the *valid* positions only (``cumsum(mask) - 1``)
and the padded ones contribute nothing, so one sample has one fingerprint however much a dynamic
collator padded it and on which side. A word that is zero contributes nothing either, so a
trailing run of zero words (zero-padding without a mask) does not change a fingerprint.

Cost: a few elementwise int64 operations per input word on the device (no device → host copy);
the temporary memory is bounded by processing at most ``CHUNK_WORDS`` words at a time.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterator

import torch

MASK_KEY = "attention_mask"
CHUNK_WORDS = 1 << 23  # words hashed per chunk: 8M words = 64 MB of int64 per temporary
_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _signed(0x9E3779B97F4A7C15)
C1 = _signed(0xBF58476D1CE4E5B9)
C2 = _signed(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (``>>`` is arithmetic on signed integers)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 values (wrapping): a bijection that spreads every input bit."""
    x = x + GOLDEN
    x = (x ^ _lsr(x, 30)) * C1
    x = (x ^ _lsr(x, 27)) * C2
    return x ^ _lsr(x, 31)


def mix64_int(x: int) -> int:
    """``mix64`` on one Python integer (the same value, as a signed int64)."""
    x = (x + GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * (C1 & _M64)) & _M64
    x = ((x ^ (x >> 27)) * (C2 & _M64)) & _M64
    return _signed(x ^ (x >> 31))


def key_seed(key: str) -> int:
    """A stable 62-bit seed per input name (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 2


class Multipliers:
    """The fixed multiplier table of each input name on each device, grown on demand (the same
    values on every rank and in every run: ``mix64(seed(key) + j)``)."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, key: str, words: int, device: torch.device) -> torch.Tensor:
        cached = self.tables.get((key, str(device)))
        if cached is None or cached.numel() < words:
            size = max(words, 2 * cached.numel() if cached is not None else 1024)
            base = torch.arange(size, dtype=torch.int64, device=device) + key_seed(key)
            cached = mix64(mix64(base))
            self.tables[(key, str(device))] = cached
        return cached[:words]


def flatten_inputs(args: Any, kwargs: Any) -> list[tuple[str, torch.Tensor]]:
    """The forward's tensors with stable names (``arg0``, ``arg0.pixel_values``, ``input_ids``), in
    argument order; non-tensor leaves (a ``batch_idx``, ``num_items_in_batch`` as an int) are skipped."""
    out: list[tuple[str, torch.Tensor]] = []
    for i, value in enumerate(args or ()):
        out += _walk(f"arg{i}", value, 1)
    for key, value in (kwargs or {}).items():
        out += _walk(str(key), value, 1)
    return out


def _walk(prefix: str, value: Any, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
        return
    if depth > 6 or isinstance(value, (str, bytes)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(f"{prefix}.{i}", item, depth + 1)
    elif hasattr(value, "keys") and hasattr(value, "__getitem__"):  # dict, BatchEncoding, UserDict
        try:
            items = [(str(k), value[k]) for k in value.keys()]
        except Exception:  # noqa: BLE001 - an odd mapping: skip it, never break the forward
            return
        for key, item in items:
            yield from _walk(f"{prefix}.{key}", item, depth + 1)


def batch_tensors(named: list[tuple[str, torch.Tensor]]) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """The batch size (the most common leading size of tensors with a dim; ties: the larger) and
    the tensors that have it."""
    sizes = Counter(t.shape[0] for _, t in named if t.dim() >= 1)
    if not sizes:
        return 0, []
    batch = max(sizes, key=lambda b: (sizes[b], b))
    return batch, [(k, t) for k, t in named if t.dim() >= 1 and t.shape[0] == batch]


def _words(t: torch.Tensor) -> torch.Tensor:
    """A ``[B, ...]`` tensor's bytes per sample as int64 words ``[B, W]`` (bits reinterpreted)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous().reshape(t.shape[0], -1)
    size = t.element_size()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif size == 8:
        t = t.view(torch.int32)
    elif size == 4 and t.dtype != torch.int32:
        t = t.view(torch.int32)
    elif size == 2 and t.dtype != torch.int16:
        t = t.view(torch.int16)
    elif size == 1 and t.dtype not in (torch.int8, torch.uint8):
        t = t.view(torch.uint8)
    return t.to(torch.int64)


class Fingerprinter:
    """``fingerprints(args, kwargs)`` → one int64 fingerprint per sample (module doc), on the
    device of the first batch tensor; None when the inputs hold no batch tensor."""

    def __init__(self) -> None:
        self.multipliers = Multipliers()

    def fingerprints(self, args: Any, kwargs: Any) -> torch.Tensor | None:
        batch, tensors = batch_tensors(flatten_inputs(args, kwargs))
        if not tensors:
            return None
        device = tensors[0][1].device
        mask = next((t for k, t in tensors if k.split(".")[-1] == MASK_KEY and t.dim() == 2), None)
        total = torch.zeros(batch, dtype=torch.int64, device=device)
        for key, t in tensors:
            total += self._hash(key, t, mask).to(device)
        return mix64(total)

    def _hash(self, key: str, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        words = _words(t)
        if mask is not None and t.dim() >= 2 and t.shape[1] == mask.shape[1] and words.shape[1] % mask.shape[1] == 0:
            return self._masked(key, words, mask.to(words.device))
        table = self.multipliers.get(key, words.shape[1], words.device)
        rows = max(1, CHUNK_WORDS // max(words.shape[1], 1))
        return torch.cat([(words[i:i + rows] * table).sum(dim=1) for i in range(0, words.shape[0], rows)])

    def _masked(self, key: str, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions numbered among the valid ones: padding (either side) leaves the hash alone."""
        batch, length = mask.shape
        per = words.shape[1] // length
        valid = mask != 0
        position = (valid.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
        index = position.unsqueeze(-1) * per + torch.arange(per, device=words.device)  # [B, L, per]
        table = self.multipliers.get(key, length * per, words.device)
        weights = table[index] * valid.unsqueeze(-1).to(torch.int64)
        return (words.view(batch, length, per) * weights).sum(dim=(1, 2))
