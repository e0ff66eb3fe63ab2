"""Keeps benchmarks/overhead.py from rotting: its machinery on the smallest model, a couple of steps
per variant, 2 gloo ranks. No timing assertions — the counted traffic is exact, so that is checked."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.overhead import make_plan, parse_args
from benchmarks.ranks import run_world
from benchmarks.variants import LABELS, SIZES, VARIANTS

WORLD = 2


@pytest.mark.timeout(260)
def test_overhead_machinery_runs_and_counts_traffic_exactly(tmp_path: Path) -> None:
    args = parse_args(["--quick", "--rounds", "1", "--warmup", "1", "--block-s", "0", "--timeout", "240"])
    plan = make_plan([{"size": "1M", "batch": 8}], ["memory", "time"], args)
    plan.update(memory_repeats=1, memory_steps=1)
    records = run_world(WORLD, plan, tmp_path / "result.json")
    rows = {r["variant"]: r for r in report.summarize(records)}

    assert set(rows) == set(VARIANTS)
    for row in rows.values():
        assert row["step_ms"] > 0 and math.isfinite(row["ratio"]) and math.isfinite(row["cpu_ratio"])
        assert row["peak_rss_mb"] > 0
    grads = SIZES["1M"].parameters * 4  # fp32 gradient bytes per rank
    scalars = WORLD * 4 * 8  # the step's all-gather: (loss, ‖g‖², g·ḡ, lr) in float64 from every rank
    shares = WORLD * (4 + WORLD * WORLD) * 8  # ... plus each rank's N×N share of the Gram matrix
    mb = report.MB
    assert rows["plain"]["received_mb"] * mb == grads  # the C++ reducer's buckets
    assert rows["idle"]["received_mb"] * mb == grads
    assert rows["metrics"]["received_mb"] * mb == grads + scalars
    assert rows["pairwise"]["received_mb"] * mb == grads + WORLD * grads + WORLD * 3 * 8  # legacy: its own 3 scalars
    # all-to-all: this rank's slice from every rank (1/N of the gradient × N), all-gather: the whole
    # gradient (every dimension of the 1M model is even: no padding at N = 2) - one all-reduce's bytes
    assert rows["a2a"]["received_mb"] * mb == grads + grads + shares
    assert rows["naive"]["received_mb"] * mb == WORLD * grads + WORLD * 8  # full gradients + losses
    assert all(rows[v]["hook_matches_reducer"] for v in ("metrics", "pairwise", "a2a", "idle"))
    # FSDP2: testbed's reduce-scatter receives N × what the default one does (every rank's slice),
    # i.e. (N - 1)/N of the gradient more, plus the row gather
    extra = rows["fsdp_metrics"]["received_mb"] - rows["fsdp"]["received_mb"]
    assert extra * mb == pytest.approx((WORLD - 1) * grads / WORLD + shares, abs=1)

    table = report.format_table(list(rows.values()))
    assert all(LABELS[v] in table for v in VARIANTS)
