"""Bit-identical ranks: when replicas differ, it is an anomaly by construction.

Continuous per-rank values of ranks that read different samples never coincide to the last bit. So
when ranks are bit-identical step after step, they are replicas — they read the same batch with
the same seeds (``replicate_batch``; identical batches in the catalog's seed and precision
scenarios) — and there is nothing random left to test: any difference between them is an anomaly,
``p_value`` 0.

Per metric, each step splits the ranks into classes of bit-identical values (``partition``). The
run's *structure* is the most common partition, when it holds at at least half of the steps and
has a class of two or more ranks (coincidental ties of quantized values give changing partitions,
not a stable one). Then:

- all ranks in one class — the exact control: nothing to report while they stay identical;
- a strict majority class and ranks outside it (identical batches, one rank with another dropout
  seed or precision): each rank outside differs from the replicas at every step — ``persistent``;
- no majority (two pairs with different dropout masks): the classes are exact ``groups``;
- at the other steps, a rank that leaves its class (a corrupted value on one replica) —
  ``transient`` when it happens at a few steps, ``persistent`` when at most steps from then on.

Which side of a *partial* replication is wrong depends on intent. A ``replicate_batch`` baseline
replicates on purpose, and the ranks apart from the replicas are the fault (``intended=True``). In a
job that should shard its data, ranks that read the same batches are the fault (``intended=False``:
"ranks 1–2 read rank 0's batches"). Unknown intent (``None``, the default): when two or more ranks
sit apart, each on its own, they look like ordinary independent ranks and the replicas are the
anomaly; with one rank apart the replicas are taken as the baseline (the catalog's seed and
precision scenarios). Replicas named as the anomaly are named only when they are a minority —
among a majority of identical ranks, which one read its own data is not decidable.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from testbed.diagnose.evidence import Evidence


def partition(values: np.ndarray) -> tuple[int, ...]:
    """Canonical classes of a step's bit-identical values: each rank's label is the first rank with
    the same value, e.g. ``(0, 0, 0, 3)``."""
    first: dict[float, int] = {}
    return tuple(first.setdefault(v, i) for i, v in enumerate(values.tolist()))


def classes(labels: tuple[int, ...]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for r, label in enumerate(labels):
        out.setdefault(label, []).append(r)
    return list(out.values())


def structure(x: np.ndarray) -> tuple[int, ...] | None:
    """The run's stable partition (module doc), or None when the ranks are not replicas."""
    if x.shape[0] == 0 or x.shape[1] < 2:
        return None
    (labels, count), = Counter(partition(row) for row in x).most_common(1)
    if 2 * count < x.shape[0] or len(set(labels)) == len(labels):
        return None
    return labels


def majority(groups: list[list[int]], n: int) -> list[int] | None:
    return next((g for g in groups if 2 * len(g) > n), None)


def outside_majority(labels: tuple[int, ...]) -> tuple[int, ...]:
    """Ranks the structure sets apart: outside the strict-majority class, or all when none."""
    groups = classes(labels)
    big = majority(groups, len(labels))
    return tuple(range(len(labels))) if big is None else tuple(r for r in range(len(labels)) if r not in big)


def replicas_are_the_fault(labels: tuple[int, ...], intended: bool | None) -> bool:
    """Whether the replicated classes, not the ranks apart from them, are the anomaly (module doc)."""
    if intended is not None:
        return not intended
    return sum(1 for g in classes(labels) if len(g) == 1) >= 2


def breaks(values: np.ndarray, labels: tuple[int, ...]) -> list[tuple[int, ...]]:
    """At one step: members of the structure's classes that left them — per class, the members
    differing from the class's strict majority value (one key per rank), or the whole class as one
    key when it split without a majority."""
    out: list[tuple[int, ...]] = []
    for group in classes(labels):
        if len(group) < 2:
            continue
        counts = Counter(values[group].tolist()).most_common()
        if len(counts) == 1:
            continue
        if 2 * counts[0][1] > len(group):
            out += [(r,) for r in group if values[r] != counts[0][0]]
        else:
            out.append(tuple(group))
    return out


def replica_evidence(metric: str, steps: list[int], values: np.ndarray, x: np.ndarray, log_scale: bool,
                     labels: tuple[int, ...], intended: bool | None = None) -> tuple[list[Evidence], list[list[int]] | None]:
    """Evidence of a metric whose ranks are replicas (``structure`` gave ``labels``): ``values``
    are the raw finite values ``[T, N]``, ``x`` their comparable form. Returns the evidence and,
    when the classes have no majority (or the replicas are the fault), the exact groups."""
    n = values.shape[1]
    groups = classes(labels)
    at_structure = np.array([partition(row) == labels for row in values])
    out: list[Evidence] = []
    exact_groups = None
    if len(groups) > 1 and replicas_are_the_fault(labels, intended):
        first = steps[int(np.argmax(at_structure))]
        for g in (g for g in groups if len(g) > 1):
            rest = [r for r in range(n) if r not in g]
            effect = {"value": len(g), "unit": "ranks with bit-identical values (reading the same batches: impossible "
                      "for ranks that read their own)", "since_step": first, "steps": int(at_structure.sum()),
                      "of": len(steps), "replicated": True, "attributable": 2 * len(g) < n}
            exact_groups = sorted([g, rest], key=lambda a: a[0])
            out.append(Evidence(metric, "persistent", effect, 0.0, group=[g, rest]))
    elif len(groups) > 1:
        first = steps[int(np.argmax(at_structure))]
        big = majority(groups, n)
        if big is None:
            exact_groups = sorted(groups, key=lambda g: g[0])
            effect = {"value": len(groups), "unit": "classes of bit-identical ranks (identical within, different "
                      "between)", "since_step": first, "steps": int(at_structure.sum()), "of": len(steps),
                      "replicated": True}
            out.append(Evidence(metric, "persistent", effect, 0.0, group=exact_groups))
        else:
            for r in outside_majority(labels):
                diff = (x[:, r] - x[:, big[0]])[at_structure]
                mean = float(diff.mean())
                effect = {"value": round(float(np.expm1(mean)) if log_scale else mean, 9),
                          "unit": ("relative" if log_scale else "difference") + " (rank vs the bit-identical ranks)",
                          "since_step": first, "steps": int(at_structure.sum()), "of": len(steps), "replicated": True}
                out.append(Evidence(metric, "persistent", effect, 0.0, rank=r))
    hits: dict[tuple[int, ...], list[int]] = {}
    for t in np.flatnonzero(~at_structure):
        for key in breaks(values[t], labels):
            hits.setdefault(key, []).append(int(t))
    for who, ts in sorted(hits.items(), key=lambda kv: kv[1][0]):
        group = next(g for g in groups if who[0] in g)
        rest = [r for r in group if r not in who] or group
        gap = max(float(np.max(np.abs(values[t, list(who)] - values[t, rest[0]]))) for t in ts)
        persistent = len(ts) >= 3 and 2 * len(ts) >= len(steps) - ts[0]
        effect = {"value": gap, "unit": f"largest |difference| from its bit-identical ranks ({metric} units)",
                  "since_step": steps[ts[0]], "steps": len(ts), "of": len(steps), "replicated": True}
        kind = "persistent" if persistent else "transient"
        if len(who) == 1:
            out.append(Evidence(metric, kind, effect, 0.0, rank=who[0]))
        else:
            out.append(Evidence(metric, kind, effect, 0.0, group=[[r] for r in who]))
    return out, exact_groups
