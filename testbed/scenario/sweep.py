"""Sweep definitions: the ``[sweep]`` table of a scenario and the levels (scenarios) it makes.

A ``[sweep]`` table names a dotted field (or several, all set to the same value) and its values::

    [sweep]
    parameter = "perturbations.0.ranks"          # or ["perturbations.0.ranks", "perturbations.1.ranks"]
    values = [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    labels = ["0of4", "1of4", "2of4", "3of4", "4of4"]   # optional

Every level is validated like a scenario file of its own when the file is read, so a bad level
fails before anything runs. Running a sweep: ``testbed.engine.sweep``.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from testbed.scenario.errors import ScenarioError
from testbed.scenario.overrides import set_dotted
from testbed.schema.records import SWEEP_FILE

__all__ = ["SWEEP_FILE", "Level", "build_levels", "select_levels", "sweep_parameters", "default_label"]
_SWEEP_KEYS = {"parameter", "values", "labels"}


@dataclass(frozen=True)
class Level:
    """One rung of the ladder: the value set on the swept field(s) and the scenario it makes."""

    index: int
    label: str
    value: Any
    scenario: Any  # testbed.scenario.spec.Scenario

    @property
    def run_dir(self) -> str:
        """``level-NN-<label>``: the index keeps it unique whatever the label (``α`` gives ``level-00``)."""
        slug = _slug(self.label)
        return f"level-{self.index:02d}" + (f"-{slug}" if slug else "")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:60]


def default_label(value: Any) -> str:
    """``[]`` → ``none``, ``[2, 3]`` → ``2-3``, anything else → its text."""
    if isinstance(value, list):
        return "-".join(map(str, value)) if value else "none"
    return str(value)


def sweep_parameters(sweep: Mapping[str, Any], source: str = "<memory>") -> list[str]:
    """The swept dotted keys: ``parameter`` as a string or a non-empty list of distinct strings."""
    param = sweep.get("parameter")
    params = [param] if isinstance(param, str) else param
    if not isinstance(params, list) or not params or not all(isinstance(p, str) and p for p in params) \
            or len(set(params)) != len(params):
        raise ScenarioError(source, "sweep.parameter",
                            "a dotted key such as 'perturbations.0.ranks', or a list of distinct keys", param)
    return params


def build_levels(raw: Mapping[str, Any], source: str, parse: Callable[[Mapping[str, Any], str], Any]) -> list[Level]:
    """Validate ``raw['sweep']`` and return one validated scenario per level.

    ``parse`` is ``spec.parse_scenario`` (passed in: the spec validates a sweep, a sweep parses levels).
    Each level is ``raw`` without its ``[sweep]`` table, named ``<name>-<label>``, with every swept
    key set to the level's value. Errors name the level (``sweep.values[i]``) and the field.
    """
    sweep = raw.get("sweep")
    if not isinstance(sweep, Mapping) or not sweep:
        raise ScenarioError(source, "sweep", "a [sweep] table with 'parameter' and 'values'", sweep)
    for key in sweep:
        if key not in _SWEEP_KEYS:
            raise ScenarioError(source, f"sweep.{key}", "no such field; known: " + ", ".join(sorted(_SWEEP_KEYS)))
    params = sweep_parameters(sweep, source)
    values = sweep.get("values")
    if not isinstance(values, list) or not values:
        raise ScenarioError(source, "sweep.values", "a non-empty list of values, one per level", values)
    labels = sweep.get("labels", [default_label(v) for v in values])
    if not isinstance(labels, list) or len(labels) != len(values) or not all(isinstance(x, str) for x in labels):
        raise ScenarioError(source, "sweep.labels", f"a list of {len(values)} strings (one per value)", labels)
    if len(set(labels)) != len(labels) or not all(x.strip() and x.isprintable() for x in labels):
        raise ScenarioError(source, "sweep.labels", "distinct, non-empty labels without control characters", labels)
    base = {k: v for k, v in raw.items() if k != "sweep"}
    levels = []
    for i, (value, label) in enumerate(zip(values, labels)):
        level_raw = copy.deepcopy(base)
        level_raw["name"] = f"{raw.get('name', 'sweep')}-{_slug(label) or i}"
        for param in params:
            try:
                set_dotted(level_raw, param, copy.deepcopy(value))
            except (IndexError, ValueError, TypeError, AttributeError):
                raise ScenarioError(source, "sweep.parameter",
                                    "a dotted key whose list indices exist in this scenario", param) from None
        try:
            scenario = parse(level_raw, source)
        except ScenarioError as e:
            raise ScenarioError(source, f"sweep.values[{i}]",
                                f"a value that makes a valid scenario (then '{e.field}' is wrong: "
                                f"expected {e.expected})", value) from None
        levels.append(Level(i, label, value, scenario))
    return levels


def select_levels(levels: list[Level], only: list[str] | None, source: str) -> list[Level]:
    """``--levels 0 2`` / ``--levels 0,2`` / by label; None selects every level. A word that is a
    label means that level, even if it is also another level's index (labels ``["1", "0"]``:
    ``--levels 1`` is the level labelled "1", not both)."""
    if not only:
        return levels
    wanted = [w for item in only for w in item.split(",") if w]
    chosen = []
    for w in wanted:
        match = [lv for lv in levels if lv.label == w] or \
            [lv for lv in levels if w.isdigit() and lv.index == int(w)]
        if not match:
            raise ScenarioError(source, "<--levels>", "level indices 0.." f"{len(levels) - 1} or labels "
                                + ", ".join(repr(lv.label) for lv in levels), w)
        chosen += [lv for lv in match if lv not in chosen]
    return sorted(chosen, key=lambda lv: lv.index)
