"""Paired runs: a scenario next to its control, and a sweep's levels against level 0.

Why: a dispersion number alone has no reference (is loss CV 0.03 healthy?). The control is the
same scenario with its perturbations removed and the same seeds, so unperturbed ranks read the
same data at every step and the per-step difference isolates the perturbation
(``testbed.diagnose.paired``). ``replicate_batch`` is kept: it is the experiment's baseline
(every rank reads rank 0's batch, so the control is exactly zero dispersion), not a fault.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from testbed.diagnose.paired import DISPERSION, compare_rows, format_comparison, series, trend_line, trend_test
from testbed.record.files import RUN_FILE, read_json, read_metrics, write_json_atomic
from testbed.record.rundir import CONTROL_DIR, record_subdir
from testbed.scenario.spec import Scenario

#: perturbation kinds a control keeps (baselines of the experiment, not faults)
BASELINE_KINDS = ("replicate_batch",)


def control_of(scenario: Scenario) -> Scenario:
    """The same scenario, same seeds, with every perturbation but the baselines removed."""
    return dataclasses.replace(
        scenario, name=f"{scenario.name}-control", expect={}, sweep={},
        perturbations=tuple(p for p in scenario.perturbations if p.kind in BASELINE_KINDS))


def run_control(scenario: Scenario, out_dir: Path) -> dict[str, Any]:
    """Run the control into ``out_dir/control``, compare, add ``"control"`` to run.json; returns it.

    ``control/`` is part of the main run's record: replaced with it (``--overwrite`` removes it
    with the rest), so an old control never blocks or mixes into a new one. A link there is refused."""
    from testbed.engine.runner import launch

    control_dir = record_subdir(Path(out_dir), CONTROL_DIR)
    result = launch(control_of(scenario), control_dir, overwrite=True)
    record: dict[str, Any] = {"run_dir": CONTROL_DIR, "status": result.status, "reason": result.reason,
                              "wall_time_s": result.wall_time_s,
                              "paired": compare_rows(read_metrics(Path(out_dir)), read_metrics(control_dir))}
    path = Path(out_dir) / RUN_FILE
    run = read_json(path)
    run["control"] = record
    write_json_atomic(path, run)
    return record


def compare_levels(out_dir: Path, run_dirs: Sequence[str], labels: Sequence[str],
                   metrics: Sequence[str] = DISPERSION) -> dict[str, Any]:
    """Every level paired against level 0, and the trend of each metric's mean over the levels.

    Levels without a record are left out of the trend (its ``levels`` says how many took part).
    """
    rows = [read_metrics(Path(out_dir) / d) if (Path(out_dir) / d).exists() else [] for d in run_dirs]
    base = rows[0] if rows else []
    per_level = {label: compare_rows(r, base, metrics) for label, r in zip(labels[1:], rows[1:]) if r and base}
    trend = {}
    for metric in metrics:
        means = [sum(s.values()) / len(s) for r in rows if r and (s := series(r, metric))]
        if len(means) >= 2:
            trend[metric] = trend_test(means, metric=metric) | {"means": means}
    return {"against": labels[0] if labels else None, "per_level": per_level, "trend": trend}


def sweep_comparison(out_dir: Path, levels: Sequence[Any]) -> str:
    """Compare a finished sweep's levels (written to ``sweep.json["comparison"]``); the printable text."""
    from testbed.scenario.sweep import SWEEP_FILE

    result = compare_levels(out_dir, [lv.run_dir for lv in levels], [lv.label for lv in levels])
    path = Path(out_dir) / SWEEP_FILE
    if path.exists():
        record = read_json(path)
        record["comparison"] = result
        write_json_atomic(path, record)
    return format_sweep(result)


def format_sweep(result: dict[str, Any]) -> str:
    """Per level: paired differences against level 0; then the trend test per metric."""
    parts = [format_comparison(c, f"level {label} vs {result['against']}") for label, c in result["per_level"].items()]
    lines = ["trend over levels (Spearman ρ of the level index with the level's mean, permutation p):"]
    for metric, t in result["trend"].items():
        lines.append(trend_line(metric, t))
    return "\n".join(parts + lines)


def describe_control(record: dict[str, Any]) -> str:
    """The printable comparison of a run with its control."""
    head = f"control ({record['run_dir']}/): {record['status']} in {record['wall_time_s']:.1f} s"
    return head + "\n" + format_comparison(record["paired"])
