"""``testbed sweep SCENARIO``: run one scenario at every level of a swept parameter (a ladder).

A ``[sweep]`` table names a dotted field (or several, all set to the same value) and its values::

    [sweep]
    parameter = "perturbations.0.ranks"          # or ["perturbations.0.ranks", "perturbations.1.ranks"]
    values = [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    labels = ["0of4", "1of4", "2of4", "3of4", "4of4"]   # optional

Every level is validated like a scenario file of its own when the file is read, so a bad level
fails before anything runs. Output: ``OUT/sweep.json`` (replaced atomically after each level)
and one ordinary run record per level in ``OUT/level-NN-<label>/``. Rerunning with the same
``--out`` resumes: a level whose run.json says ``ok`` for the same scenario is skipped.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TextIO

from testbed.record import RUN_FILE, default_run_dir, dumps, read_json, read_metrics, write_json_atomic
from testbed.spec import Scenario, ScenarioError, load_scenario, parse_scenario, set_dotted
from testbed.summary import summarize

SWEEP_FILE = "sweep.json"
_SWEEP_KEYS = {"parameter", "values", "labels"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Level:
    """One rung of the ladder: the value set on the swept field(s) and the scenario it makes."""

    index: int
    label: str
    value: Any
    scenario: Scenario

    @property
    def run_dir(self) -> str:
        return f"level-{self.index:02d}-{_slug(self.label)}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


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


def build_levels(raw: Mapping[str, Any], source: str = "<memory>") -> list[Level]:
    """Validate ``raw['sweep']`` and return one validated scenario per level.

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
    slugs = [_slug(x) for x in labels]
    if not all(slugs) or len(set(slugs)) != len(slugs):
        raise ScenarioError(source, "sweep.labels",
                            "distinct labels with at least one letter or digit each (they name directories)", labels)
    base = {k: v for k, v in raw.items() if k != "sweep"}
    levels = []
    for i, (value, label) in enumerate(zip(values, labels)):
        level_raw = copy.deepcopy(base)
        level_raw["name"] = f"{raw.get('name', 'sweep')}-{_slug(label)}"
        for param in params:
            try:
                set_dotted(level_raw, param, copy.deepcopy(value))
            except (IndexError, ValueError, TypeError, AttributeError):
                raise ScenarioError(source, "sweep.parameter",
                                    "a dotted key whose list indices exist in this scenario", param) from None
        try:
            scenario = parse_scenario(level_raw, source)
        except ScenarioError as e:
            raise ScenarioError(source, f"sweep.values[{i}]",
                                f"a value that makes a valid scenario (then '{e.field}' is wrong: "
                                f"expected {e.expected})", value) from None
        levels.append(Level(i, label, value, scenario))
    return levels


def validate_sweep(sweep: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> None:
    """Called by ``spec.parse_scenario`` when a scenario has a ``[sweep]`` table."""
    build_levels({**raw, "sweep": sweep}, source)


def load_levels(path: Path, overrides: Mapping[str, Any] | None = None) -> tuple[Scenario, list[Level]]:
    """Read a sweep scenario file (with command-line overrides) into its base scenario and levels."""
    base = load_scenario(path, overrides)  # validates the file, the sweep and every level
    if not base.sweep:
        raise ScenarioError(path, "sweep", "a [sweep] table (parameter, values) to run with 'testbed sweep'")
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return base, build_levels(raw, str(path))


# --- running -------------------------------------------------------------------------------------


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
    from testbed.runner import launch

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
    params = sweep_parameters(base.sweep, base.source)
    selected = select_levels(levels, only, str(path))
    out_dir = Path(out_dir) if out_dir else default_run_dir(f"{base.name}-sweep")
    out_dir.mkdir(parents=True, exist_ok=True)
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


def select_levels(levels: list[Level], only: list[str] | None, source: str) -> list[Level]:
    """``--levels 0 2`` / ``--levels 0,2`` / by label; None selects every level."""
    if not only:
        return levels
    wanted = [w for item in only for w in item.split(",") if w]
    chosen = []
    for w in wanted:
        match = [lv for lv in levels if lv.label == w or (w.isdigit() and lv.index == int(w))]
        if not match:
            raise ScenarioError(source, "<--levels>", "level indices 0.." f"{len(levels) - 1} or labels "
                                + ", ".join(repr(lv.label) for lv in levels), w)
        chosen += [lv for lv in match if lv not in chosen]
    return sorted(chosen, key=lambda lv: lv.index)


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


def cmd_sweep(args: argparse.Namespace) -> int:
    from testbed.cli import _overrides

    started = time.monotonic()
    out_dir, levels, status = run_sweep(args.scenario, Path(args.out) if args.out else None,
                                        _overrides(args), args.levels)
    selected = select_levels(levels, args.levels, str(args.scenario))
    print(results_table(out_dir, levels, status))
    ok = all(status[lv.index] == "ok" for lv in selected)
    print(f"{'ok' if ok else 'FAILED'}: {sum(status[lv.index] == 'ok' for lv in selected)}/{len(selected)} "
          f"level(s) ok in {time.monotonic() - started:.1f} s; record: {out_dir}/{SWEEP_FILE}")
    return EXIT_OK if ok else EXIT_FAILED


def add_subcommand(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="run a scenario at every level of its [sweep] (a desync ladder)")
    p.add_argument("scenario", type=Path, help="scenario file with a [sweep] table")
    p.add_argument("--out", help="sweep directory (default: runs/<name>-sweep-<timestamp>); reuse it to resume")
    p.add_argument("--levels", nargs="+", metavar="LEVEL", help="run only these levels (indices or labels)")
    p.add_argument("--steps", type=int)
    p.add_argument("--world-size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of every level")
    p.set_defaults(func=cmd_sweep)
