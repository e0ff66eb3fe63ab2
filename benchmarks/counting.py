"""Count the bytes handed to collectives, so traffic per step is measured rather than estimated.

Python-level collectives (the comm hook's ``all_reduce`` and chunked all-gathers, the metric
gather, the naive variant's full gather) are counted by wrapping the ``torch.distributed``
functions wherever a module holds a reference to them. Plain DDP's built-in all-reduce runs inside the C++
reducer and never reaches Python; for it the sizes of the reducer's own buckets
(``reducer._get_zeros_like_grad_buckets()``) are what it all-reduces per step. The benchmark
checks the two against each other on the hooked model, where both exist.

Definitions, per rank and step: ``sent`` is the size of this rank's input tensors, ``received``
the size of the results it ends up holding (an all-reduce receives its own size, an all-gather N
times its input). Wire bytes depend on the collective's algorithm and are not claimed here.
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
            "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single")


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _sizes(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """(sent, received) bytes of one call, from the tensors the caller passed."""
    if name in ("all_reduce", "broadcast"):
        n = _nbytes(args[0] if args else kwargs.get("tensor"))
        return n, n
    if name == "all_gather":
        out, inp = (list(args) + [kwargs.get("tensor_list"), kwargs.get("tensor")])[:2]
        return _nbytes(inp), _nbytes(out)
    if name in ("all_gather_into_tensor", "all_gather_single"):
        out, inp = (list(args) + [kwargs.get("output_tensor"), kwargs.get("input_tensor")])[:2]
        return _nbytes(inp), _nbytes(out)
    out, inp = (list(args) + [None, None])[:2]  # reduce_scatter*, all_to_all*: (output, input)
    out = kwargs.get("output", kwargs.get("output_tensor", out))  # FSDP2 passes them by keyword
    inp = kwargs.get("input", kwargs.get("input_tensor", inp))
    return _nbytes(inp), _nbytes(out)


@dataclass
class CollectiveCounter:
    """Bytes and calls per collective name, accumulated while ``counting()`` is active."""

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    call_sizes: dict[str, list[int]] = field(default_factory=dict)  # sent bytes of each call

    def total(self) -> dict[str, int]:
        return {"sent": sum(self.sent.values()), "received": sum(self.received.values()),
                "calls": sum(self.calls.values())}

    def record(self, name: str, sent: int, received: int) -> None:
        self.sent[name] += sent
        self.received[name] += received
        self.calls[name] += 1
        self.call_sizes.setdefault(name, []).append(sent)


_depth = threading.local()


def _wrap(name: str, fn: Callable[..., Any], counter: CollectiveCounter) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_depth, "n", 0) == 0  # all_gather_into_tensor calls all_gather_single
        if outer:
            sent, received = _sizes(name, args, kwargs)
            counter.record(name, sent, received)
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n -= 1

    return counted


def _references(functions: dict[int, str]) -> list[tuple[Any, str, str]]:
    """Every module-level name bound to one of ``functions`` (by identity), e.g. ``dist.all_reduce``,
    ``distributed_c10d.all_gather_single`` and aliases such as ``testbed.engine.hook._all_gather_flat``."""
    found = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if callable(value) and id(value) in functions:
                found.append((module, attr, functions[id(value)]))
    return found


@contextmanager
def counting() -> Iterator[CollectiveCounter]:
    """Count every collective called through Python while the block runs.

    Rebinds each module-level reference to a ``torch.distributed`` collective, so aliases taken
    at import time are counted too; nested calls (one collective implemented by another) count
    once.
    """
    counter = CollectiveCounter()
    originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}
    wrapped = {name: _wrap(name, fn, counter) for name, fn in originals.items()}
    refs = _references({id(fn): name for name, fn in originals.items()})
    for module, attr, name in refs:
        setattr(module, attr, wrapped[name])
    try:
        yield counter
    finally:
        for module, attr, name in refs:
            setattr(module, attr, originals[name])


def reducer_bucket_sizes(ddp: torch.nn.parallel.DistributedDataParallel) -> list[int]:
    """Bytes of each bucket DDP's C++ reducer all-reduces per step (its current buckets, after
    the rebuild that follows the first step)."""
    return [_nbytes(b.buffer()) for b in ddp.reducer._get_zeros_like_grad_buckets()]
