"""Shared test helpers: build scenario dicts, run them for real (bounded), read the records."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from testbed.record.files import read_metrics
from testbed.engine.runner import RunResult, launch
from testbed.scenario.spec import Scenario, parse_scenario

TINY: dict[str, Any] = {
    "name": "tiny",
    "description": "tiny test scenario",
    "world_size": 2,
    "steps": 4,
    "seed": 0,
    "timeout_s": 120.0,
    "stall_timeout_s": 60.0,
    "model": {"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.0},
    "data": {"kind": "synthetic", "batch_size": 8, "size": 256, "features": 8, "classes": 4},
    "optim": {"kind": "sgd", "lr": 0.1},
    "metrics": {"weight_check_every": 1},
}


def tiny(**changes: Any) -> dict[str, Any]:
    """A copy of TINY with top-level keys replaced; nested tables are merged one level deep."""
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and "kind" not in value:
            raw[key].update(value)
        else:
            raw[key] = value
    return raw


def run(raw: dict[str, Any], out_dir: Path) -> tuple[RunResult, list[dict[str, Any]], Scenario]:
    """Validate and launch a scenario dict for real; returns the result, metric rows and scenario."""
    scenario = parse_scenario(raw, source="<test>")
    result = launch(scenario, out_dir)
    return result, read_metrics(out_dir), scenario


def run_json(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "run.json").read_text())



ORACLE_TOL = 1e-5


def oracle_errors(row: dict[str, Any]) -> dict[str, float]:
    """``diagnose.summary.self_check_errors``: norms relative, cosines absolute."""
    from testbed.diagnose.summary import self_check_errors

    return self_check_errors(row)


def assert_matches_oracle(rows: list[dict[str, Any]], pairwise_steps: int) -> None:
    """Every per-rank metric (and the pairwise matrix where recorded) equals the oracle to 1e-5."""
    assert sum("pairwise_cos" in r for r in rows) == pairwise_steps
    for row in rows:
        errors = oracle_errors(row)
        assert max(errors.values()) <= ORACLE_TOL, (row["step"], errors)
