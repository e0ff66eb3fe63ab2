"""Dotted overrides: ``--set optim.lr=0.05`` and friends, applied to a parsed scenario table.

Values are TOML (``--set perturbations.0.ranks=[1,2]``); a value that is not valid TOML is taken as
a bare string. List indices are integers in the path.
"""
from __future__ import annotations

import tomllib
from typing import Any, Iterable

from testbed.scenario.errors import ScenarioError


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "perturbations.0.ranks", [1])``: list indices are integers >= 0 in the path
    (``perturbations.-1.ranks`` silently meant the last entry; now an IndexError)."""
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        node = node[_index(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last)] = value
    else:
        node[last] = value


def _index(part: str) -> int:
    if not part.isdigit():  # "-1", "+1", " 1": Python would accept them, a path means one position
        raise IndexError(f"list index {part!r} is not an integer >= 0")
    return int(part)


def parse_overrides(items: Iterable[str] | None, *, steps: int | None = None,
                    world_size: int | None = None) -> dict[str, object]:
    """``["optim.lr=0.05", ...]`` (+ the ``--steps`` / ``--world-size`` shortcuts) → dotted key → value."""
    out: dict[str, object] = {}
    if steps is not None:
        out["steps"] = steps
    if world_size is not None:
        out["world_size"] = world_size
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():  # "--set optim" would silently become optim = ""
            raise ScenarioError("--set", key or item, "KEY=VALUE, e.g. --set optim.lr=0.05", item)
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare string
        except RecursionError:
            raise ScenarioError("--set", key, "a value nested at most a few levels deep", value) from None
    return out
