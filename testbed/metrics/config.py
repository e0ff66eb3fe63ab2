"""The differences between the ranks' settings (``engine/config.py`` collects and exchanges them).

``config_differences(configs)`` → ``[{"key", "values"}]`` for every key whose value is not the same
on every rank (a key missing on a rank counts as ``None`` there), in key order: the first row's
``config_differs`` (``schema/row.py``), which the verdict reports as ``config`` evidence.
"""
from __future__ import annotations

from typing import Any, Sequence


def config_differences(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({k for c in configs for k in c})
    out = []
    for key in keys:
        values = [c.get(key) for c in configs]
        if any(repr(v) != repr(values[0]) for v in values[1:]):
            out.append({"key": key, "values": values})
    return out
