"""Running a sweep: every level of a ``[sweep]`` scenario as an ordinary run, resumable.

Output: ``OUT/sweep.json`` (replaced atomically after each level) and one ordinary run record per
level in ``OUT/level-NN-<label>/``. Rerunning with the same ``--out`` resumes: a level whose
run.json says ``ok`` for the same scenario is skipped.

Ownership (``record/rundir.py``): ``OUT`` must be empty, hold a sweep of the same scenario (a
resume) or ``--overwrite`` must be given (a finished run there was silently hidden from
``report`` before). A level directory is replaced only if it holds that level's own record; one
holding anything else is refused before any level runs (a sweep used to ``rmtree`` it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

from testbed.diagnose.text import verdict_cell
from testbed.engine.progress import watch_run
from testbed.engine.preflight import preflight
from testbed.engine.readback import digest_run, summary_of
from testbed.engine.signals import check_stop
from testbed.record.files import (RUN_FILE, RunDirError, default_run_dir, dumps, read_json, read_run,
                                  read_sweep, write_json_atomic)
from testbed.record.rundir import claim_run_dir, record_kind, record_subdir, refuse_links, remove_record
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
    progress (engine/progress.py); returns its status. The level directory holds this level's own
    record or nothing (``check_level_dirs``): a stale or failed attempt's files are removed first,
    so its append-only files cannot mix in."""
    from testbed.engine.runner import launch

    run_dir = record_subdir(out_dir, level.run_dir)
    remove_record(run_dir)
    label = f"level {count}/{of} {level.label!r}"
    stream.write(f"{label}: {level.scenario.world_size} ranks x {level.scenario.steps} steps -> {run_dir}\n")
    try:
        with watch_run(run_dir, level.scenario.steps, stream=stream, every_s=every_s, label=label,
                       enabled=progress):
            result = launch(level.scenario, run_dir)
    except (OSError, RunDirError) as e:  # a full disk before run.json could be written, an unusable dir
        stream.write(f"{label}: failed - {e}\n")
        return "failed"
    stream.write(f"{label}: {result.status} in {result.wall_time_s:.1f} s" + ("" if result.ok else f" - {result.reason}")
                 + f" (levels done: {count}/{of})\n")
    stream.flush()
    return result.status


def check_level_dirs(out_dir: Path, levels: list[Level]) -> None:
    """Before any level runs: every level directory is absent, empty, or holds this level's own
    record (a resume replaces it); anything else is refused (RunDirError), never deleted."""
    for lv in levels:
        run_dir = out_dir / lv.run_dir
        if not run_dir.exists() and not run_dir.is_symlink():
            continue
        run_dir = record_subdir(out_dir, lv.run_dir)  # a link or a file there: refused
        refuse_links(run_dir)  # and a link planted inside it
        kind = record_kind(run_dir)
        if kind is None:
            continue
        try:
            owner = read_run(run_dir).get("scenario", {}).get("name") if kind == "run" else None
        except (OSError, ValueError):
            owner = None
        if owner != lv.scenario.name:
            raise RunDirError(run_dir, f"holds a record that is not level {lv.label!r} of this sweep "
                              f"({kind}{f' of {owner!r}' if owner else ''}); remove it or choose another --out")


def run_sweep(path: Path, out_dir: Path | None, overrides: Mapping[str, Any] | None = None,
              only: list[str] | None = None, stream: TextIO | None = None, every_s: float = 10.0,
              progress: bool = True, overwrite: bool = False) -> tuple[Path, list[Level], dict[int, str]]:
    """Run (or resume) the sweep; returns the output directory, the levels and their statuses.
    ``every_s`` / ``progress``: the live progress of each level (engine/progress.py).
    ``overwrite``: replace whatever record ``out_dir`` holds (else only a sweep of this scenario
    is continued)."""
    stream = stream or sys.stderr
    base, levels = load_levels(path, overrides)
    selected = select_levels(levels, only, str(path))
    for lv in selected:  # what this machine cannot run (device, backend, memory): refused before any level
        for warning in preflight(lv.scenario):
            stream.write(f"testbed: warning: level {lv.label!r}: {warning}\n")
    out_dir = Path(out_dir) if out_dir else default_run_dir(f"{base.name}-sweep")

    def ours(kind: str, directory: Path) -> bool:
        try:
            return kind == "sweep" and read_sweep(directory)["scenario"] == base.name
        except (OSError, ValueError):
            return False

    with claim_run_dir(out_dir, overwrite, accept=ours):  # one sweep at a time in a directory
        check_level_dirs(out_dir, levels)
        return _run_locked(path, out_dir, base, levels, selected, stream, every_s, progress)


def _run_locked(path: Path, out_dir: Path, base: Scenario, levels: list[Level], selected: list[Level],
                stream: TextIO, every_s: float, progress: bool) -> tuple[Path, list[Level], dict[int, str]]:
    params = sweep_parameters(base.sweep, base.source)
    status = {lv.index: "ok" if completed(lv, out_dir) else "pending" for lv in levels}
    write_sweep_json(out_dir, base, params, levels, status)
    todo = [lv for lv in selected if status[lv.index] != "ok"]
    for lv in selected:
        if status[lv.index] == "ok":
            stream.write(f"level {lv.index} {lv.label!r}: completed in an earlier run, skipped\n")
    for count, lv in enumerate(todo, 1):
        check_stop()  # a signal between levels (the launcher checks it within a level)
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
        try:
            summary = summary_of(digest_run(run_dir, lv.scenario.world_size)) if run_dir.is_dir() else {}
        except OSError:
            summary = {}
        try:
            run = read_run(run_dir)
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
