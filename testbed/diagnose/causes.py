"""The exact causes in words a user can act on: what goes wrong, where, and what to check.

``cause_phrase(evidence, world_size)`` for the ``data``, ``state`` and ``config`` evidence
(``exact.py``); ``verdict``'s headline (``text.py``) puts these first. Kept apart from the
analysis so the wording can change without touching the rules.
"""
from __future__ import annotations

from typing import Any

from testbed.diagnose.evidence import Evidence

SET_EPOCH = "is `sampler.set_epoch(epoch)` called every epoch?"
FIXED_ORDER = ("(a loader with shuffle=False repeats by design: declare it with "
               "testbed.attach(..., fixed_order=True))")


def ranks_text(ranks: list[int]) -> str:
    """``rank 2`` / ``ranks 1–2`` / ``ranks 1, 3 and 5``."""
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}–{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def cause_phrase(e: Evidence, world_size: int, explained: bool = False) -> str:
    """``explained``: another cause of the run explains this one (unread samples when ranks overlap
    or replicate): the phrase then states it without the advice."""
    details = e.details or {}
    if e.kind == "data":
        phrase = _data(str(details.get("cause")), e.culprits, e.effect, world_size)
        return phrase.split(": do the samplers'")[0] if explained else phrase
    if e.kind == "state":
        return _state(details.get("tensor"), e.culprits, e.effect, world_size)
    return _config(str(details.get("key")), e.culprits, details.get("values") or [], e.since_step)


def _data(cause: str, ranks: list[int], f: dict[str, Any], n: int) -> str:
    since = f.get("since_step")
    if cause == "replicated":
        if not ranks:
            return (f"every rank reads the same samples in the same order (from step {since}): the data is not "
                    f"sharded - a DistributedSampler (or per-rank sharding of the dataset) is missing, {n}× the "
                    "compute for one rank's data")
        copies = "; ".join(f"{ranks_text(g[1:])} read{'s' if len(g) == 2 else ''} rank {g[0]}'s batches"
                           for g in f.get("classes", []))
        return (f"{copies} (identical samples in the same order, from step {since}): is each rank's sampler given "
                "its own rank (the global rank, not LOCAL_RANK) and num_replicas = the world size?")
    if cause == "overlap":
        pairs = f"{f.get('collisions')} sampled samples shared by two ranks in the first pass, where a disjoint " \
                "partition allows at most 1 per pair"
        if ranks:
            return (f"{ranks_text(ranks)}'s samples overlap the other ranks' ({pairs}): does {ranks_text(ranks)}'s "
                    "sampler use another seed? (DistributedSampler(seed=...) must be the same on every rank)")
        tail = " (2 ranks: which sampler is off is not attributable)" if n == 2 else ""
        return (f"the ranks read overlapping samples ({pairs}){tail}: do the samplers share one seed - and is there "
                "a DistributedSampler at all?")
    if cause == "epoch_repeat":
        period = f.get("period")
        if period == 1:
            who = "every rank" if not ranks else ranks_text(ranks)
            return (f"{who} reads the same samples in the same order at every step (from step {since}): a fixed "
                    f"batch, or a loader that yields one batch? {FIXED_ORDER}")
        if not ranks:
            return (f"epoch 2 repeats epoch 1's order on every rank (from step {since}, period {period} steps): "
                    f"{SET_EPOCH} {FIXED_ORDER}")
        return (f"{ranks_text(ranks)} repeat{'s' if len(ranks) == 1 else ''} its order of {period} steps earlier "
                f"(from step {since}) while the other ranks reshuffle: {SET_EPOCH}")
    if cause == "uncovered":
        return (f"{f.get('unread')} of {f.get('size')} samples were never read in epoch {f.get('epoch')} (a "
                f"synchronised sampler reads {f.get('expected')}): do the samplers' num_replicas and rank match "
                "the job's?")
    return f"data: {cause}"


def _state(tensor: Any, ranks: list[int], f: dict[str, Any], n: int) -> str:
    kind, since = f.get("state", "parameter"), f.get("since_step")
    last = f" (last in sync at step {f['last_in_sync']})" if f.get("last_in_sync") is not None and kind == "buffer" else ""
    what = f"{tensor} ({'frozen ' if f.get('frozen') else ''}{kind})" if tensor else f"the {kind}s"
    if ranks:
        where = f"differs on {ranks_text(ranks)} from step {since}{last}"
    elif n == 2:
        where = f"differs between ranks 0 and 1 from step {since}{last} (2 ranks: not attributable)"
    else:
        where = f"differs between the ranks from step {since}{last} (no majority agrees)"
    if kind == "buffer":
        return (f"{what} {where}: DDP(..., broadcast_buffers=False), or a buffer changed on some ranks? (DDP "
                "broadcasts rank 0's buffers at every forward by default)")
    return (f"first differing tensor: {what}: a checkpoint loaded, or a layer re-initialised or unfrozen, on some "
            "ranks after wrapping in DDP?")


def _config(key: str, ranks: list[int], values: list[Any], since: Any) -> str:
    if key == "lr":
        shown = ", ".join(f"rank {r} {v:.6g}" if isinstance(v, float) else f"rank {r} {v}" for r, v in enumerate(values))
        return (f"the ranks stepped with different learning rates from step {since} ({shown}): a scheduler stepped "
                "a different number of times on some rank, or a per-rank lr?")
    if ranks:
        others = next((v for r, v in enumerate(values) if r not in ranks), None)
        theirs = ", ".join(f"{_value(values[r])} on rank {r}" for r in ranks)
        return f"config {key} differs: {theirs} ({_value(others)} on the others)"
    return f"config {key} differs: " + ", ".join(f"rank {r} {_value(v)}" for r, v in enumerate(values))


def _value(v: Any) -> str:
    return "unset" if v is None else repr(v)
