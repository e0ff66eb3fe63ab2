"""The [expect] table: validation errors that name the field, and evaluation on recorded rows
(no processes here: rows and sweep records are written by hand, per the record contracts)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.scenario.expect import expectations_of, parse_expect
from testbed.gate.checks import RunData, evaluate
from testbed.gate.expect_sweep import evaluate_sweep
from testbed.scenario.spec import ScenarioError, parse_scenario
from tests.helpers import tiny


def row(step: int, losses: list[float | None], cos: list[float | None] | None = None,
        norms: list[float] | None = None, sync: bool | None = True, flags: list[dict] | None = None) -> dict:
    """A metrics.jsonl row with the fields evaluation reads."""
    finite = [x for x in losses if x is not None]
    mean = sum(finite) / len(finite) if len(finite) == len(losses) else None
    std = math.sqrt(sum((x - mean) ** 2 for x in finite) / len(finite)) if mean is not None else None
    cos = cos or [1.0] * len(losses)
    norms = norms or [1.0] * len(losses)
    nmean = sum(norms) / len(norms)
    out = {"step": step, "loss": losses, "global_loss": mean, "loss_std": std,
           "loss_cv": None if mean is None else std / abs(mean), "cos_to_mean": cos,
           "cos_mean": None if None in cos else sum(cos) / len(cos),
           "grad_norm": norms, "grad_norm_cv": math.sqrt(sum((n - nmean) ** 2 for n in norms) / len(norms)) / nmean,
           "flags": flags or []}
    if sync is not None:
        out["weights_in_sync"] = sync
        out["weight_checksum"] = [7] * len(losses) if sync else [7] * (len(losses) - 1) + [8]
    return out


def exp(table: dict, **kw) -> object:
    return parse_expect(table, "<t>", steps=kw.pop("steps", 10), **kw)


@pytest.mark.parametrize("table, field, words", [
    ({"max_loss": 0.1}, "expect.max_loss", "no such expectation"),
    ({"maximum_loss_cv": 0.1}, "expect.maximum_loss_cv", "max_<metric>"),
    ({"max_loss_cv": "small"}, "expect.max_loss_cv", "a finite number"),
    ({"max_loss_cv": {"limit": 0.1, "stat": "peak"}}, "expect.max_loss_cv", "statistic"),
    ({"max_loss_cv": {"limit": 0.1, "statistic": "median"}}, "expect.max_loss_cv.statistic", "'mean'"),
    ({"statistic": "worst"}, "expect.statistic", "'peak'"),
    ({"warmup_steps": 10}, "expect.warmup_steps", "0..3 (steps = 4)"),
    ({"weights_in_sync": "yes"}, "expect.weights_in_sync", "a boolean"),
    ({"no_nonfinite": 1}, "expect.no_nonfinite", "a boolean"),
    ({"metrics_equal_to": "nowhere.toml"}, "expect.metrics_equal_to", "an existing scenario file"),
    ({"metrics_equal_to": 3}, "expect.metrics_equal_to", "*.toml"),
    ({"dispersion_increases": ["loss_cv", "speed"]}, "expect.dispersion_increases", "grad_norm_cv"),
    ({"dispersion_slack": -1}, "expect.dispersion_slack", ">= 0"),
    ({"min_pairwise_cos_mean": 0.5}, "expect.min_pairwise_cos_mean", "pairwise_every"),
    ({"failed_rank": 1}, "expect.failed_rank", "run_status = 'failed'"),
    ({"run_status": "crashed"}, "expect.run_status", "'failed'"),
])
def test_bad_expect_names_file_and_field(table: dict, field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(tiny(expect=table), source="scen.toml")
    assert e.value.field == field and e.value.file == "scen.toml" and words in str(e.value), str(e.value)


def test_expect_must_be_a_table() -> None:
    with pytest.raises(ScenarioError, match="field 'expect': expected a table"):
        parse_scenario(tiny(expect=[1, 2]), source="s.toml")


def test_valid_expect_round_trips_through_scenario(tmp_path: Path) -> None:
    ref = tmp_path / "ref.toml"
    ref.write_text("name = 'ref'\n")
    table = {"max_loss_cv": 0.1, "min_cos_mean": {"limit": 0.5, "statistic": "peak"}, "warmup_steps": 2,
             "weights_in_sync": True, "metrics_equal_to": "ref.toml"}
    (tmp_path / "s.toml").write_text("")
    scenario = parse_scenario(tiny(expect=table), source=str(tmp_path / "s.toml"))
    e = expectations_of(scenario)
    assert [(b.name, b.limit, b.statistic) for b in e.bounds] == [("max_loss_cv", 0.1, "mean"),
                                                                   ("min_cos_mean", 0.5, "peak")]
    assert e.warmup_steps == 2 and e.weights_in_sync is True and e.no_nonfinite is True
    assert e.metrics_equal_to == ref.resolve()


def test_bounds_use_mean_after_warmup_peak_and_final() -> None:
    rows = [row(0, [1.0, 3.0]), row(1, [1.0, 1.2]), row(2, [1.0, 1.1], cos=[0.9, 0.2])]
    # loss_cv per step: 0.5, 0.0909, 0.0476; warm-up 1 drops the first
    mean_ok = exp({"max_loss_cv": 0.08, "warmup_steps": 1})
    assert all(f.passed for f in evaluate(mean_ok, RunData(rows)))
    peak = exp({"max_loss_cv": {"limit": 0.08, "statistic": "peak"}, "warmup_steps": 1})
    f = next(f for f in evaluate(peak, RunData(rows)) if f.check == "max_loss_cv")
    assert not f.passed and f.step == 1 and f.rank is None and "0.0909" in f.message and "> 0.08" in f.message  # a tie
    final = exp({"min_cos_mean": {"limit": 0.6, "statistic": "final"}})
    f = next(f for f in evaluate(final, RunData(rows)) if f.check == "min_cos_mean")
    # two ranks: the verdict (the one outlier rule) detects but does not attribute, so no rank is named
    assert not f.passed and f.step == 2 and f.rank is None and math.isclose(f.actual, 0.55)


def test_a_failing_bound_names_the_verdicts_suspect_and_verdict_expectations_are_checked() -> None:
    rows = [row(0, [1.0, 3.0]), row(1, [1.0, 1.2])]
    named = {"status": "inconsistent", "ranks": [1], "groups": None, "since_step": 0, "alpha": 0.01,
             "evidence": [], "steps": 2, "headline": "INCONSISTENT — rank 1"}
    run = RunData(rows, recorded_verdict=named)
    f = next(f for f in evaluate(exp({"max_loss_cv": 0.08}), run) if f.check == "max_loss_cv")
    assert not f.passed and f.rank == 1 and "rank 1" in f.message
    found = {f.check: f for f in evaluate(exp({"verdict": "inconsistent", "suspects": [1]}), run)}
    assert found["verdict"].passed
    found = {f.check: f for f in evaluate(exp({"verdict": "consistent", "suspects": [2]}), run)}
    assert not found["verdict"].passed and "expected verdict 'consistent' and suspects [2]" in found["verdict"].message
    with pytest.raises(ScenarioError, match="expect.verdict"):
        exp({"verdict": "fine"})
    with pytest.raises(ScenarioError, match="expect.suspects"):
        exp({"suspects": [1, 1]})


def test_nonfinite_and_failed_run_are_failures_not_crashes() -> None:
    rows = [row(0, [1.0, 1.0]), row(1, [1.0, None], flags=[{"rank": 1, "kind": "nonfinite_loss"}])]
    run = RunData(rows, events=[{"step": 1, "event": "nonfinite_loss", "rank": 1}], ok=False,
                  reason="non-finite values at step 1", failed_rank=1, failed_step=1)
    findings = {f.check: f for f in evaluate(exp({"max_loss_cv": 0.1, "weights_in_sync": True}), run)}
    assert not findings["run"].passed and findings["run"].rank == 1 and findings["run"].step == 1
    assert not findings["no_nonfinite"].passed and findings["no_nonfinite"].rank == 1
    assert findings["max_loss_cv"].passed  # step 1's null is skipped, not a crash
    assert all(f.passed for f in evaluate(exp({"no_nonfinite": False}), RunData(rows)))


def test_run_status_failed_expectation() -> None:
    failed = RunData([], ok=False, reason="rank 1 failed at step 3", failed_rank=1, failed_step=3)
    e = exp({"run_status": "failed", "failed_rank": 1})
    assert all(f.passed for f in evaluate(e, failed))
    wrong = {f.check: f.passed for f in evaluate(exp({"run_status": "failed", "failed_rank": 0}), failed)}
    assert wrong == {"run_status": True, "failed_rank": False, "no_nonfinite": True}
    assert not evaluate(e, RunData([row(0, [1.0, 1.0])]))[0].passed


def test_weights_in_sync_names_step_and_rank() -> None:
    rows = [row(0, [1.0, 1.0, 1.0]), row(1, [1.0, 1.0, 1.0], sync=False)]
    f = next(f for f in evaluate(exp({"weights_in_sync": True}), RunData(rows)) if f.check == "weights_in_sync")
    assert not f.passed and f.step == 1 and f.rank == 2 and "differ from majority" in f.message
    assert next(f for f in evaluate(exp({"weights_in_sync": False}), RunData(rows))
                if f.check == "weights_in_sync").passed
    none = evaluate(exp({"weights_in_sync": True}), RunData([row(0, [1.0, 1.0], sync=None)]))
    assert "no weight check" in next(f for f in none if f.check == "weights_in_sync").message


def test_metrics_equal_to_names_step_field_and_rank(tmp_path: Path) -> None:
    (tmp_path / "ref.toml").write_text("")
    e = exp({"metrics_equal_to": str(tmp_path / "ref.toml")})
    rows = [row(0, [1.0, 2.0]), row(1, [1.0, 2.0])]
    assert all(f.passed for f in evaluate(e, RunData(rows), RunData(json.loads(json.dumps(rows)))))
    other = [row(0, [1.0, 2.0]), row(1, [1.0, 2.5])]
    f = next(f for f in evaluate(e, RunData(rows), RunData(other)) if f.check == "metrics_equal_to")
    assert not f.passed and f.step == 1 and f.rank == 1 and "field loss[1]: 2.0 vs 2.5" in f.message, f.message
    short = evaluate(e, RunData(rows), RunData(rows[:1]))
    assert "2 rows vs 1" in next(f for f in short if f.check == "metrics_equal_to").message
    assert not next(f for f in evaluate(e, RunData(rows), None) if f.check == "metrics_equal_to").passed


def write_sweep(root: Path, cvs: list[float], statuses: list[str] | None = None) -> Path:
    """A sweep directory in the `testbed sweep` record format, one level per loss-CV value."""
    levels = []
    for i, cv in enumerate(cvs):
        run_dir = root / f"level-{i:02d}"
        run_dir.mkdir(parents=True)
        spread = cv  # two ranks at 1 ± cv: loss_cv = cv
        rows = [row(s, [1.0 - spread, 1.0 + spread], cos=[1 - cv, 1 - cv]) for s in range(3)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "run.json").write_text(json.dumps({"status": "ok"}))
        levels.append({"index": i, "label": f"{i}of2", "value": list(range(i)), "run_dir": run_dir.name,
                       "status": (statuses or ["ok"] * len(cvs))[i]})
    (root / "sweep.json").write_text(json.dumps({"scenario": "ladder", "source": "x.toml",
                                                 "parameter": "perturbations.0.ranks", "levels": levels[::-1]}))
    return root


def test_dispersion_increases_over_sweep_levels(tmp_path: Path) -> None:
    e = exp({"dispersion_increases": ["loss_cv", "cos_mean"], "max_loss_cv": 0.5})
    good = evaluate_sweep(e, write_sweep(tmp_path / "up", [0.0, 0.1, 0.2]))
    assert all(f.passed for f in good), [f.message for f in good if not f.passed]
    bad = {f.check: f for f in evaluate_sweep(e, write_sweep(tmp_path / "dip", [0.0, 0.2, 0.1]))}
    assert not bad["dispersion_increases.loss_cv"].passed and bad["dispersion_increases.loss_cv"].level == "2of2"
    assert "falls from level 1of2 to 2of2" in bad["dispersion_increases.loss_cv"].message
    assert "rises" in bad["dispersion_increases.cos_mean"].message
    slack = exp({"dispersion_increases": "loss_cv", "dispersion_slack": 0.15})
    assert all(f.passed for f in evaluate_sweep(slack, write_sweep(tmp_path / "slack", [0.0, 0.2, 0.1])))
    flat = evaluate_sweep(slack, write_sweep(tmp_path / "flat", [0.1, 0.1]))
    assert "no more dispersed" in next(f for f in flat if not f.passed).message


def test_sweep_level_failures_and_bad_records(tmp_path: Path) -> None:
    e = exp({"dispersion_increases": "loss_cv", "max_loss_cv": 0.15})
    findings = evaluate_sweep(e, write_sweep(tmp_path / "s", [0.0, 0.1, 0.2], ["ok", "failed", "ok"]))
    failed = [f for f in findings if not f.passed]
    assert {f.level for f in failed} == {"1of2", "2of2"}  # level 1's status, level 2's bound
    assert any("level 2of2: loss_cv mean" in f.message for f in failed)
    assert not evaluate_sweep(e, tmp_path / "missing")[0].passed
    assert not evaluate(e, RunData([row(0, [1.0, 1.0])]))[-1].passed  # dispersion_increases without a sweep


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
value = st.one_of(st.none(), finite, st.just(float("nan")), st.just(float("inf")), st.text(max_size=3))
rows_strategy = st.lists(st.fixed_dictionaries({}, optional={
    "step": st.one_of(st.integers(-2, 20), st.none()), "loss_cv": value, "cos_mean": value,
    "loss": st.lists(value, max_size=3), "cos_to_mean": st.lists(value, max_size=3),
    "weights_in_sync": st.one_of(st.booleans(), st.none()), "weight_checksum": st.lists(st.integers(), max_size=3),
    "flags": st.lists(st.fixed_dictionaries({"rank": st.one_of(st.none(), st.integers(0, 3)),
                                             "kind": st.sampled_from(["nonfinite_loss", "zero_grad"])}), max_size=2),
}), max_size=6)


@given(rows=rows_strategy, ok=st.booleans())
def test_evaluate_never_raises_on_odd_rows(rows: list[dict], ok: bool) -> None:
    e = exp({"max_loss_cv": 0.1, "min_cos_mean": {"limit": 0.5, "statistic": "peak"}, "weights_in_sync": True})
    findings = evaluate(e, RunData(rows, ok=ok, reason="" if ok else "boom"))
    assert {f.check for f in findings} >= {"max_loss_cv", "min_cos_mean", "no_nonfinite", "weights_in_sync"}
