"""`testbed gate`: a clean subset passes and records a baseline, an injected seed bug fails with
the scenario and metric named, reports are valid, usage errors exit 2 (real 2-rank runs)."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testbed.gate import baseline as baselines
from testbed.cli import main
from testbed.gate.checks import RunData
from tests.scenario_files import EXACT, write_scenario


#: attributes and children the strict JUnit schema (xunit2 / Jenkins junit.xsd) allows
JUNIT_ATTRS = {"testsuites": {"name", "tests", "failures", "errors", "time", "disabled"},
               "testsuite": {"name", "tests", "failures", "errors", "skipped", "time", "timestamp", "hostname", "id",
                             "package", "disabled"},
               "testcase": {"name", "classname", "time", "assertions", "status"},
               "failure": {"message", "type"}, "system-out": set()}
JUNIT_CHILDREN = {"testsuites": {"testsuite"}, "testsuite": {"testcase", "properties", "system-out", "system-err"},
                  "testcase": {"failure", "error", "skipped", "system-out", "system-err"}}


def junit_cases(path: Path) -> dict[str, ET.Element]:
    """Parse the JUnit file and check its structure; testcase name → element."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    for element in root.iter():
        assert set(element.attrib) <= JUNIT_ATTRS[element.tag], element.tag
        assert {child.tag for child in element} <= JUNIT_CHILDREN.get(element.tag, set()), element.tag
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == int(root.get("tests"))
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    for c in cases:
        assert c.get("classname") == "testbed.gate" and float(c.get("time")) >= 0
        failure = c.find("failure")
        assert failure is None or (failure.get("message") and failure.text)
    return {c.get("name"): c for c in cases}


def catalog(root: Path, broken: bool = False) -> list[Path]:
    """The exact-zero control and a twin whose metrics must equal it; ``broken`` injects the
    regression a bad seed setup causes (rank 1 seeds its RNG itself; the twin's seed differs)."""
    exact = copy.deepcopy(EXACT)
    if broken:
        exact["perturbations"].append({"kind": "seed_desync", "ranks": [1]})
    twin = {**copy.deepcopy(EXACT), "name": "exact_twin", "timeout_s": 100.0, "seed": 1 if broken else 0,
            "expect": {"metrics_equal_to": "exact.toml"}}
    return [write_scenario(root, "exact.toml", name="exact", **exact), write_scenario(root, "twin.toml", **twin)]


