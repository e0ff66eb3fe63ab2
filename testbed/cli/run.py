"""``testbed run [SCENARIO]``: one scenario as a real multi-process DP job, then its summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_override_arguments, add_progress_arguments,
                                overrides_of)
from testbed.diagnose.summary import format_table
from testbed.engine import launch_plan
from testbed.engine.preflight import preflight
from testbed.engine.readback import digest_run, summary_of, verdict_of
from testbed.engine.signals import LauncherStopped, exit_code
from testbed.record.files import (EVENTS_FILE, RUN_FILE, RunDirError, default_run_dir, iter_jsonl,
                                  iter_metrics, read_json, read_run)
from testbed.record.rundir import claim_run_dir
from testbed.engine.progress import watch_run
from testbed.scenario import catalog
from testbed.scenario.spec import load_scenario

#: the embedded default scenario (``testbed run`` with no argument)
DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "scenario" / "default.toml"


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.engine.runner import launch

    scenario_path = catalog.resolve(args.scenario) if args.scenario else DEFAULT_SCENARIO
    scenario = load_scenario(scenario_path, overrides_of(args))
    if getattr(args, "dry_run", False):
        return launch_plan.print_plan(scenario, scenario_path, args)
    launcher = getattr(args, "launcher", "spawn")
    for warning in preflight(scenario, launcher):  # a device/backend error → ScenarioError → exit 2
        print(f"testbed: warning: {warning}", file=sys.stderr)
    try:  # the run directory is this run's alone from here on (an exclusive lock)
        out_dir = Path(args.out) if args.out else default_run_dir(scenario.name)
        claim = claim_run_dir(out_dir, overwrite=args.overwrite)
    except RunDirError as e:
        print(f"testbed run: {'--out ' if args.out else 'run directory '}{e}", file=sys.stderr)
        return EXIT_USAGE
    if claim.replaces:  # --overwrite: say what went, never delete rows without a word
        print(f"testbed: --overwrite: replaced {claim.replaces} in {out_dir}", file=sys.stderr)
    with claim:
        print(f"testbed: running {scenario.name!r}: {scenario.world_size} ranks × {scenario.steps} steps "
              f"({scenario.model.kind} / {scenario.data.kind}, {scenario.optim.kind}) → {out_dir}", flush=True)
        try:
            with watch_run(out_dir, scenario.steps, every_s=getattr(args, "progress_every", 10.0),
                           enabled=not getattr(args, "no_progress", False)):  # stderr; reads rank 0's files
                if launcher == "torchrun":
                    result = launch_plan.launch_torchrun(scenario, scenario_path, out_dir, args)
                else:
                    result = launch(scenario, out_dir, claim=claim)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the launcher has finalized run.json
            _ended_early(out_dir, f"launcher stopped by {e.signame}" if isinstance(e, LauncherStopped) else "")
            return exit_code(e)
        except Exception as e:  # noqa: BLE001 — a launcher error: one line here, the traceback in run.json
            _ended_early(out_dir, f"launcher failed: {type(e).__name__}: {e}")
            return EXIT_FAILED
    digest = digest_run(out_dir, scenario.world_size)  # streamed: a 10⁶-step record is read in bounded memory
    verdict = _recorded_verdict(out_dir, digest, scenario.world_size)
    print(f"verdict: {verdict['headline']}")
    print(format_table(summary_of(digest)))
    if result.ok:
        bad = _nonfinite_events(out_dir / EVENTS_FILE)
        if bad:  # on_nonfinite = "continue": the run is complete, but must not look clean
            first = bad["first"]
            print(f"WARNING: {bad['count']} non-finite event(s); the first: {first.get('event')} on rank "
                  f"{first.get('rank')} at step {first.get('step')} (see {out_dir}/events.jsonl)", file=sys.stderr)
        if result.reason:
            print(f"note: {result.reason}", file=sys.stderr)
        print(f"ok in {result.wall_time_s:.1f} s; record: {out_dir}/metrics.jsonl, {out_dir}/run.json")
        if getattr(args, "control", False):
            from testbed.engine.control import describe_control, run_control
            print(describe_control(run_control(scenario, out_dir)))
        return EXIT_OK
    print(f"FAILED: {result.reason}", file=sys.stderr)
    if result.traceback:
        print(result.traceback, file=sys.stderr)
    print(f"{digest.sample.seen} completed step(s) kept in {out_dir}/metrics.jsonl", file=sys.stderr)
    return EXIT_FAILED


def _recorded_verdict(out_dir: Path, digest: Any, world_size: int) -> dict[str, Any]:
    """The verdict the launcher wrote into run.json (computed here only if the record lacks it)."""
    try:
        run = read_run(out_dir)
    except (OSError, ValueError):
        run = {}
    return verdict_of({"scenario": {"world_size": world_size}, **run}, digest, out_dir)


def _nonfinite_events(path: Path) -> dict[str, Any] | None:
    count, first = 0, None
    for event in iter_jsonl(path):
        if str(event.get("event", "")).startswith("nonfinite"):
            count, first = count + 1, first or event
    return {"count": count, "first": first} if count else None


def _ended_early(out_dir: Path, fallback: str) -> None:
    """The short failure summary of a run the launcher did not finish: the reason run.json holds,
    and how many steps are kept (no traceback: it is in run.json)."""
    try:
        run = read_json(out_dir / RUN_FILE)
    except (OSError, ValueError):
        run = {}
    reason = run.get("reason") if run.get("status") == "failed" else None
    kept = run.get("steps_kept")
    print(f"FAILED: {reason or fallback or 'interrupted'}", file=sys.stderr)
    print(f"{kept if kept is not None else sum(1 for _ in iter_metrics(out_dir))} completed step(s) kept in "
          f"{out_dir}/metrics.jsonl; {RUN_FILE} status {run.get('status', 'unknown')!r}", file=sys.stderr)


def add_subcommand(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run one scenario as a real multi-process DP job")
    run.add_argument("scenario", nargs="?", default=None,
                     help="scenario file, or a catalog name such as control or faults/crash (`testbed list`); "
                     "default: the embedded default scenario")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--overwrite", action="store_true",
                     help="re-use a run directory that holds an earlier run (its record is deleted)")
    run.add_argument("--control", action="store_true", help="also run it with its perturbations removed "
                     "(same seeds) into OUT/control and report paired differences with confidence intervals")
    add_override_arguments(run)
    add_progress_arguments(run)
    launch_plan.add_arguments(run)
    run.set_defaults(func=cmd_run)
