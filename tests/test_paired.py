"""Paired comparison with a control and the trend test over sweep levels (pure: simulated data),
plus the control scenario and the level comparison on fake records (no processes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from testbed.diagnose.paired import compare_rows, paired_difference, spearman, trend_line, trend_test
from testbed.engine.control import compare_levels, control_of
from testbed.record.files import METRICS_FILE
from testbed.scenario.spec import load_scenario

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=15, deadline=None, derandomize=True)


@FAST
@given(st.integers(2, 60), st.floats(-5, 5), st.floats(0.01, 2), st.integers(0, 2**31))
def test_ci_contains_mean_and_shift_is_equivariant(n: int, shift: float, scale: float, seed: int) -> None:
    d = np.random.default_rng(seed).normal(0, scale, n)
    a, b = paired_difference(d, seed=1), paired_difference(d + shift, seed=1)
    assert a["ci"][0] <= a["mean"] + 1e-9 and a["mean"] <= a["ci"][1] + 1e-9
    assert np.isclose(b["mean"], a["mean"] + shift)
    assert np.allclose(b["ci"], np.array(a["ci"]) + shift)  # same resampled blocks
    assert 0 < a["p_value"] <= 1


def test_sign_flip_p_is_calibrated_under_the_null() -> None:
    """Symmetric, independent differences: P(p ≤ 0.05) ≈ 0.05 (a level-α test)."""
    rng = np.random.default_rng(0)
    ps = np.array([paired_difference(rng.standard_t(3, 30), draws=500, seed=i)["p_value"] for i in range(400)])
    assert np.mean(ps <= 0.05) <= 0.08 and np.mean(ps <= 0.5) > 0.4


@FAST
@given(st.integers(20, 60), st.integers(0, 2**31))
def test_a_real_shift_is_found(n: int, seed: int) -> None:
    d = np.random.default_rng(seed).normal(1.0, 0.5, n)
    r = paired_difference(d)
    assert r["p_value"] < 0.01 and r["ci"][0] > 0


def test_exact_sign_flip_small_n_and_degenerate_inputs() -> None:
    assert paired_difference([1.0, 1.0, 1.0])["p_value"] == 0.25  # 2 of 8 patterns as extreme
    assert paired_difference([0.0, 0.0])["p_value"] == 1.0
    one = paired_difference([0.3])
    assert one["ci"] is None and one["p_value"] is None and one["mean"] == 0.3


def test_compare_rows_pairs_by_step() -> None:
    run = [{"step": s, "loss_cv": 0.1 + s} for s in range(5)]
    ctl = [{"step": s, "loss_cv": 0.05 + s} for s in range(1, 6)] + [{"step": 0, "loss_cv": float("nan")}]
    c = compare_rows(run, ctl, ["loss_cv", "cos_mean"])
    assert list(c) == ["loss_cv"] and c["loss_cv"]["n"] == 4 and np.isclose(c["loss_cv"]["mean"], 0.05)


@FAST
@given(st.integers(3, 8), st.integers(0, 2**31))
def test_trend_monotone_is_the_most_extreme_ordering(k: int, seed: int) -> None:
    v = np.sort(np.random.default_rng(seed).normal(size=k))
    t = trend_test(v)
    assert np.isclose(t["rho"], 1.0)
    assert np.isclose(t["p_increasing"], 1 / np.prod(np.arange(1, k + 1)))
    assert trend_test(v[::-1])["p_increasing"] == 1.0


def test_trend_null_calibration_and_large_k() -> None:
    rng = np.random.default_rng(1)
    ps = np.array([trend_test(rng.normal(size=5))["p_increasing"] for _ in range(300)])
    assert np.mean(ps <= 0.05) <= 0.09
    t = trend_test(np.arange(12.0) + rng.normal(0, 0.1, 12), draws=2000)
    assert t["p_increasing"] < 0.01 and trend_test([1.0, 2.0])["p_increasing"] is None
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_control_keeps_seeds_and_the_replicated_baseline() -> None:
    s = load_scenario(ROOT / "scenarios" / "seed_desync_1.toml")
    c = control_of(s)
    assert [p.kind for p in c.perturbations] == ["replicate_batch"]
    assert c.seed == s.seed and c.world_size == s.world_size and c.expect == {}
    assert control_of(load_scenario(ROOT / "scenarios" / "label_noise.toml")).perturbations == ()


def test_compare_levels_on_fake_records(tmp_path: Path) -> None:
    import json
    for i in range(4):
        d = tmp_path / f"level-{i}"
        d.mkdir()
        rows = [{"step": s, "loss_cv": 0.01 * i + 0.001 * ((s * 7) % 5)} for s in range(10)]
        (d / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = compare_levels(tmp_path, [f"level-{i}" for i in range(4)], ["0", "1", "2", "3"], ["loss_cv"])
    assert set(r["per_level"]) == {"1", "2", "3"}
    assert np.isclose(r["per_level"]["3"]["loss_cv"]["mean"], 0.03)
    assert np.isclose(r["trend"]["loss_cv"]["rho"], 1.0) and np.isclose(r["trend"]["loss_cv"]["p_increasing"], 1 / 24)


def test_trend_is_tested_in_the_metrics_expected_direction() -> None:
    """A falling cos_mean over 5 levels is the expected direction (ranks agree less): p = 1/120,
    not "ρ = −1, p(rises) = 1"; a rising loss_cv likewise; a metric with no expected direction is
    tested two-sided; an explicit direction wins."""
    falling = [0.9, 0.8, 0.7, 0.6, 0.5]
    t = trend_test(falling, metric="cos_mean")
    assert (t["direction"], t["rho"], t["p_increasing"]) == ("decreasing", -1.0, 1.0)
    assert np.isclose(t["p"], 1 / 120) and np.isclose(t["p_decreasing"], 1 / 120)
    assert "p(falls) = 0.00833" in trend_line("cos_mean", t)
    assert np.isclose(trend_test(falling[::-1], metric="loss_cv")["p"], 1 / 120)
    assert trend_test(falling[::-1], metric="cos_mean")["p"] == 1.0  # a rising cosine is not the effect
    other = trend_test(falling, metric="noise_scale")
    assert other["direction"] == "two-sided" and np.isclose(other["p"], 2 / 120)
    assert np.isclose(trend_test(falling, metric="loss_cv", direction="decreasing")["p"], 1 / 120)
    with pytest.raises(ValueError, match="direction"):
        trend_test(falling, direction="up")