@pytest.mark.timeout(300)
def test_clean_passes_then_injected_seed_bug_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "baseline.json"
    files = [str(p) for p in catalog(tmp_path / "clean")]
    assert main(["gate", *files, "--baseline", str(base), "--update-baseline", "--out", str(tmp_path / "r1")]) == 0
    recorded = json.loads(base.read_text())
    assert set(recorded["scenarios"]) == {"exact", "exact_twin"}
    assert recorded["scenarios"]["exact"]["values"]["loss_cv.mean"] == 0.0
    recorded["tolerances"]["loss_cv"] = {"abs": 1e-4, "rel": 0.0}  # the file's tolerances are what counts
    base.write_text(json.dumps(recorded))
    capsys.readouterr()

    junit, md = tmp_path / "ci" / "gate.xml", tmp_path / "ci" / "gate.md"
    args = ["--baseline", str(base), "--junit", str(junit), "--markdown", str(md)]
    assert main(["gate", *files, *args, "--out", str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "gate: 2 passed, 0 failed" in out and "What failed" not in out
    cases = junit_cases(junit)
    assert set(cases) == {"exact", "exact_twin"} and all(c.find("failure") is None for c in cases.values())
    assert "testbed gate: PASSED" in md.read_text()

    broken = [str(p) for p in catalog(tmp_path / "broken", broken=True)]
    assert main(["gate", *broken, *args, "--out", str(tmp_path / "r3")]) == 1
    out = capsys.readouterr().out
    assert "gate: 0 passed, 2 failed" in out
    failed_lines = out.split("What failed", 1)[1]
    assert "exact " in failed_lines and "expect.max_loss_cv" in failed_lines and "baseline loss_cv.mean" in failed_lines
    assert "expect.metrics_equal_to" in failed_lines and "at step 0, field " in failed_lines  # the twin
    cases = junit_cases(junit)
    assert set(cases) == {"exact", "exact_twin"}
    assert "max_loss_cv" in cases["exact"].find("failure").text
    assert "metrics_equal_to" in cases["exact_twin"].find("failure").get("message")
    text = md.read_text()
    assert "testbed gate: FAILED" in text and "| `exact` | `expect.max_loss_cv` |" in text
    assert json.loads(base.read_text())["scenarios"] == recorded["scenarios"]  # no update without the flag


@pytest.mark.timeout(300)
def test_sweep_scenario_checks_dispersion_across_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A two-level seed-desync ladder on the exact-zero control: dispersion must rise with the level."""
    ladder = copy.deepcopy(EXACT)
    ladder["perturbations"].append({"kind": "seed_desync", "ranks": []})
    ladder["steps"] = 4
    ladder["sweep"] = {"parameter": "perturbations.1.ranks", "values": [[], [1]]}
    ladder["expect"] = {"dispersion_increases": ["loss_cv", "cos_mean"], "weights_in_sync": True}
    path = write_scenario(tmp_path, "ladder.toml", name="ladder", **ladder)
    base = tmp_path / "b.json"
    assert main(["gate", str(path), "--baseline", str(base), "--update-baseline", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "ladder" in out and "gate: 1 passed, 0 failed" in out
    values = json.loads(base.read_text())["scenarios"]["ladder"]["values"]
    assert values["none/loss_cv.mean"] == 0.0 and values["1/loss_cv.mean"] > 0.0
    assert (tmp_path / "r" / "ladder" / "sweep.json").is_file()


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_scenario(tmp_path, "good.toml", name="good")
    bad = write_scenario(tmp_path, "bad.toml", name="bad", expect={"max_loss_cv": "tiny"})
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"format": baselines.FORMAT, "scenarios": {}}))
    assert main(["gate", str(bad), "--baseline", str(base)]) == 2
    assert "bad.toml: field 'expect.max_loss_cv'" in capsys.readouterr().err
    assert main(["gate", str(good), "--baseline", str(tmp_path / "missing.json")]) == 2
    assert "--update-baseline" in capsys.readouterr().err
    base.write_text("{not json")
    assert main(["gate", str(good), "--baseline", str(base)]) == 2
    assert main(["gate", str(tmp_path / "nothing"), "--baseline", str(base)]) == 2
    twin = write_scenario(tmp_path / "sub", "good2.toml", name="good")
    base.write_text(json.dumps({"format": baselines.FORMAT, "scenarios": {}}))
    assert main(["gate", str(good), str(twin), "--baseline", str(base)]) == 2
    assert "unique" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["gate", str(good)])  # --baseline is required
    assert e.value.code == 2


def test_nonfinite_and_failed_runs_are_reported_not_crashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A rank that produced NaN and then died: the gate reports rank and step in all three outputs."""
    import testbed.gate.gate as gate

    nan_row = {"step": 2, "loss": [1.0, None], "loss_cv": None, "cos_mean": None, "weights_in_sync": True,
               "flags": [{"rank": 1, "kind": "nonfinite_loss"}]}
    dead = RunData([{"step": 0, "loss_cv": 0.0, "cos_mean": 1.0}, nan_row], ok=False,
                   reason="rank 1 failed at step 2: non-finite values", failed_rank=1, failed_step=2)
    monkeypatch.setattr(gate, "execute", lambda scenario, out: dead)
    path = write_scenario(tmp_path, "exact.toml", name="exact", **EXACT)
    base = tmp_path / "b.json"
    baselines.save(base, baselines.updated(None, {"exact": ("exact.toml", {"loss_cv.mean": 0.0, "nonfinite": 0})}))
    junit, md = tmp_path / "g.xml", tmp_path / "g.md"
    rc = main(["gate", str(path), "--baseline", str(base), "--junit", str(junit), "--markdown", str(md),
               "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "expect.run" in out and "expect.no_nonfinite" in out and "nonfinite_loss on rank 1 at step 2" in out
    assert "baseline nonfinite" in out and "0 -> 1" in out
    failure = junit_cases(junit)["exact"].find("failure")
    assert "run failed" in failure.get("message") and "rank 1" in failure.text
    assert "**FAIL**" in md.read_text()


def test_baseline_compare_tolerances_and_update_keep_tolerances() -> None:
    data = baselines.updated(None, {"s": ("s.toml", {"loss_cv.mean": 0.10, "cos_mean.mean": 0.8,
                                                     "weights_in_sync": True, "nonfinite": 0})})
    data["scenarios"]["s"]["tolerances"] = {"cos_mean.mean": {"abs": 0.0, "rel": 0.0, "fail_if": "lower"}}
    ok = baselines.compare(data, "s", {"loss_cv.mean": 0.12, "cos_mean.mean": 0.9, "weights_in_sync": True,
                                       "nonfinite": 0})
    assert all(d.passed for d in ok)  # +20% within rel 0.25; a higher cosine may not fail (fail_if lower)
    bad = {d.key: d for d in baselines.compare(data, "s", {"loss_cv.mean": 0.2, "cos_mean.mean": 0.79,
                                                           "weights_in_sync": False})}
    assert not bad["loss_cv.mean"].passed and bad["loss_cv.mean"].change == "+0.1 (+100%)"
    assert not bad["cos_mean.mean"].passed and not bad["weights_in_sync"].passed
    assert not bad["nonfinite"].passed and "missing" in bad["nonfinite"].message
    assert not baselines.compare(data, "other", {})[0].passed
    again = baselines.updated(data, {"t": ("t.toml", {"loss_cv.mean": 0.0})})
    assert again["scenarios"]["s"]["tolerances"] == data["scenarios"]["s"]["tolerances"]
    assert set(again["scenarios"]) == {"s", "t"} and again["tolerances"] == data["tolerances"]
