"""Outlier-rank attribution and weight-divergence naming: pure checks on synthetic rows, then the
catalog's corruption scenario and a real LR-mismatch run, which must name the right rank and step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.diagnose.attribution import DEFAULT_THRESHOLD, attribute, describe
from testbed.record.files import read_metrics
from testbed.engine.runner import launch
from testbed.scenario.spec import load_scenario
from testbed.diagnose.summary import diverging_ranks, format_table, summarize

from tests.helpers import run, tiny

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def synthetic_rows(n: int, steps: int, seed: int = 0, spike: tuple[int, int, float] | None = None,
                   offset: tuple[int, float] | None = None) -> list[dict]:
    """Rows with natural rank-to-rank noise; ``spike = (rank, step, factor)`` multiplies one
    rank's grad norm at one step (a corrupted gradient); ``offset = (rank, delta)`` adds a
    constant to one rank's loss at every step."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        loss = 2.0 - 0.01 * step + 0.02 * rng.standard_normal(n)
        norm = (1.0 + 0.02 * step) * (1.0 + 0.05 * rng.standard_normal(n))
        cos = 0.5 + 0.03 * rng.standard_normal(n)
        if spike and spike[1] == step:
            norm[spike[0]] *= spike[2]
        if offset:
            loss[offset[0]] += offset[1]
        rows.append({"step": step, "loss": loss.tolist(), "grad_norm": norm.tolist(),
                     "cos_to_mean": cos.tolist(), "flags": []})
    return rows


def test_names_the_corrupted_rank_and_step():
    result = attribute(synthetic_rows(4, 30, spike=(2, 12, 10.0)))
    outlier = result["outlier"]
    assert (outlier["rank"], outlier["step"], outlier["metric"]) == (2, 12, "grad_norm")
    assert outlier["z"] > DEFAULT_THRESHOLD
    assert [r["first"] for r in result["ranks"] if r["rank"] != 2] == [None, None, None]
    assert describe(result).startswith("rank 2 at step 12 (grad_norm, z=+")


def test_quiet_run_has_no_outlier():
    result = attribute(synthetic_rows(4, 60, seed=1))
    assert result["outlier"] is None
    assert all(abs(r["peak"]["z"]) < DEFAULT_THRESHOLD for r in result["ranks"])
    assert describe(result).startswith("none above |z|=8")


def test_persistent_outlier_stands_out_from_the_first_step():
    result = attribute(synthetic_rows(4, 20, offset=(1, 3.0)))
    assert (result["outlier"]["rank"], result["outlier"]["step"], result["outlier"]["metric"]) == (1, 0, "loss")
    assert result["outlier"]["steps_flagged"] == 20


def test_two_ranks_transient_is_given_to_the_rank_that_moved():
    result = attribute(synthetic_rows(2, 30, spike=(1, 7, 10.0)))
    assert result["method"].startswith("N=2")
    assert (result["outlier"]["rank"], result["outlier"]["step"]) == (1, 7)
    assert result["ranks"][0]["first"] is None


def test_two_ranks_constant_offset_is_not_attributable():
    """Documented limit: with two ranks a constant offset is the run's normal, not an outlier."""
    assert attribute(synthetic_rows(2, 30, offset=(1, 0.5)))["outlier"] is None


def test_world_size_one_has_no_attribution():
    result = attribute(synthetic_rows(1, 10, spike=(0, 3, 100.0)))
    assert result["outlier"] is None and result["method"].startswith("none")


def test_nonfinite_rank_is_named_not_the_ranks_it_spread_to():
    rows = synthetic_rows(4, 12)
    rows[5]["grad_norm"][3] = None
    rows[5]["flags"] = [{"rank": 3, "kind": "nonfinite_grad"}]
    for row in rows[6:]:  # the averaged gradient carried it to every rank
        row["grad_norm"] = [None] * 4
        row["flags"] = [{"rank": r, "kind": "nonfinite_grad"} for r in range(4)]
    outlier = attribute(rows)["outlier"]
    assert (outlier["rank"], outlier["step"], outlier["nonfinite"], outlier["z"]) == (3, 5, True, None)
    assert "non-finite" in describe(attribute(rows))


