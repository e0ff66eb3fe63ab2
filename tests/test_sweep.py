"""``[sweep]`` validation, level construction, resume logic (with a fake launcher: no processes)
and one real end-to-end ladder on 2 ranks, interrupted and resumed."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from testbed.engine import runner
from testbed.engine import sweep as sweep_run
from testbed.scenario import sweep
from testbed.cli import main
from testbed.record.files import write_json_atomic
from testbed.scenario.spec import ScenarioError, load_scenario, parse_scenario
from testbed.engine.worker import make_plan
from tests.helpers import tiny

ROOT = Path(__file__).resolve().parents[1]
LADDERS = ("shuffle_ladder", "seed_ladder", "combined_ladder")


def ladder(**sweep_table: Any) -> dict[str, Any]:
    """A tiny 2-rank ladder: replicated batches, seed desync swept over the ranks, LM with dropout."""
    raw = tiny(model={"kind": "transformer", "d_model": 16, "layers": 1, "heads": 2, "dropout": 0.2},
               data={"kind": "alpaca_synthetic", "batch_size": 2, "size": 64},
               optim={"kind": "adamw", "lr": 0.003},
               steps=3,
               perturbations=[{"kind": "replicate_batch", "ranks": "all"}, {"kind": "seed_desync", "ranks": []}])
    raw["sweep"] = {"parameter": "perturbations.1.ranks", "values": [[], [1], [0, 1]], **sweep_table}
    return raw


def write_toml(path: Path, raw: dict[str, Any]) -> Path:
    """Just enough TOML for ``ladder()`` documents (tables, arrays of tables, scalars, lists)."""
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    top = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, (dict, list))]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in raw.items() if isinstance(v, dict)]
    arrays = ["\n[[perturbations]]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in p.items())
              for p in raw.get("perturbations", [])]
    path.write_text("\n".join(top + tables + arrays) + "\n", encoding="utf-8")
    assert tomllib.loads(path.read_text()) == raw
    return path


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LADDERS)
def test_shipped_ladders_have_five_valid_levels(name: str) -> None:
    base, levels = sweep_run.load_levels(ROOT / "scenarios" / f"{name}.toml")
    assert [lv.label for lv in levels] == ["0of4", "1of4", "2of4", "3of4", "4of4"]
    assert [lv.run_dir for lv in levels][:2] == ["level-00-0of4", "level-01-1of4"]
    params = sweep.sweep_parameters(base.sweep)
    for lv in levels:
        assert lv.scenario.sweep == {} and lv.scenario.name == f"{name}-{lv.label}"
        swept = [p for p in lv.scenario.perturbations if p.kind != "replicate_batch"]
        assert len(swept) == len(params) and all(p.ranks == tuple(lv.value) for p in swept)


def test_level_zero_perturbs_nobody() -> None:
    (level0, *_) = sweep.build_levels(ladder(), "<memory>", parse_scenario)
    for rank in range(2):
        plan = make_plan(level0.scenario, rank, 1)
        synced = make_plan(parse_scenario(tiny()), 0, 1)
        assert plan.rng_seed == synced.rng_seed and plan.data_rank == 0


@pytest.mark.parametrize("change, field, expected", [
    ({"parameter": 3}, "sweep.parameter", "dotted key"),
    ({"parameter": "perturbations.5.ranks"}, "sweep.parameter", "list indices"),
    ({"values": []}, "sweep.values", "non-empty list"),
    ({"values": [[], [7]]}, "sweep.values[1]", "perturbations[1].ranks"),
    ({"labels": ["a"]}, "sweep.labels", "3 strings"),
    ({"labels": ["a", "a", "b"]}, "sweep.labels", "distinct"),
    ({"labels": ["a", "b", "x\x1b[2J"]}, "sweep.labels", "control characters"),
    ({"step": 1}, "sweep.step", "no such field"),
])
def test_bad_sweep_tables_name_the_field(change: dict[str, Any], field: str, expected: str) -> None:
    raw = ladder()
    raw["sweep"].update(change)
    with pytest.raises(ScenarioError) as e:
        parse_scenario(raw, source="ladder.toml")
    assert e.value.field == field and expected in str(e.value) and "ladder.toml" in str(e.value)


def test_sweep_errors_name_the_file(tmp_path: Path) -> None:
    raw = ladder()
    raw["sweep"]["values"] = [[], ["one"]]
    path = write_toml(tmp_path / "bad.toml", raw)
    with pytest.raises(ScenarioError, match=r"bad\.toml: field 'sweep\.values\[1\]'"):
        load_scenario(path)
    plain = write_toml(tmp_path / "plain.toml", {k: v for k, v in ladder().items() if k != "sweep"})
    with pytest.raises(ScenarioError, match="a \\[sweep\\] table"):
        sweep_run.load_levels(plain)


def test_default_labels_and_level_selection() -> None:
    assert [sweep.default_label(v) for v in ([], [2, 3], 0.5, "x")] == ["none", "2-3", "0.5", "x"]
    levels = sweep.build_levels(ladder(), "<memory>", parse_scenario)
    assert [lv.label for lv in levels] == ["none", "1", "0-1"]
    assert [lv.index for lv in sweep.select_levels(levels, ["2", "none"], "f")] == [0, 2]
    assert [lv.index for lv in sweep.select_levels(levels, ["0,1"], "f")] == [0, 1]
    with pytest.raises(ScenarioError, match="--levels"):
        sweep.select_levels(levels, ["9"], "f")


# ---- resume logic with a fake launcher (no processes) ----------------------------------------

class FakeLauncher:
    """Writes a real run record like ``runner.launch``; fails or interrupts on chosen levels."""

    def __init__(self, fail: set[str] = frozenset(), interrupt: set[str] = frozenset()):
        self.fail, self.interrupt, self.launched = fail, interrupt, []

    def __call__(self, scenario: Any, out_dir: Path) -> runner.RunResult:
        label = scenario.name.rsplit("-", 1)[1]
        self.launched.append(label)
        out_dir.mkdir(parents=True, exist_ok=True)
        run = runner.start_record(scenario, out_dir, "gloo", "fake")
        if label in self.interrupt:
            raise KeyboardInterrupt
        result = runner.RunResult("failed" if label in self.fail else "ok", reason="fake failure")
        runner.finish_record(out_dir, run, result)
        return result


def sweep_statuses(out: Path) -> list[str]:
    return [lv["status"] for lv in json.loads((out / "sweep.json").read_text())["levels"]]


def test_resume_after_interrupt_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = write_toml(tmp_path / "ladder.toml", ladder(labels=["a", "b", "c"]))
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--out", str(out)]

    fake = FakeLauncher(interrupt={"b"})
    monkeypatch.setattr(runner, "launch", fake)
    assert main(argv) == 130
    assert fake.launched == ["a", "b"] and sweep_statuses(out) == ["ok", "pending", "pending"]

    fake = FakeLauncher(fail={"c"})
    monkeypatch.setattr(runner, "launch", fake)
    assert main(argv) == 1
    assert fake.launched == ["b", "c"] and sweep_statuses(out) == ["ok", "ok", "failed"]
    assert "completed in an earlier run, skipped" in capsys.readouterr().err

    fake = FakeLauncher()
    monkeypatch.setattr(runner, "launch", fake)
    assert main(argv) == 0
    assert fake.launched == ["c"] and sweep_statuses(out) == ["ok", "ok", "ok"]

    record = json.loads((out / "sweep.json").read_text())
    assert record["scenario"] == "tiny" and record["parameter"] == "perturbations.1.ranks"
    assert record["source"] == str(path)
    assert [(lv["index"], lv["label"], lv["value"], lv["run_dir"]) for lv in record["levels"]] == [
        (0, "a", [], "level-00-a"), (1, "b", [1], "level-01-b"), (2, "c", [0, 1], "level-02-c")]

    fake = FakeLauncher()  # a new description cannot change the numbers; new steps can
    monkeypatch.setattr(runner, "launch", fake)
    assert main(argv + ["--set", "description=reworded"]) == 0 and fake.launched == []
    assert main(argv + ["--steps", "2"]) == 0 and fake.launched == ["a", "b", "c"]
    assert main(argv + ["--levels", "1"]) == 0 and fake.launched == ["a", "b", "c", "b"]


# ---- the real thing --------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_real_ladder_runs_and_resumes(tmp_path: Path, capsys) -> None:
    path = write_toml(tmp_path / "ladder.toml", ladder())
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "loss_cv" in table and "cos_mean" in table and "3/3 level(s) ok" in table
    rows = {lv["label"]: [json.loads(x) for x in (out / lv["run_dir"] / "metrics.jsonl").read_text().splitlines()]
            for lv in json.loads((out / "sweep.json").read_text())["levels"]}
    assert all(len(r) == 3 for r in rows.values())
    assert all(r["loss_cv"] == 0.0 and r["cos_mean"] == pytest.approx(1.0, abs=1e-6) for r in rows["none"])
    assert all(r["loss_cv"] > 0.0 for r in rows["0-1"])  # dropout masks differ: the ranks disagree
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("level-*/run.json")}

    run_json = out / "level-01-1" / "run.json"  # as if level 1 had been cut off mid-run
    record = json.loads(run_json.read_text())
    write_json_atomic(run_json, dict(record, status="running"))
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 2 and "level 1/1 '1'" in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("level-*/run.json")} == {
        p: (t if p != run_json else run_json.stat().st_mtime_ns) for p, t in stamps.items()}
    assert run_json.stat().st_mtime_ns != stamps[run_json]
    assert sweep_statuses(out) == ["ok", "ok", "ok"]
