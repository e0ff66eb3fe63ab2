"""The gate: run scenarios, check their ``[expect]`` tables and a committed baseline, and
exit 0 (pass), 1 (a regression) or 2 (a usage or scenario error) — the CI step that fails a build
when a change to a training stack introduces silent inconsistency.

Every scenario runs for real into ``--out``; a scenario with a ``[sweep]`` runs all its levels.
Scenarios named by ``metrics_equal_to`` are run too (once, shared) so invariance can be checked.
Reports: a table on stdout, optional JUnit XML (one testcase per scenario) and markdown.

``--out`` is the gate's own record (``gate.json``, under the run-directory lock): each scenario
writes into ``OUT/<segment of its name>`` (``record/names.py``: collision-free, never ``..``),
replacing only that scenario's earlier record there; a directory holding anything else is refused
before any scenario runs. A signal or Ctrl-C stops the scenarios in flight (each finalizes its
run.json) and ``gate.json`` says ``stopped``.
"""
from __future__ import annotations

import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from testbed.engine.signals import LauncherStopped, StopOnSignals, request_stop
from testbed.gate import baseline as baselines
from testbed.gate.checks import Finding, RunData, evaluate, series, statistic, suspect_rank
from testbed.scenario.expect import Expectations, expectations_of
from testbed.gate.outcome import Failure, Outcome
from testbed.gate.expect_sweep import evaluate_sweep, load_sweep
from testbed.scenario import catalog
from testbed.record.files import RunDirError, read_run, read_sweep, write_json_atomic
from testbed.record.names import segment
from testbed.record.rundir import REFERENCES_DIR, DirLock, claim_run_dir, record_kind, record_subdir, refuse_links
from testbed.scenario.spec import Scenario, load_scenario
from testbed.schema.records import GATE_FILE

DEFAULT_SCENARIO_DIR = Path("scenarios")


def slug(name: str) -> str:
    """A scenario's directory name in the gate's --out (``record.names.segment``)."""
    return segment(name)


def scenario_paths(items: Sequence[str | Path]) -> list[Path]:
    """Files as given (or catalog names, ``testbed.scenario.catalog``); directories expand to their
    ``*.toml`` files (sorted)."""
    out: list[Path] = []
    for item in items or [DEFAULT_SCENARIO_DIR]:
        p = Path(item)
        found = sorted(f for f in p.rglob("*.toml") if f.is_file()) if p.is_dir() else [catalog.resolve(p)]
        out += [f for f in found if f.resolve() not in {o.resolve() for o in out}]
    return out


def execute(scenario: Scenario, out_dir: Path) -> RunData | Path:
    """Run one scenario (a plain run → its RunData; a sweep → its sweep directory)."""
    if scenario.sweep:
        from testbed.engine.sweep import run_sweep

        # a gate checks this code: never resume an older sweep, replace it (its own record only)
        sweep_dir, _, _ = run_sweep(Path(scenario.source), out_dir, stream=sys.stderr, overwrite=True)
        return sweep_dir
    from testbed.engine.runner import launch

    launch(scenario, out_dir, overwrite=True)  # the gate's --out is its scratch space (sweeps are removed too)
    return RunData.load(out_dir)


def check(scenario: Scenario, result: RunData | Path, reference: RunData | None = None) -> list[Finding]:
    """The scenario's expectations against its run (or every level of its sweep)."""
    exp = expectations_of(scenario)
    if isinstance(result, Path):
        return evaluate_sweep(exp, result)
    if scenario.sweep:  # the sweep could not even start: report that, not a missing [sweep]
        exp = replace(exp, dispersion_increases=())
    return evaluate(exp, result, reference, str(exp.metrics_equal_to) if exp.metrics_equal_to else "")


def values_of(exp: Expectations, result: RunData | Path) -> dict[str, Any]:
    """Baseline values of a run, or of each level of a sweep (keys prefixed ``<label>/``)."""
    if isinstance(result, RunData):
        return baselines.run_values(result, exp.warmup_steps)
    try:
        levels = load_sweep(result)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {f"{label}/{k}": v for label, run, _ in levels if run is not None
            for k, v in baselines.run_values(run, exp.warmup_steps).items()}