def test_bit_identical_peers_make_any_difference_stand_out():
    rows = [{"step": s, "loss": [1.5, 1.5, 1.5, 1.5 + 1e-6], "grad_norm": [0.3] * 4, "cos_to_mean": [1.0] * 4}
            for s in range(5)]
    outlier = attribute(rows)["outlier"]
    assert (outlier["rank"], outlier["step"], outlier["metric"]) == (3, 0, "loss")
    assert np.isfinite(outlier["z"]) and outlier["z"] > 1e3
    # the z of a spread of zero is not a number to print (the seed ladder's "z=-4.75e+10")
    assert describe(attribute(rows)) == ("rank 3 at step 0 (loss, differs from bit-identical ranks: no spread to "
                                         "compare against); stood out at 5 steps")


@given(n=st.integers(3, 8), steps=st.integers(10, 40), data=st.data())
def test_spike_found_and_rank_relabelling_is_followed(n, steps, data):
    rank = data.draw(st.integers(0, n - 1))
    step = data.draw(st.integers(0, steps - 1))
    factor = data.draw(st.sampled_from([1e-3, 1e3]))
    rows = synthetic_rows(n, steps, seed=data.draw(st.integers(0, 2**16)), spike=(rank, step, factor))
    outlier = attribute(rows)["outlier"]
    assert (outlier["rank"], outlier["step"], outlier["metric"]) == (rank, step, "grad_norm")
    perm = data.draw(st.permutations(range(n)))  # new rank k holds old rank perm[k]
    shuffled = [{**r, **{m: [r[m][perm[k]] for k in range(n)] for m in ("loss", "grad_norm", "cos_to_mean")}}
                for r in rows]
    assert attribute(shuffled)["outlier"]["rank"] == perm.index(rank)


def test_summary_carries_the_outlier_line():
    summary = summarize(synthetic_rows(4, 30, spike=(2, 12, 10.0)))
    assert summary["outlier"]["outlier"]["rank"] == 2
    line = next(ln for ln in format_table(summary).splitlines() if ln.startswith("largest spike"))
    assert "rank 2 at step 12 (grad_norm, z=+" in line


def test_diverging_ranks_majority_and_tie():
    assert diverging_ranks([7, 7, 9, 7]) == ([2], "majority")
    assert diverging_ranks([7, 9]) == ([1], "rank 0 (no majority)")
    assert diverging_ranks([5, 9, 9, 9]) == ([0], "majority")
    assert diverging_ranks([1, 1, 2, 2]) == ([2, 3], "rank 0 (no majority)")


@pytest.mark.timeout(180)
def test_grad_corruption_scenario_names_rank_2_step_12(tmp_path):
    """The catalog scenario, cut to 13 steps (the corruption is at step 12, the last) to keep the
    test short; the full 40-step run names the same rank and step."""
    scenario = load_scenario(SCENARIOS / "grad_corruption.toml", {"steps": 13})
    assert launch(scenario, tmp_path).ok
    summary = summarize(read_metrics(tmp_path))
    outlier = summary["outlier"]["outlier"]
    assert (outlier["rank"], outlier["step"], outlier["metric"]) == (2, 12, "grad_norm")
    assert "largest spike       rank 2 at step 12 (grad_norm" in format_table(summary)


@pytest.mark.timeout(120)
def test_lr_mismatch_names_the_diverging_rank_and_step(tmp_path):
    raw = tiny(world_size=3, steps=3, perturbations=[{"kind": "lr_mismatch", "ranks": [1], "start_step": 1,
                                                     "scale": 3.0}])
    result, rows, _ = run(raw, tmp_path)
    assert result.ok
    summary = summarize(rows)
    assert summary["weights_in_sync"] is False
    assert (summary["first_weight_divergence_step"], summary["first_weight_divergence_ranks"],
            summary["weight_divergence_reference"]) == (1, [1], "majority")
    assert "first divergence at step 1: rank(s) 1 differ from majority" in format_table(summary)
