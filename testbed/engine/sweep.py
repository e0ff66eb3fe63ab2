"""Running a sweep: every level of a ``[sweep]`` scenario as an ordinary run, resumable.

Output: ``OUT/sweep.json`` (replaced atomically after each level) and one ordinary run record per
level in ``OUT/level-NN-<label>/``. Rerunning with the same ``--out`` resumes: a level whose
run.json says ``ok`` for the same scenario is skipped.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from testbed.diagnose.summary import summarize
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


class Progress:
    """A one-line progress bar on a terminal; plain start/end lines elsewhere (logs, CI)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, tty: bool | None = None):
        stream = stream or sys.stderr
        self.total, self.done, self.stream = max(total_steps, 1), 0, stream
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()

    def line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def draw(self, level: Level, count: int, of: int, step: int) -> None:
        if not self.tty:
            return
        frac = min((self.done + step) / self.total, 1.0)
        elapsed = time.monotonic() - self.started
        eta = f"{elapsed / frac - elapsed:4.0f}s left" if frac > 0.02 else "   ...    "
        bar = "#" * round(30 * frac) + "-" * (30 - round(30 * frac))
        self.stream.write(f"\r[{bar}] {100 * frac:3.0f}%  level {count}/{of} {level.label!r} "
                          f"step {step}/{level.scenario.steps}  {eta}\033[K")
        self.stream.flush()


def _steps_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "timing.jsonl", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_level(level: Level, out_dir: Path, progress: Progress, count: int, of: int) -> str:
    """Launch one level (in this thread, so Ctrl-C reaches the launcher's cleanup); returns its status."""
    from testbed.engine.runner import launch

    run_dir = out_dir / level.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or failed attempt: its append-only files must not mix in
    progress.line(f"level {count}/{of} {level.label!r}: {level.scenario.world_size} ranks x "
                  f"{level.scenario.steps} steps -> {run_dir}")
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            progress.draw(level, count, of, _steps_done(run_dir))

    watcher = threading.Thread(target=watch, name="testbed-sweep-progress", daemon=True)
    watcher.start()
    try:
        result = launch(level.scenario, run_dir)
    finally:
        stop.set()
        watcher.join()
    progress.done += level.scenario.steps
    progress.line(f"level {count}/{of} {level.label!r}: {result.status} in {result.wall_time_s:.1f} s"
                  + ("" if result.ok else f" - {result.reason}"))
    return result.status


def run_sweep(path: Path, out_dir: Path | None, overrides: Mapping[str, Any] | None = None,
              only: list[str] | None = None, stream: TextIO | None = None) -> tuple[Path, list[Level], dict[int, str]]:
    """Run (or resume) the sweep; returns the output directory, the levels and their statuses."""
    stream = stream or sys.stderr
    base, levels = load_levels(path, overrides)
    selected = select_levels(levels, only, str(path))
    for lv in selected:  # a device or backend this machine lacks: refused before any level runs
        check_devices(lv.scenario)
    out_dir = Path(out_dir) if out_dir else default_run_dir(f"{base.name}-sweep")
    with lock_dir(out_dir):  # one sweep at a time in a directory (RunDirError otherwise)
        return _run_locked(path, out_dir, base, levels, selected, stream)


def _run_locked(path: Path, out_dir: Path, base: Scenario, levels: list[Level], selected: list[Level],
                stream: TextIO) -> tuple[Path, list[Level], dict[int, str]]:
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
    progress = Progress(sum(lv.scenario.steps for lv in todo), stream)
    for count, lv in enumerate(todo, 1):
        try:
            status[lv.index] = run_level(lv, out_dir, progress, count, len(todo))
        except KeyboardInterrupt:
            status[lv.index] = "pending"  # not finished: a resume reruns it
            raise
        finally:
            write_sweep_json(out_dir, base, params, levels, status)
    return out_dir, levels, status


def results_table(out_dir: Path, levels: list[Level], status: Mapping[int, str]) -> str:
    """Level → mean loss CV, mean grad-norm CV, mean cosine, weights in sync, wall time."""
    lines = [f"{'level':<6}{'label':<14}{'status':<9}{'loss_cv':>10}{'grad_norm_cv':>14}{'cos_mean':>10}"
             f"{'weights_in_sync':>17}{'wall_s':>8}"]
    for lv in levels:
        run_dir = out_dir / lv.run_dir
        summary = summarize(read_metrics(run_dir)) if run_dir.exists() else {}
        try:
            wall = f"{read_json(run_dir / RUN_FILE).get('wall_time_s') or 0:.1f}"
        except (OSError, ValueError):
            wall = "-"

        def mean(key: str) -> str:
            return f"{summary[key]['mean']:.4g}" if key in summary else "-"

        lines.append(f"{lv.index:<6}{lv.label[:13]:<14}{status[lv.index]:<9}{mean('loss_cv'):>10}"
                     f"{mean('grad_norm_cv'):>14}{mean('cos_mean'):>10}"
                     f"{str(summary.get('weights_in_sync', '-')):>17}{wall:>8}")
    return "\n".join(lines)
