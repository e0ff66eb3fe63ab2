"""The pytest plugin: registered by entry point, opt-in, collects scenario files as items that
apply their [expect] tables, and works under pytest-xdist."""
from __future__ import annotations

import copy
from importlib import metadata

import pytest

from tests.scenario_files import EXACT, write_scenario

pytest_plugins = ["pytester"]


def test_registered_through_the_pytest11_entry_point() -> None:
    eps = [ep for ep in metadata.entry_points(group="pytest11") if ep.name == "testbed"]
    assert [ep.value for ep in eps] == ["testbed.integrations.pytest_plugin"]


def make_catalog(pytester: pytest.Pytester) -> None:
    """A passing scenario, one with an injected seed bug, a broken file and a non-scenario TOML."""
    d = pytester.path / "scenarios"
    write_scenario(d, "exact.toml", name="exact", **EXACT)
    seedbug = copy.deepcopy(EXACT)
    seedbug["perturbations"].append({"kind": "seed_desync", "ranks": [1]})
    write_scenario(d, "seedbug.toml", name="seedbug", **seedbug)
    (d / "broken.toml").write_text("name = [unterminated\n")
    (d / "notes.toml").write_text('title = "not a scenario"\n')
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")


def test_opt_in_only(pytester: pytest.Pytester) -> None:
    """Without --testbed a scenarios directory yields no items (so `pytest -n 2` never runs them)."""
    make_catalog(pytester)
    result = pytester.runpytest("scenarios", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result = pytester.runpytest("--testbed", "--collect-only", "-q", "-p", "no:cacheprovider")
    items = [line for line in result.outlines if "::" in line]
    assert sorted(items) == ["scenarios/broken.toml::broken", "scenarios/exact.toml::exact",
                             "scenarios/seedbug.toml::seedbug", "test_plain.py::test_plain"]


@pytest.mark.timeout(300)
def test_scenarios_run_as_items_under_xdist(pytester: pytest.Pytester) -> None:
    make_catalog(pytester)
    result = pytester.runpytest_subprocess("scenarios", "--testbed", "-m", "testbed", "-n", "2",
                                           "-p", "no:cacheprovider", timeout=280)
    result.assert_outcomes(passed=1, failed=2)
    text = result.stdout.str()
    assert "created: 2/2 workers" in text
    assert "scenario seedbug" in text and "expect.max_loss_cv" in text and "expect.min_cos_mean" in text
    assert "broken.toml: field '<file>': expected valid TOML" in text
    assert "FAILED scenarios/seedbug.toml::seedbug" in text and "FAILED scenarios/broken.toml::broken" in text