def locate(exp: Expectations, result: RunData | Path, key: str) -> tuple[int | None, int | None, str | None]:
    """(step, rank, level) of the worst value behind a baseline key such as ``2of4/loss_cv.peak``."""
    level, _, key = key.rpartition("/")
    run = result if isinstance(result, RunData) else None
    if isinstance(result, Path) and level:
        run = next((r for lab, r, _ in _safe_levels(result) if lab == level), None)
    metric, _, _ = key.partition(".")
    if run is None or metric not in baselines.BOUNDED_METRICS:
        return None, None, level or None
    points = series(run.rows, metric, exp.warmup_steps)
    if not points:
        return None, None, level or None
    _, step = statistic(points, "peak", "max" if baselines.BOUNDED_METRICS[metric] else "min")
    return step, suspect_rank(run), level or None


def _safe_levels(sweep_dir: Path) -> list[tuple[str, RunData | None, str]]:
    try:
        return load_sweep(sweep_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return []


def failures_of(outcome: Outcome, exp: Expectations, result: RunData | Path) -> list[Failure]:
    out = []
    for f in outcome.findings:
        if f.passed:
            continue
        amount = ""
        if isinstance(f.actual, (int, float)) and isinstance(f.limit, (int, float)) \
                and not isinstance(f.actual, bool) and f.check.startswith(("max_", "min_")):
            amount = f"{f.actual - f.limit:+.3g} past the limit"
        out.append(Failure(f"expect.{f.check}", f.message, amount, f.step, f.rank, f.level))
    for d in outcome.deviations:
        if not d.passed:
            step, rank, level = locate(exp, result, d.key)
            out.append(Failure(f"baseline {d.key}", d.message, d.change if d.key != "<baseline>" else "",
                               step, rank, level))
    return out


def owner_of(directory: Path) -> tuple[str | None, str | None]:
    """(record kind, the scenario it belongs to) of a directory, (None, None) when it holds none."""
    kind = record_kind(directory)
    try:
        if kind == "run":
            return kind, read_run(directory).get("scenario", {}).get("name")
        if kind == "sweep":
            return kind, read_sweep(directory)["scenario"]
    except (OSError, ValueError):
        pass
    return kind, None


def claim_gate_dir(out_root: Path, tasks: Sequence[tuple[Scenario, Path]], overwrite: bool = False) -> DirLock:
    """Lock the gate's ``--out`` (an earlier gate's is re-used; a run or a sweep there is refused
    unless ``overwrite``) and check, before anything runs, that every scenario's directory holds
    nothing or that scenario's own earlier record (RunDirError otherwise)."""
    lock = claim_run_dir(out_root, overwrite, accept=lambda kind, _: kind == "gate")
    try:
        for scenario, run_dir in tasks:
            parent = record_subdir(out_root, REFERENCES_DIR) if run_dir.parent.name == REFERENCES_DIR else out_root
            record_subdir(parent, run_dir.name)  # a link or a file there: refused
            refuse_links(run_dir)  # and a link planted inside it
            kind, owner = owner_of(run_dir)
            if kind is not None and owner != scenario.name:
                raise RunDirError(run_dir, f"holds a {kind} record of {owner!r}, not of scenario {scenario.name!r}; "
                                  "remove it or choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def write_gate_record(out_root: Path, status: str, scenarios: Sequence[Scenario], references: Sequence[Scenario],
                      outcomes: Sequence[Outcome] = (), reason: str = "") -> None:
    """``OUT/gate.json``: what ran where, and how the gate ended (``schema.records.check_gate``)."""
    write_json_atomic(out_root / GATE_FILE, {
        "status": status, "reason": reason, "scenarios": {s.name: slug(s.name) for s in scenarios},
        "references": {r.name: slug(r.name) for r in references},
        "results": {o.name: "pass" if o.passed else "fail" for o in outcomes}, "time": time.time()})


def gate(scenarios: Sequence[Scenario], out_root: Path, baseline: dict[str, Any] | None, jobs: int = 1,
         log: Callable[[str], None] = print, overwrite: bool = False) -> list[Outcome]:
    """Run every scenario (and every ``metrics_equal_to`` reference once), then judge them.

    Raises RunDirError before anything runs if ``out_root`` cannot be the gate's; a stop signal or
    Ctrl-C stops every scenario in flight (KeyboardInterrupt / LauncherStopped, after
    ``gate.json`` says ``stopped``)."""
    by_path = {Path(s.source).resolve(): s for s in scenarios}
    refs: dict[Path, Scenario] = {}
    for s in scenarios:
        ref = expectations_of(s).metrics_equal_to
        if ref is not None and ref not in by_path and ref not in refs:
            refs[ref] = load_scenario(ref)
    tasks = [(s, out_root / slug(s.name)) for s in scenarios]
    tasks += [(r, out_root / REFERENCES_DIR / slug(r.name)) for r in refs.values()]
    with claim_gate_dir(out_root, tasks, overwrite), StopOnSignals() as stop:
        write_gate_record(out_root, "running", scenarios, list(refs.values()))
        try:
            outcomes = _judge(scenarios, tasks, _run_all(tasks, jobs, log, stop), baseline)
        except KeyboardInterrupt as e:
            name = e.signame if isinstance(e, LauncherStopped) else "SIGINT"
            write_gate_record(out_root, "stopped", scenarios, list(refs.values()), reason=f"stopped by {name}")
            raise
        except Exception as e:  # a bug or a full disk while judging: the record says so, then it propagates
            write_gate_record(out_root, "stopped", scenarios, list(refs.values()),
                              reason=f"{type(e).__name__}: {e}")
            raise
        write_gate_record(out_root, "passed" if all(o.passed for o in outcomes) else "failed", scenarios,
                          list(refs.values()), outcomes)
    return outcomes


def _run_all(tasks: list[tuple[Scenario, Path]], jobs: int, log: Callable[[str], None],
             stop: StopOnSignals) -> list[tuple[RunData | Path, float]]:
    """Run the tasks on ``jobs`` threads. On a stop (a signal raises in this, the main thread;
    Ctrl-C too) every launcher in flight is asked to stop (``request_stop``): each kills its ranks
    and finalizes its run.json within a poll, queued tasks never start."""
    counter = iter(range(1, len(tasks) + 1))

    def run_one(task: tuple[Scenario, Path]) -> tuple[RunData | Path, float]:
        s, d = task
        t0 = time.monotonic()
        try:
            result = execute(s, d)
        except Exception as e:  # noqa: BLE001 — a gate reports, it does not crash
            result = RunData([], ok=False, reason=f"the gate could not run it: {type(e).__name__}: {e}")
        status = "ok" if isinstance(result, Path) or result.ok else f"FAILED ({result.reason})"
        log(f"[{next(counter)}/{len(tasks)}] {s.name}: {status} in {time.monotonic() - t0:.1f} s")
        return result, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures: list[Future[tuple[RunData | Path, float]]] = [pool.submit(run_one, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt as e:
            request_stop(e.signum if isinstance(e, LauncherStopped) else signal.SIGINT)
            stop.hold()  # a second signal must not cut the launchers' cleanup short
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)
            raise


def _judge(scenarios: Sequence[Scenario], tasks: list[tuple[Scenario, Path]],
           results: list[tuple[RunData | Path, float]], baseline: dict[str, Any] | None) -> list[Outcome]:
    ref_runs = {Path(s.source).resolve(): r for (s, _), (r, _) in zip(tasks, results) if isinstance(r, RunData)}
    outcomes = []
    for (s, run_dir), (result, wall) in zip(tasks[: len(scenarios)], results):
        exp = expectations_of(s)
        reference = ref_runs.get(exp.metrics_equal_to) if exp.metrics_equal_to else None
        outcome = Outcome(s, run_dir, wall, check(s, result, reference), values=values_of(exp, result))
        if baseline is not None:
            outcome.deviations = baselines.compare(baseline, s.name, outcome.values)
        outcome.failures = failures_of(outcome, exp, result)
        outcomes.append(outcome)
    return outcomes
