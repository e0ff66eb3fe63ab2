"""Held-back check (issue 13, Must show): catalog kinds at seeds, world sizes and strengths the
catalog does not use get the right verdict and suspects; a healthy run is consistent.

Four short real runs (2–5 ranks, ≤ 12 steps, MLP); the wider grid is benchmarks/detection.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed.diagnose import diagnose
from testbed.engine.runner import launch
from testbed.record.files import read_metrics
from testbed.scenario.spec import load_scenario

ROOT = Path(__file__).resolve().parents[1] / "scenarios"
REPLICATE = {"kind": "replicate_batch", "ranks": "all"}

CASES = [  # (base file, world size, steps, seed, perturbations, status, suspects)
    ("control_4rank.toml", 2, 10, 11, [], "consistent", []),
    ("lr_mismatch.toml", 3, 8, 5, [{"kind": "lr_mismatch", "ranks": [1], "start_step": 3, "scale": 1.5}],
     "diverged", [1]),
    ("grad_corruption.toml", 5, 12, 3, [{"kind": "grad_corruption", "ranks": [4], "start_step": 6, "end_step": 7,
                                         "mode": "scale", "factor": 1000.0}], "inconsistent", [4]),
    ("seed_desync_1.toml", 3, 6, 9, [REPLICATE, {"kind": "seed_desync", "ranks": [0]}], "inconsistent", [0]),
]


@pytest.mark.parametrize("base,n,steps,seed,perturbations,status,suspects", CASES,
                         ids=[f"{c[0].split('.')[0]}-{c[1]}r" for c in CASES])
def test_heldback_verdict(tmp_path: Path, base: str, n: int, steps: int, seed: int, perturbations: list,
                          status: str, suspects: list[int]) -> None:
    scenario = load_scenario(ROOT / base, {"world_size": n, "steps": steps, "seed": seed, "expect": {},
                                           "perturbations": perturbations, "timeout_s": 240.0})
    result = launch(scenario, tmp_path)
    assert result.ok, result.reason
    v = diagnose(read_metrics(tmp_path), world_size=n, intended=scenario.intended)  # a replicate_batch baseline
    assert (v.status, v.ranks) == (status, suspects), v.headline()
