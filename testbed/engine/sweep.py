"""Running a sweep: every level of a ``[sweep]`` scenario as an ordinary run, resumable.

Output: ``OUT/sweep.json`` (replaced atomically after each level) and one ordinary run record per
level in ``OUT/level-NN-<label>/``. Rerunning with the same ``--out`` resumes: a level whose
run.json says ``ok`` for the same scenario is skipped.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

from testbed.diagnose.summary import summarize
from testbed.diagnose.text import verdict_cell
from testbed.engine.progress import watch_run
from testbed.engine.preflight import check_devices
from testbed.record.rundir import lock_dir
from testbed.record.files import RUN_FILE, default_run_dir, dumps, read_json, read_metrics, write_json_atomic
from testbed.scenario.errors import ScenarioError
from testbed.scenario.overrides import set_dotted
from testbed.scenario.spec import Scenario, load_scenario, parse_scenario, read_toml
from testbed.scenario.sweep import SWEEP_FILE, Level, build_levels, select_levels, sweep_parameters


def load_levels(path: Path, overrides: Mapping[str, Any] | None = None) -> tuple[Scenario, list[Level]]:
    """Read a sweep scenario file (with command-line overrides) into its base scenario and levels."""
    base = load_scenario(path, overrides)  # validates the file, the sweep and every level
    if not base.sweep:
        raise ScenarioError(path, "sweep", "a [sweep] table (parameter, values) to run with 'testbed sweep'")
    raw = read_toml(Path(path))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return base, build_levels(raw, str(path), parse_scenario)


_NOT_NUMERIC = ("source", "description", "expect")  # editing these leaves a recorded level valid


def _comparable(scenario: Mapping[str, Any]) -> str:
    return dumps({k: v for k, v in scenario.items() if k not in _NOT_NUMERIC})


def completed(level: Level, out_dir: Path) -> bool:
    """True if the level's run record says ok for this very scenario (so a resume may skip it)."""
    path = out_dir / level.run_dir / RUN_FILE
    try:
        run = read_json(path)
    except (OSError, ValueError):
        return False
    return run.get("status") == "ok" and _comparable(run.get("scenario", {})) == \
        _comparable(json.loads(dumps(level.scenario.to_dict())))


def write_sweep_json(out_dir: Path, base: Scenario, params: list[str], levels: list[Level],
                     status: Mapping[int, str]) -> None:
    write_json_atomic(out_dir / SWEEP_FILE, {
        "scenario": base.name,
        "source": base.source,
        "parameter": "+".join(params),
        "levels": [{"index": lv.index, "label": lv.label, "value": lv.value, "run_dir": lv.run_dir,
                    "status": status[lv.index]} for lv in levels],
    })


def run_level(level: Level, out_dir: Path, count: int, of: int, stream: TextIO, every_s: float = 10.0,
              progress: bool = True) -> str:
    """Launch one level (in this thread, so Ctrl-C reaches the launcher's cleanup) with its live
    progress (engine/progress.py); returns its status."""
    from testbed.engine.runner import launch

    run_dir = out_dir / level.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or failed attempt: its append-only files must not mix in
    label = f"level {count}/{of} {level.label!r}"
    stream.write(f"{label}: {level.scenario.world_size} ranks x {level.scenario.steps} steps -> {run_dir}\n")
    with watch_run(run_dir, level.scenario.steps, stream=stream, every_s=every_s, label=label, enabled=progress):
        result = launch(level.scenario, run_dir)
    stream.write(f"{label}: {result.status} in {result.wall_time_s:.1f} s" + ("" if result.ok else f" - {result.reason}")
                 + f" (levels done: {count}/{of})\n")
    stream.flush()
    return result.status


def run_sweep(path: Path, out_dir: Path | None, overrides: Mapping[str, Any] | None = None,
              only: list[str] | None = None, stream: TextIO | None = None, every_s: float = 10.0,
              progress: bool = True) -> tuple[Path, list[Level], dict[int, str]]:
    """Run (or resume) the sweep; returns the output directory, the levels and their statuses.
    ``every_s`` / ``progress``: the live progress of each level (engine/progress.py)."""
    stream = stream or sys.stderr
    base, levels = load_levels(path, overrides)
    selected = select_levels(levels, only, str(path))
    for lv in selected:  # a device or backend this machine lacks: refused before any level runs
        check_devices(lv.scenario)
    out_dir = Path(out_dir) if out_dir else default_run_dir(f"{base.name}-sweep")
    with lock_dir(out_dir):  # one sweep at a time in a directory (RunDirError otherwise)
        return _run_locked(path, out_dir, base, levels, selected, stream, every_s, progress)


def _run_locked(path: Path, out_dir: Path, base: Scenario, levels: list[Level], selected: list[Level],
                stream: TextIO, every_s: float, progress: bool) -> tuple[Path, list[Level], dict[int, str]]:
    params = sweep_parameters(base.sweep, base.source)
    previous = out_dir / SWEEP_FILE
    if previous.exists() and read_json(previous).get("scenario") != base.name:
        raise ScenarioError(path, "<--out>", f"an empty directory or one holding a sweep of {base.name!r} "
                            f"({out_dir} holds a sweep of {read_json(previous).get('scenario')!r})")
    status = {lv.index: "ok" if completed(lv, out_dir) else "pending" for lv in levels}
    write_sweep_json(out_dir, base, params, levels, status)
    todo = [lv for lv in selected if status[lv.index] != "ok"]
    for lv in selected:
        if status[lv.index] == "ok":
            stream.write(f"level {lv.index} {lv.label!r}: completed in an earlier run, skipped\n")
    for count, lv in enumerate(todo, 1):
        try:
            status[lv.index] = run_level(lv, out_dir, count, len(todo), stream, every_s, progress)
        except KeyboardInterrupt:
            status[lv.index] = "pending"  # not finished: a resume reruns it
            raise
        finally:
            write_sweep_json(out_dir, base, params, levels, status)
    return out_dir, levels, status


def results_table(out_dir: Path, levels: list[Level], status: Mapping[int, str]) -> str:
    """Level → mean loss CV, mean grad-norm CV, mean cosine, weights in sync, wall time."""
    lines = [f"{'level':<6}{'label':<14}{'status':<9}{'loss_cv':>10}{'grad_norm_cv':>14}{'cos_mean':>10}"
             f"{'weights_in_sync':>17}{'wall_s':>8}  verdict"]
    for lv in levels:
        run_dir = out_dir / lv.run_dir
        summary = summarize(read_metrics(run_dir)) if run_dir.exists() else {}
        try:
            run = read_json(run_dir / RUN_FILE)
            wall = f"{run.get('wall_time_s') or 0:.1f}"
        except (OSError, ValueError):
            run, wall = {}, "-"
        verdict = verdict_cell(run["verdict"]) if isinstance(run.get("verdict"), dict) else "-"

        def mean(key: str) -> str:
            return f"{summary[key]['mean']:.4g}" if key in summary else "-"

        lines.append(f"{lv.index:<6}{lv.label[:13]:<14}{status[lv.index]:<9}{mean('loss_cv'):>10}"
                     f"{mean('grad_norm_cv'):>14}{mean('cos_mean'):>10}"
                     f"{str(summary.get('weights_in_sync', '-')):>17}{wall:>8}  {verdict}")
    return "\n".join(lines)
