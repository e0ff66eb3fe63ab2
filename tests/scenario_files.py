"""Write scenario dicts as real TOML files (the gate and the pytest plugin read files, not dicts)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers import tiny


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(raw: dict[str, Any]) -> str:
    """Top-level scalars, then ``[table]`` for dicts and ``[[table]]`` for lists of dicts."""
    lines = [f"{k} = {_value(v)}" for k, v in raw.items() if not isinstance(v, dict)
             and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def write_scenario(directory: Path, filename: str, **changes: Any) -> Path:
    """``tiny(**changes)`` written to ``directory/filename``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(to_toml(tiny(**changes)), encoding="utf-8")
    return path


#: the exact-zero control: every rank reads rank 0's batch with the same seeds, dropout on so that a
#: seed bug shows; expectations say "exactly synced"
EXACT = {
    "model": {"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.2},
    "steps": 6,
    "perturbations": [{"kind": "replicate_batch", "ranks": "all"}],
    "expect": {"weights_in_sync": True, "max_loss_cv": {"limit": 0.0, "statistic": "peak"},
               "min_cos_mean": {"limit": 0.99999, "statistic": "peak"}},
}
