"""The detection benchmark's tables (``benchmarks/detection_table.py``): exact Clopper–Pearson bounds,
the floor, and the tables built from raw JSONL results (no runs: the runner itself is exercised by
``tests/test_heldback_stats.py``'s real runs and by its smoke command)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.detection_grid import healthy_runs, perturbed_runs
from benchmarks.detection_table import clopper_pearson, floor_steps, markdown, read_results


def test_clopper_pearson_matches_the_exact_bounds():
    assert clopper_pearson(0, 200)[1] == pytest.approx(0.01826, abs=2e-5)  # (1 − 0.025^(1/200))
    lo, hi = clopper_pearson(3, 100)
    assert lo == pytest.approx(0.00622, abs=2e-5) and hi == pytest.approx(0.08518, abs=2e-5)
    assert clopper_pearson(5, 5) == pytest.approx((0.47818, 1.0), abs=2e-5)


def test_floor():
    assert [floor_steps(n) for n in (2, 3, 4, 8, 16)] == [7, 5, 4, 3, 2]


def test_grid_is_big_enough_and_keys_are_unique():
    healthy, grid = healthy_runs(210), perturbed_runs(5)
    assert len(healthy) >= 200 and {r.world_size for r in healthy} >= {2, 3, 4, 5, 6, 8}
    assert len({r.cell for r in healthy}) >= 10  # models × optimizers × schedules
    cells = {r.cell for r in grid}
    assert all(sum(r.cell == c for r in grid) >= 5 for c in cells)
    keys = [r.key for r in healthy + grid]
    assert len(keys) == len(set(keys))


def test_tables_from_raw_results(tmp_path: Path):
    base = {"ok": True, "groups": None, "since_step": 0, "until_step": None, "offline_step": 10, "online_first_named": 6,
            "headline": "", "wall_s": 10.0}
    rows = [dict(base, key=f"h{i}", cell="healthy mlp", world_size=4, healthy=True, expected=[], onset=0,
                 status="consistent", ranks=[], right=False, online_alarm=None, online_named=[]) for i in range(20)]
    rows += [dict(base, key=f"p{i}", cell="label_noise 0.5 on 1 of 4", world_size=4, healthy=False, expected=[3],
                  onset=0, status="inconsistent", ranks=[3], right=True, online_alarm=5 + i, online_named=[3])
             for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = markdown(read_results(path))
    assert "| 20 | 0/20 (0.0 %, 95 % CI 0.0–16.8 %)" in text
    assert "| label_noise 0.5 on 1 of 4 | 4 | 5 | 5 | 5 | 0 | 10 | 8 (4) | 7 | 0 |" in text
    assert "| 4 | 4 | 5 | 8 | 10 |" in text  # latency: N, floor, runs, median, p90
